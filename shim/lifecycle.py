"""A model's life on the cluster, as the node a request reached sees it: resolve its name (here,
or from a peer that has it), plan the split over this node and the live peers
(shim/planner.py), have every node of the plan load its stage, keep it loaded while it is used
and for its keep-alive after, unload it, forget it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from llm_omninode.backend.memory import compute_bytes, context_for, kv_bytes_per_position
from llm_omninode.backend.registry import ModelNotFound, ModelRegistry
from llm_omninode.backend.shards import Manifest, ManifestError
from llm_omninode.backend.spec import ModelSpec
from llm_omninode.net import frames as F
from llm_omninode.net.frames import FrameType
from llm_omninode.net.quic import NetError
from llm_omninode.net.transfer import ShardSource

from .errors import CoordinatorError, ModelUnknown
from .load_progress import ProgressHub, StageProgress
from .model_state import ModelText, PlanState
from .peers import PeerTable
from .planner import NodeCapacity, PlanError, plan_stages
from .stage_host import StageHost

log = logging.getLogger("omninode_shim.coordinator")

LOAD_TIMEOUT = 900.0  # a stage load may include fetching its shards
DEFAULT_KEEP_ALIVE = 300.0  # seconds a model stays loaded after its last request (Ollama's 5m)


class ModelLifecycle:
    """The models this node coordinates: their names, plans, loaded stages and keep-alives.

    ``speed`` is read when planning (the node measures its own at start); ``held_shards`` and
    ``shard_sources`` are the node's: what it holds, and where a shard it lacks can come from.
    """

    def __init__(
        self,
        node_id: str,
        name: str,
        memory_budget: int,
        speed: Callable[[], float],
        host: StageHost,
        peers: PeerTable,
        registry: ModelRegistry,
        held_shards: Callable[[], list[str]],
        shard_sources: Callable[[str], list[ShardSource]],
    ) -> None:
        self.node_id = node_id
        self.name = name
        self.memory_budget = memory_budget
        self.speed = speed
        self.host = host
        self.peers = peers
        self.registry = registry
        self.held_shards = held_shards
        self.shard_sources = shard_sources
        self._models: dict[str, ModelText] = {}
        self._aliases: dict[str, str] = {}  # names resolved through peers -> model id
        self._plans: dict[str, PlanState] = {}
        # model id -> when (time.time()) to unload its stages; None: never (keep_alive < 0)
        self._expiry: dict[str, float | None] = {}
        self._users: dict[str, int] = {}  # model id -> generations running or queued on it
        self._tasks: set[asyncio.Future] = set()  # unloads running in the background
        self._lock = asyncio.Lock()
        self.progress = ProgressHub()  # requests waiting for a model's load hear it here

    # ---- names --------------------------------------------------------------------------
    async def resolve(self, name: str) -> ModelText:
        """An alias or model id, known here or to a live peer (whose manifest is verified)."""
        registry = self.registry
        try:
            model_id: str | None = registry.resolve(name)
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

    def alias_of(self, model_id: str) -> str | None:
        """A name of the model: a local alias, else the name a request found it by."""
        for table in (self.registry.aliases(), self._aliases):
            for alias, known in sorted(table.items()):
                if known == model_id and alias != model_id:
                    return alias
        return None

    def forget(self, model_id: str) -> None:
        """Drop what is cached of a model that was removed here."""
        self._models.pop(model_id, None)
        self._plans.pop(model_id, None)
        self._expiry.pop(model_id, None)
        for alias in [a for a, m in self._aliases.items() if m == model_id]:
            del self._aliases[alias]

    async def _manifest_from_peers(self, name: str) -> Manifest:
        refused: list[str] = []  # peers that had the model, but a manifest we cannot accept
        for peer in self.peers.live():
            try:
                conn = await self.peers.connection(peer.node_id)
                reply = await conn.request(F.request_frame(conn.next_id(), "manifest", model=name))
            except NetError as exc:  # not there (an error frame), or the peer is unreachable
                log.debug("no manifest of %s from %s: %s", name, peer.node_id[:16], exc)
                continue
            try:
                manifest = Manifest.from_json(reply.payload)
            except (ManifestError, ValueError) as exc:  # malformed, or metadata that lies
                log.warning("refused the manifest of %s from %s: %s", name, peer.node_id[:16],
                            exc)  # fmt: skip
                refused.append(f"{peer.name or peer.node_id[:16]}: {exc}")
                continue
            wanted = reply.header.get("model_id")
            if manifest.model_id != wanted:  # content addressing: the bytes must be the id
                log.warning("peer %s sent a manifest that is not %s", peer.node_id[:16], wanted)
                continue
            self.registry.store.put_manifest(manifest)
            return manifest
        if refused:
            why = "; ".join(refused)
            raise CoordinatorError(f"model {name!r}: refused what peers sent: {why}")
        raise ModelUnknown(
            f"model {name!r} not found on this node nor on any live peer (pull it first)"
        )

    # ---- planning -----------------------------------------------------------------------
    def capacities(self, spec: ModelSpec) -> tuple[list[NodeCapacity], int]:
        """This node and every live peer, each with the bytes it can give to a stage's weights
        and KV cache (its --max-memory less its runtime and a stage's compute buffers), and
        the KV bytes a block of this model is planned for (see backend/memory.py)."""
        host = self.host
        context = context_for(spec, host.max_context)
        compute = compute_bytes(spec, context, last=True)
        kv_per_block = kv_bytes_per_position(spec) * context * host.sequences

        def room(budget: int, runtime: int) -> int:
            return max(1, budget - runtime - compute)

        me = NodeCapacity(
            self.node_id, room(self.memory_budget, host.runtime), self.speed(), self.name
        )
        others = [
            NodeCapacity(p.node_id, room(p.memory_budget, p.runtime), p.speed, p.name)
            for p in self.peers.live()
            if p.memory_budget > 0
        ]
        return [me, *others], kv_per_block

    def unsourced(self, manifest: Manifest) -> list[str]:
        """Names of the model's shards that neither this node nor any live peer holds: no
        plan can be loaded while there are any (a stage's node would have nowhere to fetch
        them from)."""
        held = set(self.held_shards())
        for peer in self.peers.live():
            held |= peer.shards
        return [s.name for s in manifest.shards if s.cid not in held]

    async def plan_for(self, model: ModelText) -> PlanState:
        nodes, kv_per_block = self.capacities(model.spec)
        node_ids = tuple(sorted(n.node_id for n in nodes))
        state = self._plans.get(model.manifest.model_id)
        if state is not None and state.nodes == node_ids:
            return state
        missing = self.unsourced(model.manifest)
        if missing:
            named = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
            raise CoordinatorError(
                f"no live node holds {len(missing)} shard(s) of this model ({named}): "
                "the nodes that had them are gone"
            )
        try:
            plan = plan_stages(model.manifest, nodes, kv_bytes_per_block=kv_per_block)
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

    def plan_of(self, model_id: str) -> PlanState | None:
        """The model's current plan (a new one replaces it when the live nodes change)."""
        return self._plans.get(model_id)

    async def ensure_ready(self, model: ModelText, state: PlanState) -> None:
        if state.ready:
            return
        payload = model.manifest.to_json()

        async def load(stage, part: StageProgress) -> None:
            if stage.node_id == self.node_id:
                await self.host.ensure(
                    model.manifest, stage.start, stage.end, self.shard_sources, part.bytes
                )
                part.loaded = True
                return
            conn = await self.peers.connection(stage.node_id)
            frame = F.request_frame(
                conn.next_id(),
                "stage.load",
                payload,
                model=model.manifest.model_id,
                start=stage.start,
                end=stage.end,
                progress=True,  # shard bytes as they arrive, then the answer
            )
            async for reply in conn.stream(frame, timeout=LOAD_TIMEOUT):
                if reply.type == FrameType.STREAM_DATA:
                    part.bytes(*_fetched(reply.header))
                elif reply.type == FrameType.RESPONSE:
                    part.loaded = True
            if not part.loaded:
                raise CoordinatorError("the stage load ended without an answer")

        async with self.progress.loading(model.manifest.model_id, len(state.plan.stages)) as w:
            results = await asyncio.gather(
                *(load(s, w.stage(i)) for i, s in enumerate(state.plan.stages)),
                return_exceptions=True,
            )
        failures = [
            f"{s.node_id[:16]} [{s.start}, {s.end}): {r}"
            for s, r in zip(state.plan.stages, results, strict=True)
            if isinstance(r, BaseException)
        ]
        if failures:
            raise CoordinatorError("stages could not be loaded: " + "; ".join(failures))
        state.ready = True

    # ---- loading and keep-alive ---------------------------------------------------------
    async def load(self, name: str, keep_alive: float | None = None) -> ModelText:
        """Plan and load a model on every node of its plan; it stays ``keep_alive`` seconds.
        A caller that goes away (its client did) does not stop the load: others may wait on it.
        """
        model = await self.resolve(name)
        await _shielded(self._plan_and_load(model))
        self._touch(model.manifest.model_id, keep_alive)
        return model

    async def _plan_and_load(self, model: ModelText) -> None:
        async with self._lock:  # one planning/loading round at a time
            state = await self.plan_for(model)
            await self.ensure_ready(model, state)

    def _touch(self, model_id: str, keep_alive: float | None) -> None:
        keep = DEFAULT_KEEP_ALIVE if keep_alive is None else keep_alive
        self._expiry[model_id] = None if keep < 0 else time.time() + keep

    def hold(self, model_id: str) -> None:
        """A generation (running or queued) uses the model: its keep-alive cannot end it."""
        self._users[model_id] = self._users.get(model_id, 0) + 1

    def release(self, model_id: str, keep_alive: float | None) -> None:
        """A generation is done with the model: its keep-alive counts from now (0: unload
        now, not at the next maintenance round)."""
        self._users[model_id] -= 1
        self._touch(model_id, keep_alive)
        if keep_alive == 0:
            self._tasks.add(task := asyncio.ensure_future(self.expire()))
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def users(self) -> int:
        """Generations running or queued here, all models."""
        return sum(self._users.values())

    def loaded(self) -> list[tuple[ModelText, PlanState, float | None]]:
        """Models whose stages this node has loaded: (model, plan, unload time)."""
        return [
            (self._models[model_id], state, self._expiry.get(model_id))
            for model_id, state in self._plans.items()
            if state.ready and model_id in self._models
        ]

    async def unload(self, name: str) -> bool:
        """Unload the model's stages on every node of its plan (those in use stay)."""
        model_id = name if name in self._plans else (await self.resolve(name)).manifest.model_id
        self._expiry.pop(model_id, None)
        state = self._plans.get(model_id)
        if state is None or not state.ready:
            return False
        state.ready = False

        async def drop(stage) -> None:
            if stage.node_id == self.node_id:
                self.host.unload(model_id, stage.start, stage.end)
                return
            conn = await self.peers.connection(stage.node_id)
            frame = F.request_frame(
                conn.next_id(), "stage.unload", model=model_id, start=stage.start, end=stage.end
            )
            await conn.request(frame)

        results = await asyncio.gather(
            *(drop(s) for s in state.plan.stages), return_exceptions=True
        )
        for stage, result in zip(state.plan.stages, results, strict=True):
            if isinstance(result, BaseException):  # that node unloads idle stages itself
                log.info("unload on %s failed: %s", stage.node_id[:16], result)
        log.info("unloaded %s", model_id[:16])
        return True

    async def expire(self) -> None:
        """Unload the models whose keep-alive has run out (the maintenance loop calls it)."""
        now = time.time()
        for model_id, deadline in list(self._expiry.items()):
            if deadline is not None and deadline <= now and self._users.get(model_id, 0) == 0:
                await self.unload(model_id)


def _fetched(header: dict) -> tuple[int, int]:
    """A peer's report of a stage's shard bytes (done, lacking), checked; (0, 0) if bad."""
    done, total = header.get("fetched"), header.get("total")
    if type(done) is int and type(total) is int and 0 <= done <= total <= 1 << 50:
        return done, total
    return 0, 0


async def _shielded(coro) -> object:
    """Await ``coro`` in a task of its own that outlives a cancelled caller; its failure is
    retrieved either way (no "exception was never retrieved")."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return await asyncio.shield(task)
