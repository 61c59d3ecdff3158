"""Embeddings over a model's plan: each input is one prefill-only sequence round the ring.

Generation's plans and stages serve as they are (shim/lifecycle.py loads the model and keeps
it while an embedding uses it; the route is shim/generation.py's). Stage 0 gets the input's
ids, hidden states go stage to stage as for a prompt (in pieces of OMNI_PREFILL_PIECE), and
the last stage, whose tail was opened with ``pool`` (shim/pipeline.py ``pool_tail_frame``),
pools its final-norm states
(backend/pooling.py: the GGUF's pooling type, the last position for a causal LM) and answers
once with the vector: a STEP frame flagged pooled, float32, its length checked against the
model width here. The sequence is then ended on every stage, its KV caches freed.

Vectors come back as the model computes them; normalising is the API's business (Ollama's
/api/embed and OpenAI's /v1/embeddings scale to unit length, the legacy /api/embeddings not).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from llm_omninode import settings
from llm_omninode.backend.memory import context_for
from llm_omninode.backend.pooling import Pooler, PoolingError, l2_normalized, pooling_of
from llm_omninode.net import frames as F
from llm_omninode.net.frames import Frame
from llm_omninode.request import RequestError

from .decode import Here, Ring
from .errors import CoordinatorError
from .hosted_stage import PoolTail
from .pipeline import Hop, PipelineError, pool_tail_frame

if TYPE_CHECKING:
    from .model_state import ModelText, PlanState
    from .planner import Plan

log = logging.getLogger("omninode_shim.embedding")

MAX_INPUTS = 2048  # inputs in one request (OpenAI's limit)
PARALLEL = 4  # of one request's inputs in flight at once
RECOVERIES = 3  # re-plans one input may go through (a lost node, an unloaded stage)
BUSY_RETRIES = 40  # a last stage full of other sequences: retry, 0.25..2 s apart


class Models(Protocol):
    """What embeddings use of the models coordinated here (shim/lifecycle.py's
    ModelLifecycle is one)."""

    async def load(self, name: str, keep_alive: float | None = None) -> ModelText: ...

    def plan_of(self, model_id: str) -> PlanState | None: ...

    def hold(self, model_id: str) -> None: ...

    def release(self, model_id: str, keep_alive: float | None) -> None: ...


@dataclass(frozen=True)
class Embedded:
    """A request's vectors (float32, as pooled: not normalised), in the inputs' order."""

    vectors: list[np.ndarray]
    prompt_tokens: int  # ids computed, all inputs
    load_s: float  # resolving, planning and loading the model


class PoolRing(Ring):
    """A ring whose tail pools (see the module's docstring) instead of picking tokens."""

    _pool: PoolTail | None = None  # the tail, when this node hosts the last stage

    async def open_pooled(self, pooling: str, width: int) -> None:
        last = self.route[-1]
        if last.node_id == self.here.node_id:
            hosted = self.here.host.get(self.model_id, last.start, last.end)
            if hosted is None:
                raise PipelineError("this node's last stage was unloaded", F.ErrorCode.NOT_FOUND)

            async def deliver(frame: Frame) -> None:
                self.answers.put_nowait(frame)

            self._pool = PoolTail(Pooler(pooling, width), deliver)
            hosted.pools[self.seq] = self._pool
        else:
            await self._tail_channel(
                last, lambda rid: pool_tail_frame(rid, self.model_id, self.seq, last, pooling)
            )
        self._open_entry(None)

    async def pooled(self, step: int, width: int) -> np.ndarray:
        """The vector the last stage pooled once ``step`` (the prompt's last piece) was in."""
        got = await self._next_answer(step)
        if got.header.get("step") != step:
            raise PipelineError(f"step {step} was answered out of order")
        try:
            return np.frombuffer(F.pooled_bytes(got, width), dtype="<f4").astype(np.float32)
        except F.FrameError as exc:
            raise PipelineError(f"the last stage answered: {exc}") from exc

    def _close_tail(self) -> None:
        super()._close_tail()
        pool = self._pool
        if pool is not None:
            last = self.route[-1]
            hosted = self.here.host.get(self.model_id, last.start, last.end)
            if hosted is not None and hosted.pools.get(self.seq) is pool:
                del hosted.pools[self.seq]


async def embed_pass(
    here: Here, model_id: str, route: Sequence[Hop], ids: Sequence[int], pooling: str, width: int
) -> np.ndarray:
    """One input's pooled vector through the plan's ``route``; PipelineError if it fails."""
    ring = PoolRing(here, model_id, uuid.uuid4().hex, route)
    try:
        await ring.open_pooled(pooling, width)
        piece = settings.prefill_piece() or len(ids)
        last_start = (len(ids) - 1) // piece * piece
        for start in range(0, last_start, piece):  # all but the last piece, unanswered
            await ring.send(ids[start : start + piece], more=True)
        step = await ring.send(ids[last_start:])
        return await ring.pooled(step, width)
    finally:
        await ring.close()  # prefill-only: every stage frees its caches


def input_ids(
    model: ModelText, item: str | Sequence[int], context: int, truncate: bool
) -> list[int]:
    """An input's ids: text tokenized as llama.cpp does for an embedding (BOS/EOS as the
    model says, special tokens parsed, no chat template), or ids as given (checked). Longer
    than ``context``: cut to it (its EOS kept last, if the model adds one) with ``truncate``,
    else RequestError."""
    tok = model.tokenizer
    if isinstance(item, str):
        ids = tok.encode(item, add_special=True, parse_special=True)
    else:
        ids = list(item)
        vocab = model.spec.vocab_size
        if not all(type(t) is int and 0 <= t < vocab for t in ids):
            raise RequestError(f"token ids must be integers in [0, {vocab})")
    if not ids:
        raise RequestError("an input is empty (nothing to embed)")
    if len(ids) > context:
        if not truncate:
            raise RequestError(
                f"input length {len(ids)} exceeds the context length {context} (truncate is false)"
            )
        ends_eos = tok.add_eos and tok.eos_id is not None and ids[-1] == tok.eos_id
        ids = ids[:context]
        if ends_eos:
            ids[-1] = tok.eos_id  # type: ignore[assignment]  # checked just above
    return ids


class Embedder:
    """Embeds inputs with a model over its plan: ``models`` loads it and keeps it loaded while
    in use, ``route`` gives a plan's hops (shim/generation.py's), ``here`` is this node."""

    def __init__(
        self,
        models: Models,
        here: Here,
        route: Callable[[Plan], list[Hop]],
        max_context: int | None,
    ) -> None:
        self.models = models
        self.here = here
        self.route = route
        self.max_context = max_context

    async def embed(
        self,
        name: str,
        inputs: Sequence[str | Sequence[int]],
        *,
        truncate: bool = True,
        keep_alive: float | None = None,
        num_ctx: int | None = None,
    ) -> Embedded:
        """The inputs' vectors (``num_ctx``: a smaller context to cut inputs to).
        RequestError for an input that cannot be served as sent; ModelUnknown,
        CoordinatorError as ``generate``."""
        if len(inputs) > MAX_INPUTS:
            raise RequestError(f"at most {MAX_INPUTS} inputs per request, got {len(inputs)}")
        t0 = time.perf_counter()
        model = await self.models.load(name, keep_alive)
        load_s = time.perf_counter() - t0
        model_id = model.manifest.model_id
        try:
            pooling = pooling_of(model.manifest.metadata)
        except PoolingError as exc:
            raise RequestError(f"{name}: {exc}") from exc
        context = context_for(model.spec, self.max_context)
        if num_ctx is not None:
            context = min(context, num_ctx)
        all_ids = [input_ids(model, item, context, truncate) for item in inputs]
        gate = asyncio.Semaphore(PARALLEL)

        async def one(ids: list[int]) -> np.ndarray:
            async with gate:
                return await self._recovering(name, model, ids, pooling, keep_alive)

        self.models.hold(model_id)  # its keep-alive cannot end it meanwhile
        try:
            vectors = await asyncio.gather(*(one(ids) for ids in all_ids))
        finally:
            self.models.release(model_id, keep_alive)  # counts from the end
        return Embedded(list(vectors), sum(map(len, all_ids)), load_s)

    async def _recovering(
        self, name: str, model: ModelText, ids: list[int], pooling: str, keep_alive: float | None
    ) -> np.ndarray:
        """``embed_pass`` until it succeeds: a full stage is retried, anything else is planned
        and loaded again (the coordinator leaves out nodes the transport found gone)."""
        model_id = model.manifest.model_id
        busy = failures = 0
        while True:
            state = self.models.plan_of(model_id)
            if state is None:  # forgotten meanwhile (removed from this node)
                raise CoordinatorError(f"model {model_id[:16]} was removed while embedding")
            if not state.ready:
                await self.models.load(name, keep_alive)
                continue
            try:
                route = self.route(state.plan)
                return await embed_pass(self.here, model_id, route, ids, pooling,
                                        model.spec.d_model)  # fmt: skip
            except PipelineError as exc:
                if exc.code == F.ErrorCode.BUSY and busy < BUSY_RETRIES:
                    busy += 1
                    await asyncio.sleep(min(2.0, 0.25 * busy))
                    continue
                if failures == RECOVERIES or exc.code == F.ErrorCode.BAD_REQUEST:
                    raise CoordinatorError(f"embedding failed: {exc}") from exc
                failures += 1
                log.warning("embedding: %s; planning and loading again", exc)
                state.ready = False
                await asyncio.sleep(0.5)


# ---- the plugin's ``embed`` request (llm embed -m omni/NAME) --------------------------------
MAX_WIRE_INPUTS = 256  # texts in one ``embed`` request
MAX_WIRE_TEXT = 8 * 1024 * 1024  # bytes of all its texts (JSON)


def texts_from_wire(payload: bytes) -> list[str]:
    """An ``embed`` request's texts: its payload is a JSON list of 1..MAX_WIRE_INPUTS
    strings (texts can be longer than a frame's JSON header may be); RequestError if not."""
    if len(payload) > MAX_WIRE_TEXT:
        raise RequestError(f"embed: at most {MAX_WIRE_TEXT} bytes of text per request")
    try:
        texts = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(f"embed: the payload is not a JSON list of texts: {exc}") from exc
    if (
        type(texts) is not list
        or not 1 <= len(texts) <= MAX_WIRE_INPUTS
        or not all(type(t) is str for t in texts)
    ):
        raise RequestError(f"embed: send a list of 1..{MAX_WIRE_INPUTS} texts")
    return texts


async def serve_embed(embedder: Embedder, frame: Frame) -> Frame:
    """``REQUEST embed {model, truncate, normalize}`` + a JSON list of texts -> ``RESPONSE
    {count, width, prompt_tokens}`` + the vectors, float32 little-endian, one after the other
    (unit length with ``normalize``, as /api/embed returns them)."""
    h = frame.header
    model, truncate, normalize = h.get("model"), h.get("truncate", True), h.get("normalize", True)
    if type(model) is not str or not 0 < len(model) <= 256:
        raise RequestError("embed: model must be a name of 1..256 characters")
    if type(truncate) is not bool or type(normalize) is not bool:
        raise RequestError("embed: truncate and normalize must be true or false")
    done = await embedder.embed(model, texts_from_wire(frame.payload), truncate=truncate)
    vectors = [l2_normalized(v) if normalize else v for v in done.vectors]
    payload = b"".join(np.asarray(v, "<f4").tobytes() for v in vectors)
    return F.response_frame(
        frame.id or 0, payload, count=len(vectors), width=int(vectors[0].size),
        prompt_tokens=done.prompt_tokens,
    )  # fmt: skip
