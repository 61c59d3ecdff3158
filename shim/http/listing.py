"""The cluster's models as the HTTP listings show them (/api/tags, /api/show, /api/ps,
/v1/models).

A model is listed by its alias with Ollama's tag (``smollm2`` -> ``smollm2:latest``); models
that only a peer holds are listed too, since a request for them is served through the ring.
/api/ps lists, on every node, the models loaded for requests coordinated here and those whose
stages this node holds for another coordinator; ``size`` is what this node holds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from llm_omninode.backend import describe
from llm_omninode.backend.shards import Manifest
from llm_omninode.backend.store import StoreError
from llm_omninode.backend.tokenizer import Tokenizer

from ..errors import CoordinatorError
from .bodies import iso
from .service import ApiService, HeldStage

log = logging.getLogger("omninode_shim.http")

FOREVER = "2318-11-30T00:00:00Z"  # how Ollama shows a model kept loaded forever
# a stage held for another coordinator stays until that coordinator unloads it: by default
# this long after its last step (the coordinators' default keep-alive, Ollama's 5m)
HELD_FOR_S = 300.0
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


async def running_models(service: ApiService) -> list[dict[str, Any]]:
    """/api/ps's rows: Ollama's fields, ``size`` the weight bytes this node holds for the
    model; ``held`` its blocks here, ``coordinated_here`` and, where it is, the whole plan
    (``stages``). A model held for another coordinator expires, as far as this node can tell,
    HELD_FOR_S after its last step here."""
    held: dict[str, list[HeldStage]] = {}
    for stage in service.held():
        held.setdefault(stage.model_id, []).append(stage)
    rows = []
    for model, state, expires in service.runner.loaded():
        model_id = model.manifest.model_id
        alias = service.runner.alias_of(model_id)
        here = held.pop(model_id, [])
        rows.append(_ps_row(service, alias or model_id, model.manifest, here, expires) | {
            "context_length": service.max_context or model.spec.context_length,
            "coordinated_here": True,
            "stages": [{"node_id": s.node_id, "start": s.start, "end": s.end,
                        "weight_bytes": s.weight_bytes} for s in state.plan.stages],
        })  # fmt: skip
    peer_aliases: dict[str, str] | None = None
    for model_id, stages in sorted(held.items()):
        manifest = _stored_manifest(service, model_id)
        if manifest is None:  # removed meanwhile
            continue
        alias = service.runner.alias_of(model_id)
        if alias is None:
            if peer_aliases is None:
                peer_aliases = await service.peer_aliases()
            alias = min((a for a, m in peer_aliases.items() if m == model_id), default=None)
        last = max(s.last_used for s in stages)
        expires = time.time() + (last - time.monotonic()) + HELD_FOR_S
        rows.append(_ps_row(service, alias or model_id, manifest, stages, expires) | {
            "coordinated_here": False,
        })  # fmt: skip
    return rows


def _ps_row(
    service: ApiService, name: str, manifest: Manifest, here: list[HeldStage],
    expires: float | None,
) -> dict[str, Any]:  # fmt: skip
    shown = display_name(name) if name != manifest.model_id else name
    return {
        "name": shown,
        "model": shown,
        "size": sum(s.weight_bytes for s in here),
        "digest": manifest.model_id,
        "details": describe.details(manifest),
        "expires_at": FOREVER if expires is None else iso(expires),
        "size_vram": 0,  # CPU stages here; Apple GPU memory is unified, not VRAM
        "held": [{"start": s.start, "end": s.end}
                 for s in sorted(here, key=lambda s: s.start)],
    }  # fmt: skip
