"""``llm omni serve | stop | peers | status``: the running shims, seen from the plugin."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import click

from .models_cli import _human_bytes


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
    @omni.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    @click.pass_context
    def serve(ctx: click.Context) -> None:
        """Run a shim (node) in the foreground: the same flags as omni-shim (--help)."""
        argv = [sys.executable, "-m", "omninode_shim", *ctx.args]
        os.execv(sys.executable, argv)

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
