"""The coordinator: the shim a request reached turns it into a pipeline run.

Resolve the model (here, or from a peer that has it), plan the split over this node and the
live peers (shim/planner.py), have every node of the plan load its stage, then run the
generation loop: the prompt's ids go to stage 0, the last stage's picked ids come back, and
``Generation`` (backend/generate.py) turns them into streamed text.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llm_omninode.backend.chat_template import ChatTemplate
from llm_omninode.backend.generate import Chunk, Generation
from llm_omninode.backend.registry import ModelNotFound
from llm_omninode.backend.runtime import prompt_ids
from llm_omninode.backend.shards import Manifest, ManifestError
from llm_omninode.backend.spec import ModelSpec
from llm_omninode.backend.tokenizer import Tokenizer
from llm_omninode.net import frames as F
from llm_omninode.net.quic import NetError
from llm_omninode.request import GenerationRequest

from .pipeline import Downstream, Hop, Link, PipelineError, check_token_reply, step_fields
from .planner import NodeCapacity, Plan, PlanError, plan_stages
from .stage_host import KV_ALLOWANCE

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("omninode_shim.coordinator")

LOAD_TIMEOUT = 900.0  # a stage load may include fetching its shards


class CoordinatorError(RuntimeError):
    """A request cannot be served; the message is for the user."""


@dataclass
class ModelText:
    """What the coordinator needs of a model besides its stages."""

    manifest: Manifest
    spec: ModelSpec
    tokenizer: Tokenizer
    template: ChatTemplate

    @classmethod
    def of(cls, manifest: Manifest) -> ModelText:
        spec = ModelSpec.from_metadata(manifest.metadata, manifest.tensor_home().keys())
        tokenizer = Tokenizer.from_metadata(manifest.metadata)
        return cls(
            manifest, spec, tokenizer, ChatTemplate.from_metadata(manifest.metadata, tokenizer)
        )


@dataclass
class PlanState:
    plan: Plan
    nodes: tuple[str, ...]  # the node set it was made for
    ready: bool = False  # every stage confirmed loaded


class Coordinator:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._models: dict[str, ModelText] = {}
        self._aliases: dict[str, str] = {}  # names resolved through peers -> model id
        self._plans: dict[str, PlanState] = {}
        self._lock = asyncio.Lock()

    # ---- models -------------------------------------------------------------------------
    async def resolve(self, name: str) -> ModelText:
        """An alias or model id, known here or to a live peer (whose manifest is verified)."""
        registry = self.node.registry
        try:
            model_id = registry.resolve(name)
        except ModelNotFound:
            model_id = self._aliases.get(name)
        if model_id is not None and model_id in self._models:
            return self._models[model_id]
        if model_id is not None and registry.store.has_manifest(model_id):
            manifest = registry.store.get_manifest(model_id)
        else:
            manifest = await self._manifest_from_peers(name)
        text = ModelText.of(manifest)
        self._models[manifest.model_id] = text
        self._aliases[name] = manifest.model_id
        return text

    async def _manifest_from_peers(self, name: str) -> Manifest:
        for peer in self.node.peers.live():
            try:
                conn = await self.node.peers.connection(peer.node_id)
                reply = await conn.request(F.request_frame(conn.next_id(), "manifest", model=name))
                manifest = Manifest.from_json(reply.payload)
            except (NetError, ManifestError, ValueError) as exc:
                log.debug("no manifest of %s from %s: %s", name, peer.node_id[:16], exc)
                continue
            wanted = reply.header.get("model_id")
            if manifest.model_id != wanted:  # content addressing: the bytes must be the id
                log.warning("peer %s sent a manifest that is not %s", peer.node_id[:16], wanted)
                continue
            self.node.store.put_manifest(manifest)
            return manifest
        raise CoordinatorError(f"model {name!r} is not on this node nor on any live peer")

    # ---- planning -----------------------------------------------------------------------
    def capacities(self) -> list[NodeCapacity]:
        """This node and every live peer, with what each can give to weights: the stage host
        keeps KV_ALLOWANCE on top of the weights, so the planner must not count on it."""

        def weights(budget: int) -> int:
            return max(1, int(budget / (1 + KV_ALLOWANCE)))

        me = NodeCapacity(self.node.node_id, weights(self.node.memory_budget), 1.0, self.node.name)
        others = [
            NodeCapacity(p.node_id, weights(p.memory_budget), 1.0, p.name)
            for p in self.node.peers.live()
            if p.memory_budget > 0
        ]
        return [me, *others]

    async def plan_for(self, model: ModelText) -> PlanState:
        nodes = self.capacities()
        node_ids = tuple(sorted(n.node_id for n in nodes))
        state = self._plans.get(model.manifest.model_id)
        if state is not None and state.nodes == node_ids:
            return state
        try:
            plan = plan_stages(model.manifest, nodes)
        except PlanError as exc:
            raise CoordinatorError(str(exc)) from exc
        state = PlanState(plan, node_ids)
        self._plans[model.manifest.model_id] = state
        names = {n.node_id: n.name or n.node_id[:16] for n in nodes}
        log.info("plan for %s: %s", model.manifest.model_id[:16], "; ".join(
            f"{names[s.node_id]} [{s.start}, {s.end})" for s in plan.stages
        ))  # fmt: skip
        return state

    def plans(self) -> list[PlanState]:
        return list(self._plans.values())

    async def ensure_ready(self, model: ModelText, state: PlanState) -> None:
        if state.ready:
            return
        payload = model.manifest.to_json()

        async def load(stage) -> None:
            if stage.node_id == self.node.node_id:
                await self.node.host.ensure(
                    model.manifest, stage.start, stage.end, self.node.shard_sources
                )
                return
            conn = await self.node.peers.connection(stage.node_id)
            frame = F.request_frame(
                conn.next_id(),
                "stage.load",
                payload,
                model=model.manifest.model_id,
                start=stage.start,
                end=stage.end,
            )
            await conn.request(frame, timeout=LOAD_TIMEOUT)

        results = await asyncio.gather(
            *(load(s) for s in state.plan.stages), return_exceptions=True
        )
        failures = [
            f"{s.node_id[:16]} [{s.start}, {s.end}): {r}"
            for s, r in zip(state.plan.stages, results, strict=True)
            if isinstance(r, BaseException)
        ]
        if failures:
            raise CoordinatorError("stages could not be loaded: " + "; ".join(failures))
        state.ready = True

    def route(self, plan: Plan) -> list[Hop]:
        hops = []
        for s in plan.stages:
            if s.node_id == self.node.node_id:
                host, port = self.node.advertised_host, self.node.port
            else:
                peer = self.node.peers.get(s.node_id)
                if peer is None:
                    raise CoordinatorError(f"node {s.node_id[:16]} of the plan is gone")
                host, port = peer.host, peer.port
            hops.append(Hop(s.node_id, host, port, s.start, s.end))
        return hops

    # ---- generation ---------------------------------------------------------------------
    async def generate(
        self, request: GenerationRequest, timings: dict[str, float] | None = None
    ) -> AsyncIterator[Chunk]:
        """Stream the request's chunks. ``timings`` (if given) receives prefill_s (prompt in,
        first id out) and decode_s (the rest), measured here: what bench/pipeline.py reads."""
        timings = {} if timings is None else timings
        model = await self.resolve(request.model)
        async with self._lock:  # one planning/loading round at a time
            state = await self.plan_for(model)
            await self.ensure_ready(model, state)
        ids = prompt_ids(model.tokenizer, model.template, request)
        context = self.node.max_context or model.spec.context_length
        gen = Generation(
            model.tokenizer, ids, max_tokens=request.max_tokens, stop=request.stop,
            context_length=context,
        )  # fmt: skip
        if gen.done:
            for chunk in gen.finish():
                yield chunk
            return
        seq = uuid.uuid4().hex
        route = self.route(state.plan)
        first = route[0]
        if first.node_id == self.node.node_id:
            hosted = self.node.host.get(model.manifest.model_id, first.start, first.end)
            if hosted is None:
                state.ready = False
                raise CoordinatorError("this node's stage was unloaded; try again")
            entry: Link | Downstream = Link(self.node.host, hosted, self.node.peers, seq, route[1:])
        else:
            entry = Downstream(self.node.peers, model.manifest.model_id, seq, route)
        t0 = time.perf_counter()
        try:
            frame = F.token_frame(seq, ids, **step_fields(request.options, ids))
            token = check_token_reply(await entry.step(frame), seq)
            t1 = timings["prefill_s"] = time.perf_counter() - t0
            log.info("seq %s: prefill of %d tokens in %.3f s", seq[:12], len(ids), t1)
            while True:
                for chunk in gen.accept(token):
                    yield chunk
                if gen.done:
                    break
                token = check_token_reply(await entry.step(F.token_frame(seq, [token])), seq)
        except PipelineError as exc:
            state.ready = False  # the next request re-checks every stage
            raise CoordinatorError(f"generation failed: {exc}") from exc
        finally:
            await entry.close()
        timings["decode_s"] = time.perf_counter() - t0 - timings.get("prefill_s", 0.0)
        log.info("seq %s: %d tokens in %.3f s (%s)", seq[:12], gen.generated,
                 time.perf_counter() - t0, gen.reason)  # fmt: skip
        for chunk in gen.finish():
            yield chunk
