"""Local models: add a GGUF (served from its own file), name it with an alias, find it again."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..home import aliases_path, read_aliases
from .cid import is_cid
from .gguf import open_gguf
from .shards import Manifest, manifest_from_gguf
from .store import ShardStore

# '/'-separated segments (``hf.co/USER/REPO:Q4_K_M``), each starting with a letter or digit: no
# empty, "." or ".." segment, no leading '/'. Aliases are keys of a JSON table, never paths.
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._:-]*"
_ALIAS_RE = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
MAX_ALIAS = 200


class ModelNotFound(LookupError):
    pass


@dataclass(frozen=True)
class ModelRecord:
    alias: str | None
    model_id: str
    manifest: Manifest


def check_alias(alias: str) -> str:
    if len(alias) > MAX_ALIAS or not _ALIAS_RE.fullmatch(alias) or is_cid(alias):
        raise ValueError(
            f"invalid alias {alias!r}: 1-{MAX_ALIAS} of letters, digits, '.', '_', ':', '-', "
            "'/', each '/'-separated part starting with a letter or digit"
        )
    return alias


class ModelRegistry:
    def __init__(self, home: str | os.PathLike) -> None:
        self.home = Path(home)
        self.store = ShardStore(self.home)

    # ---- aliases ----------------------------------------------------------------------------
    def aliases(self) -> dict[str, str]:
        return read_aliases(self.home)

    def set_alias(self, alias: str, model_id: str) -> None:
        table = self.aliases()
        table[check_alias(alias)] = model_id
        self._write_aliases(table)

    def remove_alias(self, alias: str) -> None:
        table = self.aliases()
        table.pop(alias, None)
        self._write_aliases(table)

    def _write_aliases(self, table: dict[str, str]) -> None:
        path = aliases_path(self.home)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="aliases.", dir=path.parent)
        with os.fdopen(fd, "w") as out:
            json.dump(dict(sorted(table.items())), out, indent=1)
        os.replace(tmp, path)

    # ---- models -----------------------------------------------------------------------------
    def add_file(self, path: str | os.PathLike, alias: str | None = None) -> ModelRecord:
        """Read, check and shard a GGUF; its shards stay in the file (mapped, not copied)."""
        if alias is not None:
            check_alias(alias)
        # checked at add time so a user hears about a model that cannot run now, not at first
        # use; the metadata against the tensors first, before the file is read and hashed
        from .model_check import check_model
        from .quant import check_tensor_types

        with open_gguf(path) as gguf:
            check_model(gguf.metadata, {name: t.shape for name, t in gguf.tensors.items()})
            check_tensor_types({name: t.ggml_type for name, t in gguf.tensors.items()})
            manifest = manifest_from_gguf(gguf)
        model_id = self.store.put_manifest(manifest)
        self.store.add_file_source(model_id, path)
        if alias:
            self.set_alias(alias, model_id)
        return ModelRecord(alias, model_id, manifest)

    def resolve(self, name: str) -> str:
        """A model id from an alias (with or without ``omni/``), a model id or its prefix."""
        name = name.removeprefix("omni/")
        aliases = self.aliases()
        if name in aliases:
            return aliases[name]
        if ":" not in name and f"{name}:latest" in aliases:
            return aliases[f"{name}:latest"]
        if is_cid(name) and self.store.has_manifest(name):
            return name
        if len(name) >= 8:
            matches = [m for m in self.store.manifests() if m.startswith(name)]
            if len(matches) == 1:
                return matches[0]
        raise ModelNotFound(f"no model named {name!r}; see `llm omni models`")

    def get(self, name: str) -> ModelRecord:
        model_id = self.resolve(name)
        alias = next((a for a, m in self.aliases().items() if m == model_id), None)
        return ModelRecord(alias, model_id, self.store.get_manifest(model_id))

    def records(self) -> list[ModelRecord]:
        by_id: dict[str, str | None] = {m: None for m in self.store.manifests()}
        for alias, model_id in self.aliases().items():
            if model_id in by_id and by_id[model_id] is None:
                by_id[model_id] = alias
        return [ModelRecord(a, m, self.store.get_manifest(m)) for m, a in by_id.items()]

    def remove(self, name: str) -> str:
        model_id = self.resolve(name)
        for alias, mid in self.aliases().items():
            if mid == model_id:
                self.remove_alias(alias)
        self.store.remove_manifest(model_id)
        return model_id
