"""The cluster's models as the HTTP listings show them (/api/tags, /api/show, /api/ps,
/v1/models).

A model is listed by its alias with Ollama's tag (``smollm2`` -> ``smollm2:latest``); models
that only a peer holds are listed too, since a request for them is served through the ring.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from llm_omninode.backend import describe
from llm_omninode.backend.shards import Manifest
from llm_omninode.backend.store import StoreError
from llm_omninode.backend.tokenizer import Tokenizer

from ..errors import CoordinatorError
from .bodies import iso
from .service import ApiService

log = logging.getLogger("omninode_shim.http")

# metadata arrays longer than this are shown as null unless /api/show is asked verbose
SHORT_ARRAY = 16


def display_name(alias: str) -> str:
    return alias if ":" in alias else f"{alias}:latest"


@dataclass(frozen=True)
class ListedModel:
    name: str
    manifest: Manifest
    modified: float  # seconds since the epoch

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    def tag_row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": iso(self.modified),
            "size": self.manifest.total_bytes,
            "digest": self.model_id,
            "details": describe.details(self.manifest),
        }


def modified_time(service: ApiService, model_id: str) -> float:
    try:
        return (service.registry.store.manifest_dir / f"{model_id}.json").stat().st_mtime
    except OSError:
        return 0.0


async def cluster_models(service: ApiService) -> list[ListedModel]:
    """Every model this node or a live peer holds, one row per name."""
    registry = service.registry
    local_ids = set(registry.store.manifests())
    names: dict[str, str] = dict(registry.aliases())  # alias -> model id
    for alias, model_id in (await service.peer_aliases()).items():
        names.setdefault(alias, model_id)
    rows: list[ListedModel] = []
    named: set[str] = set()
    for alias, model_id in sorted(names.items()):
        if model_id in local_ids:  # the manifest is here: no need to build the model's text
            manifest = _stored_manifest(service, model_id)
        else:  # a peer's: fetched and checked against its id (then stored here)
            try:
                manifest = (await service.runner.resolve(alias)).manifest
            except CoordinatorError as exc:  # a peer went away, or sent a bad manifest
                log.debug("cannot list %s: %s", alias, exc)
                continue
        if manifest is None or manifest.model_id != model_id:
            continue
        named.add(model_id)
        rows.append(ListedModel(display_name(alias), manifest, modified_time(service, model_id)))
    for model_id in sorted(local_ids - named):  # a manifest with no name: listed by its id
        manifest = _stored_manifest(service, model_id)
        if manifest is not None:
            rows.append(ListedModel(model_id, manifest, modified_time(service, model_id)))
    return rows


def _stored_manifest(service: ApiService, model_id: str) -> Manifest | None:
    try:
        return service.registry.store.get_manifest(model_id)
    except (OSError, ValueError, StoreError):  # removed meanwhile, or unreadable
        return None


def model_info(manifest: Manifest, verbose: bool = False) -> dict[str, Any]:
    """The GGUF metadata, as /api/show's ``model_info``; long arrays (the vocabulary) as
    null unless ``verbose``."""
    info: dict[str, Any] = {}
    for key, value in sorted(manifest.metadata.items()):
        if key == "tokenizer.chat_template":
            continue  # shown as "template"
        if isinstance(value, list) and len(value) > SHORT_ARRAY and not verbose:
            value = None
        info[key] = value
    info["general.parameter_count"] = describe.parameter_count(manifest)
    return info


def parameters_text(tokenizer: Tokenizer) -> str:
    """Ollama's ``parameters``: a Modelfile's PARAMETER lines (the model's stop tokens)."""
    lines = []
    for token in sorted(tokenizer.eog_ids):
        text = tokenizer.token_bytes(token).decode("utf-8", "replace")
        lines.append(f'stop "{text}"')
    return "\n".join(lines)
