"""The stages this node hosts: blocks [start, end) of a model, loaded from the shard store.

A stage loads only its own shards (embedding on the first, head on the last). Missing shards
are fetched from the peers that hold them (BLAKE3-verified before the store shows them), and a
manifest received from a peer is accepted only if it hashes to the model id it was asked for.
What the process holds without stages (``runtime``, measured at start) plus each stage's
planned memory (backend/memory.py: weights at their kept size, the KV cache of its context and
sequences, its compute buffers) stays within ``memory_budget`` (--max-memory); stages not used
for a while are unloaded to make room, one in use never is, and a stage that cannot fit is
refused with a clear error before anything is read. All compute runs on one worker thread, so
the event loop keeps serving QUIC while a stage computes; each stage keeps a moving average of
its decode steps' compute time there (``ms_per_token``, shown by ``llm omni status``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llm_omninode import settings
from llm_omninode.backend.constraint import Constraint, ConstraintError, Guide, TokenTable
from llm_omninode.backend.memory import StageMemory, context_for, stage_memory
from llm_omninode.backend.pooling import Pooler
from llm_omninode.backend.sequences import SequenceLimitError
from llm_omninode.backend.shards import Manifest
from llm_omninode.backend.spec import ModelSpec
from llm_omninode.backend.stage_engine import engine_name, new_stage, stage_tensors
from llm_omninode.backend.store import (
    ShardStore,
    StorageFull,
    StoreError,
    free_bytes,
    human_bytes,
)
from llm_omninode.backend.tokenizer import Tokenizer
from llm_omninode.net.transfer import ShardSource, TransferError, fetch_shards

from .hosted_stage import HostedStage
from .metrics import Metrics
from .planner import stage_bytes

log = logging.getLogger("omninode_shim.stage")

# sequences one stage holds at once: two coordinators' worth of parallel requests, with
# slack for the caches of finished ones being freed on the worker thread
MAX_SEQUENCES = 16
MAX_PARKED = 4  # of those, finished ones kept for prefix reuse (the oldest go first)


def wire_dtype() -> type:
    """How hidden states leave this node's stages: float32 (default: unrounded, so any split
    gives bit for bit the logits of one stage) or float16 (half the bytes); a stage takes
    either form as input."""
    return np.float32 if settings.wire_dtype() == "float32" else np.float16


class StageError(RuntimeError):
    """A stage cannot be loaded here (budget, missing shards, bad manifest)."""


class StageStorageFull(StageError):
    """The disk filled up while this node stored the stage's shards (HTTP 507). Messages
    start with ``MARKER``: a coordinator that only got the text (a peer's error frame, or a
    message that joined several failures) still knows what it was."""

    MARKER = "disk full while"


class ShardsUnavailable(StageError):
    """No peer could supply a shard of the stage intact (HTTP 502); see StageStorageFull."""

    MARKER = "no peer could supply"


class StageHost:
    def __init__(
        self,
        store: ShardStore,
        memory_budget: int,
        *,
        max_context: int | None = None,
        idle_timeout: float = 300.0,
        sequences: int = 4,
        threads: int | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics  # steps, shard bytes fetched, refused loads (None: not kept)
        self.memory_budget = memory_budget
        self.runtime = 0  # bytes held without stages: set by the node once it has started
        self.max_context = max_context
        self.sequences = sequences  # each stage's KV cache is planned for this many at once
        self.threads = threads  # of a ggml stage (None: every CPU)
        self.idle_timeout = idle_timeout  # KV caches of sequences idle this long are freed
        self._stages: dict[tuple[str, int, int], HostedStage] = {}
        self._loading: dict[tuple[str, int, int], asyncio.Future[HostedStage]] = {}
        # who hears a loading stage's shard bytes arrive: (bytes done, bytes lacking)
        self._fetch_watchers: dict[tuple[str, int, int], list[Callable[[int, int], None]]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlx")
        self._batches: set[asyncio.Future] = set()

    # ---- what is here -------------------------------------------------------------------
    def stages(self) -> list[HostedStage]:
        return sorted(self._stages.values(), key=lambda h: h.key)

    def get(self, model_id: str, start: int, end: int) -> HostedStage | None:
        return self._stages.get((model_id, start, end))

    def used_bytes(self) -> int:
        """Weight bytes of the stages held."""
        return sum(h.weight_bytes for h in self._stages.values())

    def planned_bytes(self) -> int:
        """Planned bytes of the stages held (weights, KV budgets, compute buffers)."""
        return sum(h.memory.total for h in self._stages.values())

    def plan(self, spec: ModelSpec, weights: int, start: int, end: int) -> StageMemory:
        """The memory a stage of blocks [start, end) holding ``weights`` bytes is planned for."""
        context = context_for(spec, self.max_context)
        last = end == spec.n_blocks
        return stage_memory(spec, weights, end - start, last, context, self.sequences)

    async def run(self, fn: Callable, *args: object):
        """Run ``fn`` on the MLX worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---- loading ------------------------------------------------------------------------
    async def ensure(
        self,
        manifest: Manifest,
        start: int,
        end: int,
        sources_for: Callable[[str], Sequence[ShardSource]],
        progress: Callable[[int, int], None] | None = None,
    ) -> HostedStage:
        """The stage for blocks [start, end), loading it (once, however many ask) if needed;
        ``progress`` hears its shard bytes arrive (done, lacking)."""
        key = (manifest.model_id, start, end)
        if key in self._stages:
            return self._stages[key]
        pending = self._loading.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._load(manifest, start, end, sources_for))
            self._loading[key] = pending
            pending.add_done_callback(lambda _: self._loading.pop(key, None))
            pending.add_done_callback(_retrieved)  # its askers may all have gone meanwhile
        watchers = self._fetch_watchers.setdefault(key, [])
        if progress is not None:
            watchers.append(progress)
        try:
            return await asyncio.shield(pending)
        finally:
            if progress is not None:
                watchers.remove(progress)
            if not watchers and self._fetch_watchers.get(key) is watchers:
                del self._fetch_watchers[key]

    def _make_room(self, need: StageMemory) -> None:
        """Unload idle stages, least recently used first, until ``need`` fits the budget
        beside the runtime and the stages kept; StageError (nothing unloaded) if it cannot."""
        allowed = self.memory_budget - self.runtime
        idle = sum(h.memory.total for h in self._stages.values() if h.active == 0)
        if self.planned_bytes() - idle + need.total > allowed:
            raise StageError(
                f"stage needs {_mib(need.total)} (weights {_mib(need.weights)}, KV cache "
                f"{_mib(need.kv)}, compute {_mib(need.compute)}); this node's --max-memory is "
                f"{_mib(self.memory_budget)}, the runtime holds {_mib(self.runtime)} and stages "
                f"in use {_mib(self.planned_bytes() - idle)} (raise --max-memory, lower "
                "--max-context, or add nodes)"
            )
        for hosted in sorted(self._stages.values(), key=lambda h: h.last_used):
            if self.planned_bytes() + need.total <= allowed:
                break
            if hosted.active == 0:
                log.info(
                    "unloading %s [%d, %d) to make room", hosted.model_id[:16], *hosted.key[1:]
                )
                self._stages.pop(hosted.key)  # its weights and KV caches go with it

    async def _load(
        self,
        manifest: Manifest,
        start: int,
        end: int,
        sources_for: Callable[[str], Sequence[ShardSource]],
    ) -> HostedStage:
        """``_load_stage``, its expected failures as named StageErrors, each logged in one
        line here (a peer that asked gets the message in its error frame)."""
        where = f"{manifest.model_id[:16]} [{start}, {end})"
        try:
            return await self._load_stage(manifest, start, end, sources_for)
        except StorageFull as exc:
            error: StageError = StageStorageFull(
                _storage_full_message(self.store, manifest, start, end, exc)
            )
            cause: Exception = exc
        except TransferError as exc:
            error, cause = ShardsUnavailable(_unavailable_message(manifest, exc)), exc
        except StoreError as exc:  # a shard missing or the wrong size, a source file gone
            error, cause = StageError(str(exc)), exc
        except StageError as exc:
            log.warning("cannot load %s: %s", where, exc)
            self._refused(exc)
            raise
        log.warning("cannot load %s: %s", where, error)
        self._refused(error)
        raise error from cause

    def _refused(self, error: StageError) -> None:
        if self.metrics is not None:
            self.metrics.refusals.labels(f"stage load: {type(error).__name__}").inc()

    async def _load_stage(
        self,
        manifest: Manifest,
        start: int,
        end: int,
        sources_for: Callable[[str], Sequence[ShardSource]],
    ) -> HostedStage:
        t0 = time.perf_counter()
        spec = ModelSpec.from_metadata(manifest.metadata, manifest.tensor_home().keys())
        if not 0 <= start < end <= spec.n_blocks:
            raise StageError(f"bad block range [{start}, {end}) for {spec.n_blocks} blocks")
        weight_bytes = stage_bytes(manifest, start, end)
        memory = self.plan(spec, weight_bytes, start, end)
        self._make_room(memory)
        if not self.store.has_manifest(manifest.model_id):
            self.store.put_manifest(manifest)
        await self._drop_corrupt(manifest, start, end)
        missing = [
            (s.cid, s.size)
            for s in manifest.shards_for_stage(start, end)
            if not self.store.has(s.cid)
        ]
        fetched: dict[str, str] = {}
        if missing:
            total = sum(size for _, size in missing)
            log.info(
                "fetching %d shard(s), %.1f MiB, for %s [%d, %d)",
                len(missing), total / 2**20, manifest.model_id[:16], start, end,
            )  # fmt: skip
            key, got = (manifest.model_id, start, end), dict.fromkeys(dict(missing), 0)

            def arrived(cid: str, done: int, _size: int) -> None:
                got[cid] = done
                for watcher in self._fetch_watchers.get(key, []):
                    watcher(sum(got.values()), total)

            arrived(missing[0][0], 0, 0)
            fetched = await fetch_shards(missing, sources_for, self.store, progress=arrived)
            if self.metrics is not None:
                self.metrics.transfer_bytes.labels("in").inc(total)
        tensors = stage_tensors(self.store, manifest, start, end, manifest.model_id)
        context = context_for(spec, self.max_context)
        stage = await self.run(
            lambda: new_stage(
                spec,
                tensors,
                start,
                end,
                max_context=context,
                max_sequences=MAX_SEQUENCES,
                hidden_dtype=wire_dtype(),
                kv_bytes=memory.kv,
                threads=self.threads,
            )  # fmt: skip
        )
        if stage.nbytes > memory.weights:  # an engine that keeps more than the GGUF bytes
            memory = self.plan(spec, stage.nbytes, start, end)
        hosted = HostedStage(
            manifest.model_id, start, end, spec, stage, memory, time.perf_counter() - t0, fetched
        )
        self._stages[hosted.key] = hosted
        log.info(
            "loaded %s blocks [%d, %d)%s%s on %s: weights %s, planned %s, in %.2f s",
            manifest.model_id[:16], start, end,
            " +embedding" if stage.is_first else "", " +head" if stage.is_last else "",
            engine_name(), _mib(memory.weights), _mib(memory.total), hosted.loaded_s,
        )  # fmt: skip
        return hosted

    async def _drop_corrupt(self, manifest: Manifest, start: int, end: int) -> None:
        """Re-hash the shards held here (BLAKE3 is cheap next to a load); a stored shard
        that no longer matches its CID is removed, so it is fetched again."""
        for shard in manifest.shards_for_stage(start, end):
            if not self.store.has(shard.cid) or await asyncio.to_thread(
                self.store.verify, shard.cid
            ):
                continue
            if not self.store.remove(shard.cid):
                raise StageError(
                    f"shard {shard.name} ({shard.cid}) no longer matches the GGUF file it is "
                    "served from: was the file changed? add it again"
                )
            log.warning("shard %s (%s) was corrupt here: removed, fetching it again",
                        shard.name, shard.cid)  # fmt: skip

    # ---- compute ------------------------------------------------------------------------
    async def forward(
        self,
        hosted: HostedStage,
        seq: str,
        x: np.ndarray,
        then: Callable | None = None,
        each: Callable | None = None,
    ) -> Any:
        """The stage's output for ``x``, or ``then(output)`` (the last stage's token pick, run
        on the worker thread too, so a step costs one hand-over, not two). ``each``: every
        position's logits go through it (a prompt scored, backend/logprobs.py)."""
        hosted.last_used = time.monotonic()
        try:
            return await self._compute(hosted, seq, x, then, each)
        except SequenceLimitError:
            if not hosted.parked:
                raise
            self.free(hosted, next(iter(hosted.parked)))  # a live sequence before a parked one
            return await self._compute(hosted, seq, x, then, each)

    async def _compute(
        self,
        hosted: HostedStage,
        seq: str,
        x: np.ndarray,
        then: Callable | None,
        each: Callable | None = None,
    ) -> Any:
        """The stage's forward, a decode step batched with the others waiting for the worker.

        While the worker computes, the next steps of other sequences queue up; the next batch
        takes all of them, so each weight is read once for all (Stage.forward_batch; a
        sequence's numbers do not depend on its batch).
        """
        if each is not None:
            forward = functools.partial(hosted.stage.forward, each=each)
            return await self.run(_then, then, forward, seq, x)
        if x.shape[0] != 1:  # a prompt: not a decode step's time
            return await self.run(_then, then, hosted.stage.forward, seq, x)
        if not hosted.stage.batches:
            return await self.run(_timed, hosted, _then, then, hosted.stage.forward, seq, x)
        future = asyncio.get_running_loop().create_future()
        with hosted.waiting_lock:
            hosted.waiting.append((seq, x, future, then))
            first = len(hosted.waiting) == 1
        if first:  # no batch is queued yet that will take this step
            task = asyncio.ensure_future(self._run_waiting(hosted))
            self._batches.add(task)  # a reference, so the task is not collected mid-run
            task.add_done_callback(self._batches.discard)
        return await future

    async def _run_waiting(self, hosted: HostedStage) -> None:
        def take_and_run() -> tuple[list, list]:
            with hosted.waiting_lock:
                batch, hosted.waiting = hosted.waiting, []
            t0 = time.perf_counter()
            try:
                outs = hosted.stage.forward_batch([(seq, x) for seq, x, _, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every waiter gets it
                return batch, [exc] * len(batch)
            results = [
                out if isinstance(out, Exception) else _then_or_error(then, out)
                for (_, _, _, then), out in zip(batch, outs, strict=True)
            ]
            seconds = time.perf_counter() - t0
            hosted.note_step(seconds)
            if self.metrics is not None:
                where = f"{hosted.start}-{hosted.end}"
                self.metrics.step_seconds.labels(hosted.model_id[:16], where).observe(seconds)
            return batch, results

        stopped: BaseException | None = None
        try:
            batch, results = await self.run(take_and_run)
        except BaseException as exc:  # no worker (shutting down): fail what still waits
            with hosted.waiting_lock:
                batch, hosted.waiting = hosted.waiting, []
            results = [RuntimeError(f"stage host stopped: {exc!r}")] * len(batch)
            stopped = exc
        for (_, _, future, _), result in zip(batch, results, strict=True):
            if future.done():  # its pipeline went away meanwhile
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
        if stopped is not None and not isinstance(stopped, Exception):
            raise stopped  # cancelled

    async def guide(self, hosted: HostedStage, constraint: Constraint) -> Guide:
        """A sequence's guide of ``constraint`` on the last stage ``hosted`` (its token table
        is built at the first, once, from the manifest's vocabulary, off the event loop)."""
        if hosted.token_table is None:
            hosted.token_table = asyncio.ensure_future(asyncio.to_thread(self._token_table, hosted))
            hosted.token_table.add_done_callback(_retrieved)
        table = await asyncio.shield(hosted.token_table)
        return await asyncio.to_thread(table.guide, constraint)

    def _token_table(self, hosted: HostedStage) -> TokenTable:
        t0 = time.perf_counter()
        try:
            metadata = self.store.get_manifest(hosted.model_id).metadata
            table = TokenTable(Tokenizer.from_metadata(metadata), hosted.spec.vocab_size)
        except (StoreError, ValueError) as exc:  # TokenizerError is a ValueError
            raise ConstraintError(f"no token table for {hosted.model_id[:16]}: {exc}") from exc
        log.info("token table of %s: %d ids in %.2f s", hosted.model_id[:16], table.vocab_size,
                 time.perf_counter() - t0)  # fmt: skip
        return table

    async def embed(self, hosted: HostedStage, seq: str, x: np.ndarray, pooler: Pooler) -> None:
        """Run an embedding sequence's step on the last stage, its states to ``pooler``."""
        hosted.last_used = time.monotonic()
        try:
            await self.run(hosted.stage.embed, seq, x, pooler)
        except SequenceLimitError:
            if not hosted.parked:
                raise
            self.free(hosted, next(iter(hosted.parked)))  # a live sequence before a parked one
            await self.run(hosted.stage.embed, seq, x, pooler)

    def free(self, hosted: HostedStage, seq: str) -> None:
        hosted.tails.pop(seq, None)
        hosted.pools.pop(seq, None)
        hosted.parked.pop(seq, None)
        self._pool.submit(hosted.stage.free, seq)

    def park(self, hosted: HostedStage, seq: str) -> None:
        """Keep a finished sequence's KV cache for a next turn (``adopt``); its sampler goes."""
        hosted.tails.pop(seq, None)
        hosted.parked[seq] = time.monotonic()
        while len(hosted.parked) > MAX_PARKED:
            self.free(hosted, next(iter(hosted.parked)))

    async def adopt(self, hosted: HostedStage, old: str, new: str, keep: int) -> int:
        """Start ``new`` from the first ``keep`` positions of the parked ``old``; the
        positions kept (0: not parked here any more)."""
        if hosted.parked.pop(old, None) is None:
            return 0
        return await self.run(hosted.stage.adopt, old, new, keep)

    def unload(self, model_id: str, start: int, end: int) -> bool:
        """Drop a stage unless a pipeline is using it now; whether it was dropped."""
        hosted = self._stages.get((model_id, start, end))
        if hosted is None or hosted.active:
            return False
        del self._stages[hosted.key]  # its weights and KV caches go with it
        log.info("unloaded %s [%d, %d)", model_id[:16], start, end)
        return True

    def evict_idle(self) -> None:
        """Free KV caches of sequences nobody has touched for ``idle_timeout`` seconds."""
        for hosted in list(self._stages.values()):
            for seq in hosted.stage.evict_idle(self.idle_timeout):
                hosted.tails.pop(seq, None)
                hosted.pools.pop(seq, None)
                hosted.parked.pop(seq, None)
                log.info("freed idle sequence %s on %s", seq[:12], hosted.model_id[:16])

    def close(self) -> None:
        self._stages.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _storage_full_message(
    store: ShardStore, manifest: Manifest, start: int, end: int, exc: StorageFull
) -> str:
    """For a shard: what the stage still needs on disk (its shards not held, whole) and what
    there is; anything else (the manifest) says it in its own words."""
    if exc.path != store.tmp_dir:
        return str(exc)
    need = sum(s.size for s in manifest.shards_for_stage(start, end) if not store.has(s.cid))
    free = free_bytes(exc.path)
    room = [f"needs {human_bytes(need)}"] if need else []
    room += [f"{human_bytes(free)} free"] if free is not None else []
    text = f"{StageStorageFull.MARKER} storing the shards of {manifest.model_id[:16]} "
    text += f"blocks [{start}, {end}) in {exc.path}" + (f" ({', '.join(room)})" if room else "")
    return text + (f"; {exc.removed}" if exc.removed else "")


def _unavailable_message(manifest: Manifest, exc: TransferError) -> str:
    """Which shards no peer supplied intact, and why each peer was refused."""
    names = {s.cid: s.name for s in manifest.shards}
    parts = []
    for cid, refused in exc.refused.items():
        why = "; ".join(f"{node[:16]}: {reason}" for node, reason in refused.items())
        parts.append(f"shard {names.get(cid, '?')} ({cid}): {why or 'no live peer to ask'}")
    if not parts:  # no detail (not from fetch_shard): its own words
        parts.append(str(exc))
    return f"{ShardsUnavailable.MARKER} {len(parts)} shard(s) intact: " + " | ".join(parts)


def _retrieved(task: asyncio.Future) -> None:
    """Mark a task's failure as seen (no "exception was never retrieved" in the log)."""
    if not task.cancelled():
        task.exception()


def _timed(hosted: HostedStage, fn: Callable, *args: object) -> Any:
    """``fn(*args)``, its time counted as a decode step of ``hosted``."""
    t0 = time.perf_counter()
    out = fn(*args)
    hosted.note_step(time.perf_counter() - t0)
    return out


def _then(then: Callable | None, fn: Callable, *args: object) -> Any:
    out = fn(*args)
    return out if then is None else then(out)


def _then_or_error(then: Callable | None, out: np.ndarray) -> Any:
    try:
        return out if then is None else then(out)
    except Exception as exc:  # noqa: BLE001 - goes to that step's waiter
        return exc


def _mib(n: int | float) -> str:
    return f"{n / 2**20:.1f} MiB"
