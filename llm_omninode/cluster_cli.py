"""``llm omni init | join | trust | untrust | id``: this node's cluster membership, and
``llm omni serve | stop | peers | status | ui``: the running shims, seen from the plugin."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import click

from .home import omni_home
from .models_cli import _fail, _human_bytes

SERVE_HELP = """Run a shim (node) in the foreground: the flags are omni-shim's own."""


class ShimCommand(click.Command):
    """``llm omni serve``: omni-shim's own click options (shim/main.py, the one definition),
    read when asked for (--help, parsing), so `llm` start-up does not import the shim. The
    flags are checked here, then the shim is exec'd with them as given."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        from omninode_shim.main import main as shim_main

        mine = super().get_params(ctx)  # --help
        return [p for p in shim_main.params if p.name != "help"] + mine

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["shim_args"] = list(args)
        return super().parse_args(ctx, args)


def _serve(**flags: object) -> None:
    args = click.get_current_context().meta["shim_args"]
    os.execv(sys.executable, [sys.executable, "-m", "omninode_shim", *args])


def _ask(method: str) -> dict:
    from .client import ShimClient, ShimError

    try:
        with ShimClient.connect(start=False) as client:
            return client.request(method)
    except ShimError as exc:
        raise click.ClickException(str(exc)) from exc


def _layers(stages: list) -> str:
    parts = []
    for s in stages if isinstance(stages, list) else []:
        if isinstance(s, dict):
            parts.append(f"{str(s.get('model', ''))[:12]}…[{s.get('start')}, {s.get('end')})")
    return ", ".join(parts) or "-"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)  # fmt: skip


def register(omni: click.Group) -> None:
    for command in (init, join, trust, untrust, id_):
        omni.add_command(command)

    helps = {"help_option_names": ["-h", "--help"]}
    omni.add_command(ShimCommand("serve", help=SERVE_HELP, callback=_serve, context_settings=helps))

    @omni.command()
    def stop() -> None:
        """Stop the shim running on this machine's data directory."""
        from .client import local_shim
        from .home import data_dir_locked, data_dir_owner, omni_home

        home = omni_home()
        found = local_shim(home)
        # the lock names the owner too: a shim still starting has not written shim.json yet
        pid = found[2] if found is not None else data_dir_owner(home)
        if pid is None:
            raise click.ClickException("no shim is running here")
        os.kill(pid, signal.SIGTERM)

        def gone() -> bool:  # the lock goes with the process; shim.json where there is none
            locked = data_dir_locked(home)
            return not locked if locked is not None else local_shim(home) is None

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not gone():
            time.sleep(0.1)
        if not gone():
            raise click.ClickException(f"the shim (pid {pid}) has not stopped within 15 s")
        click.echo(f"stopped the shim (pid {pid})")

    @omni.command()
    @click.option("--url", metavar="URL", help="A shim's HTTP API (default: the one running here).")
    @click.option("--token", envvar="OMNI_API_TOKEN", metavar="TOKEN",
                  help="The API token, if the shim requires one (env OMNI_API_TOKEN).")  # fmt: skip
    @click.option("--no-browser", is_flag=True, help="Print the address only.")
    def ui(url: str | None, token: str | None, no_browser: bool) -> None:
        """Open the cluster's live page (nodes, split, speed, requests) in a browser."""
        import webbrowser

        address = ui_address(omni_home(), url, token)
        click.echo(f"cluster page: {address}")
        if not no_browser and not webbrowser.open(address):
            click.echo("(no browser found here: open the address above in one)")

    @omni.command()
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def peers(as_json: bool) -> None:
        """The nodes the shim knows: name, id, address, device, speed, memory, layers, round
        trip."""
        rows = _ask("peers").get("peers", [])
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        # SPEED: measured at start (billions of weights multiplied a second), what plans share
        # work by; MEMORY: planned (runtime + stages) / --max-memory; RSS: resident now; PEAK:
        # the most
        table = [["NAME", "NODE ID", "ADDRESS", "DEVICE", "SPEED", "MEMORY", "RSS", "PEAK",
                  "LAYERS", "RTT"]]  # fmt: skip
        notes = []  # why a node is not in: "refused by ...: bad cluster proof", ...
        for r in rows:
            rtt = r.get("rtt_ms")
            node_id = str(r.get("node_id") or "")
            error = r.get("error")
            if error and not r.get("live"):
                refused = str(error).startswith(("refused by ", "we refused "))
                label = r.get("name") or node_id[:20] or r.get("address", "?")
                notes.append(str(error) if refused else f"{label}: {error}")
            table.append([
                str(r.get("name") or "?") + (" (this)" if r.get("source") == "self" else ""),
                node_id[:20] + "…" if node_id else "?",
                str(r.get("address", "")),
                str(r.get("device", "")) or "?",
                _number(r.get("speed"), "{:g}"),
                _memory(r),
                _human_bytes(r["rss"]) if isinstance(r.get("rss"), int) else "-",
                _human_bytes(r["peak"]) if isinstance(r.get("peak"), int) else "-",
                _layers(r.get("stages", [])),
                "-" if rtt is None else f"{rtt:.2f} ms",
            ])  # fmt: skip
        click.echo(_table(table))
        for note in notes:
            click.echo(note)

    @omni.command()
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def status(as_json: bool) -> None:
        """The plan: which node runs which blocks of which model, and each stage's time per
        token where its node has measured it."""
        doc = _ask("status")
        if as_json:
            click.echo(json.dumps(doc, indent=2))
            return
        click.echo(f"node {doc.get('name')} ({doc.get('node_id')})")
        plans = doc.get("plans", [])
        if not plans:
            click.echo("no model planned yet (the first prompt plans one)")
        for plan in plans:
            aliases = ", ".join(plan.get("aliases", [])) or "-"
            ready = "ready" if plan.get("ready") else "loading"
            click.echo(f"model {aliases} ({plan.get('model')}): {ready}")
            for s in plan.get("stages", []):
                click.echo(
                    f"  blocks [{s['start']:>3}, {s['end']:>3})  on {s.get('name') or '?':<12} "
                    f"{s['node_id'][:20]}…  {_human_bytes(s.get('weight_bytes', 0)):>10}  "
                    f"{_number(s.get('ms_per_token'), '{:.2f} ms/token')}"
                )


def ui_address(home: Path, url: str | None, token: str | None) -> str:
    """The cluster page of the shim at ``url`` (its HTTP API), or of the one running on
    ``home``; ClickException if there is none or it has no HTTP API."""
    from urllib.parse import quote

    from .client import local_shim
    from .home import SHIM_STATE_FILE

    if url is None:
        if local_shim(home) is None:
            raise click.ClickException("no shim is running here (llm omni serve starts one)")
        try:
            url = json.loads((home / SHIM_STATE_FILE).read_text())["api"]
        except (OSError, ValueError, KeyError) as exc:
            raise click.ClickException("the shim running here has no HTTP API") from exc
    # a shim listening on every address is reached on this machine at loopback
    url = str(url).rstrip("/").replace("//0.0.0.0:", "//127.0.0.1:").replace("//[::]:", "//[::1]:")
    return f"{url}/ui" + (f"?token={quote(token, safe='')}" if token else "")


def _number(value: object, form: str) -> str:
    """``value`` in ``form`` if a number, else "-"."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    return form.format(value)


def _memory(row: dict) -> str:
    """ "planned / budget": the runtime measured at start plus the stages' planned memory."""
    budget = row.get("memory_budget") or 0
    runtime, planned = row.get("runtime"), row.get("planned")
    if not isinstance(runtime, int) or not isinstance(planned, int):
        return _human_bytes(budget)
    return f"{_human_bytes(runtime + planned)} / {_human_bytes(budget)}"


# ---- cluster membership ----------------------------------------------------------------------
# net/ (cryptography) is imported inside each command: plugin start-up must stay cheap.


def _identity():
    from .net.identity import IdentityError, load_or_create_identity

    try:
        return load_or_create_identity(omni_home())
    except (IdentityError, OSError) as exc:
        _fail(exc)


def _cluster_secret() -> bytes | None:
    from .net.admission import AdmissionError, load_cluster_secret

    try:
        return load_cluster_secret(omni_home())
    except AdmissionError as exc:
        _fail(exc)
    return None


@click.command()
@click.option("--force", is_flag=True, help="Replace this node's existing cluster secret")
def init(force):
    """Start a cluster: create this node's identity and a new cluster secret.

    The secret is printed once; give it to every other node.
    """
    from .net.admission import SECRET_FILE, AdmissionError, cluster_fingerprint, parse_secret
    from .net.admission import create_cluster_secret as create
    from .net.admission import load_cluster_secret as load

    identity = _identity()
    path = omni_home() / SECRET_FILE
    replaced = False
    if path.exists():
        if not force:
            try:
                fp = f" (cluster {cluster_fingerprint(load(omni_home()) or b'')})"
            except AdmissionError:  # unreadable: still refuse, --force is the way out
                fp = ""
            raise click.ClickException(
                f"this node already has a cluster secret{fp}; `llm omni init --force` makes a "
                "new one, and every other node must then join again with it"
            )
        path.unlink()
        replaced = True
    try:
        text = create(omni_home())
    except (AdmissionError, OSError) as exc:
        _fail(exc)
    click.echo(f"node id  {identity.node_id}")
    click.echo(f"cluster  {cluster_fingerprint(parse_secret(text))}")
    click.echo("")
    click.echo("cluster secret (shown only this once; anyone who has it can join):")
    click.echo(f"  {text}")
    click.echo("")
    click.echo(
        "Give it to each other node: `llm omni join SECRET` there, "
        "or start its daemon with `omni-shim --join SECRET`."
    )
    if replaced:
        click.echo("The old secret is gone: nodes that joined with it must join again.")


@click.command()
@click.argument("secret", required=False)
@click.option("--force", is_flag=True, help="Replace a different secret this node already has")
def join(secret, force):
    """Join a cluster with the secret `llm omni init` printed on its first node.

    Without SECRET, it is asked for (not echoed, and kept out of shell history).
    """
    from .net.admission import SECRET_FILE, AdmissionError, cluster_fingerprint, parse_secret
    from .net.admission import load_cluster_secret as load
    from .net.admission import save_cluster_secret as save

    if secret is None:
        secret = click.prompt("cluster secret", hide_input=True)
    try:
        parsed = parse_secret(secret)  # validate before touching a stored secret
        path = omni_home() / SECRET_FILE
        try:
            current = load(omni_home())
            which = f"cluster {cluster_fingerprint(current)}" if current else ""
        except AdmissionError:  # unreadable: as good as another cluster's, --force replaces it
            current, which = b"", "an unreadable secret"
        if current is not None and current != parsed:
            if not force:
                raise click.ClickException(
                    f"this node is already in another cluster ({which}); "
                    "`llm omni join --force SECRET` leaves it"
                )
            path.unlink()
        save(omni_home(), secret)
    except (AdmissionError, OSError) as exc:
        _fail(exc)
    click.echo(f"joined cluster {cluster_fingerprint(parsed)}")


def _trusted_path() -> Path:
    from .net.admission import TRUSTED_FILE

    return omni_home() / TRUSTED_FILE


def _check_node_id(node_id: str) -> str:
    from .net.identity import IdentityError, public_key_of_node_id

    node_id = node_id.strip()
    try:
        public_key_of_node_id(node_id)
    except IdentityError as exc:
        _fail(exc)
    return node_id


def _trusted_lines() -> list[str]:
    """The trust file's lines, after checking it parses (never rewrite a broken file)."""
    from .net.admission import AdmissionError, parse_trusted

    path = _trusted_path()
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        parse_trusted(text)
    except (AdmissionError, OSError, UnicodeDecodeError) as exc:
        _fail(exc)
    return text.splitlines()


def _line_id(line: str) -> str:
    return line.split("#", 1)[0].strip()


def _write_trusted(lines: list[str]) -> None:
    """Replace the trust file atomically: a crash leaves the old list or the new one."""
    import os
    import secrets

    path = _trusted_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        _fail(exc)


@click.command()
@click.argument("node_id", required=False)
@click.option("--list", "list_", is_flag=True, help="List the trusted node ids")
def trust(node_id, list_):
    """Admit NODE_ID without the cluster secret (its id is its public key)."""
    if list_ == (node_id is not None):
        raise click.UsageError("give either NODE_ID or --list")
    lines = _trusted_lines()
    if list_:
        ids = [i for i in (_line_id(line) for line in lines) if i]
        for i in ids:
            click.echo(i)
        if not ids:
            click.echo("no trusted node ids (add one: llm omni trust NODE_ID)", err=True)
        return
    node_id = _check_node_id(node_id)
    if node_id in {_line_id(line) for line in lines}:
        click.echo(f"already trusted: {node_id}")
        return
    _write_trusted([*lines, node_id])
    click.echo(f"trusted {node_id}")


@click.command()
@click.argument("node_id")
def untrust(node_id):
    """Stop admitting NODE_ID on trust alone (it may still join with the cluster secret)."""
    node_id = _check_node_id(node_id)
    lines = _trusted_lines()
    kept = [line for line in lines if _line_id(line) != node_id]
    if len(kept) == len(lines):
        click.echo(f"was not trusted: {node_id}")
        return
    _write_trusted(kept)
    click.echo(f"untrusted {node_id}")


@click.command(name="id")
def id_():
    """Print this node's id (creating its key on first use) and its cluster, if any."""
    from .net.admission import cluster_fingerprint

    identity = _identity()
    click.echo(identity.node_id)
    secret = _cluster_secret()
    if secret is None:
        click.echo("no cluster yet: llm omni init, or llm omni join SECRET", err=True)
    else:
        click.echo(f"cluster {cluster_fingerprint(secret)}", err=True)
