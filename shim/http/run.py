"""One generation on behalf of an HTTP adapter: resolve the name, start, stream, map errors.

The first chunk is awaited before any response is started, so a request that fails early (an
unknown model, a prompt longer than the context, no node able to hold the model) gets a real
HTTP status; a failure after that can only be reported inside the stream. A streamed request
whose model has to be loaded first (planned, shards fetched, stages loaded) is the exception:
its response starts with the load's first progress report (``EarlyStream``), and a load that
fails after that is told inside the stream too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import NoReturn

from aiohttp import web

from llm_omninode.backend.chat_template import ChatTemplateError
from llm_omninode.backend.generate import Chunk
from llm_omninode.backend.logprobs import TokenLogprob
from llm_omninode.backend.registry import ModelNotFound
from llm_omninode.backend.store import is_disk_full
from llm_omninode.net.transfer import TransferError
from llm_omninode.request import RequestError

from ..errors import Busy, CoordinatorError, ModelUnknown
from ..load_progress import LoadProgress
from ..request_log import RequestLog
from ..stage_host import ShardsUnavailable, StageError, StageStorageFull
from .bodies import start_stream
from .parse import ApiCall, ApiError
from .service import Model, ModelRunner

log = logging.getLogger("omninode_shim.http")


def as_api_error(exc: BaseException) -> ApiError | None:
    """The HTTP status and message for a failure of ours; None for a bug (a plain 500).

    Expected failures get their own status: a chat template that fails, 400; a full disk,
    507 Insufficient Storage; a shard that no peer could supply intact, 502 Bad Gateway.
    A coordinator reports a stage's failure as text (a peer sends only its message), so a
    CoordinatorError is read for the markers those stage errors' messages start with.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestError | ChatTemplateError):
        return ApiError(400, str(exc))
    if isinstance(exc, ModelUnknown | ModelNotFound):
        return ApiError(404, str(exc))
    if isinstance(exc, Busy):
        return ApiError(503, str(exc))
    if isinstance(exc, StageStorageFull) or is_disk_full(exc):
        return ApiError(507, str(exc))
    if isinstance(exc, ShardsUnavailable | TransferError):
        return ApiError(502, str(exc))
    if isinstance(exc, CoordinatorError | StageError):
        text = str(exc)
        if StageStorageFull.MARKER in text:
            return ApiError(507, text)
        if ShardsUnavailable.MARKER in text:
            return ApiError(502, text)
        return ApiError(500, text)
    return None


def raise_as_api_error(exc: Exception) -> NoReturn:
    """Re-raise ``exc`` (being handled) as its ApiError, or as it is if it is a bug."""
    err = as_api_error(exc)
    if err is None:
        raise exc
    raise err from exc


async def resolve_name(runner: ModelRunner, name: str) -> tuple[str, Model]:
    """The name that resolves (``smollm2:latest`` is the alias ``smollm2``) and its model."""
    try:
        return name, await runner.resolve(name)
    except ModelUnknown:
        if not name.endswith(":latest"):
            raise
        base = name.removesuffix(":latest")
        return base, await runner.resolve(base)


async def resolve_for_api(runner: ModelRunner, name: str) -> tuple[str, Model]:
    """``resolve_name`` with its failures as ApiError (404 for an unknown model)."""
    try:
        return await resolve_name(runner, name)
    except Exception as exc:
        raise_as_api_error(exc)


@dataclass
class Run:
    name: str  # the name the client used, echoed back
    first: Chunk
    rest: AsyncIterator[Chunk]
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    model: Model | None = None  # its tokenizer writes logprobs' tokens
    # with logprobs: every generated token's so far, and the prompt's (echo)
    scored: list[TokenLogprob] = field(default_factory=list)
    prompt_scored: list[TokenLogprob] = field(default_factory=list)

    async def chunks(self) -> AsyncIterator[Chunk]:
        self._note(self.first)
        yield self.first
        if not self.first.done:
            async for chunk in self.rest:
                self._note(chunk)
                yield chunk

    def _note(self, chunk: Chunk) -> None:
        self.scored += chunk.logprobs
        self.prompt_scored += chunk.prompt_logprobs

    async def aclose(self) -> None:
        """Stop the generation (its slot, its sequence on every stage); again is a no-op."""
        await self.rest.aclose()  # type: ignore[attr-defined]

    async def collect(self) -> tuple[str, Chunk]:
        """The whole text and the final chunk (``"stream": false``); ApiError on failure."""
        parts: list[str] = []
        try:
            async for chunk in self.chunks():
                parts.append(chunk.text)
                if chunk.done:
                    return "".join(parts), chunk
        except Exception as exc:
            raise_as_api_error(exc)
        finally:
            await self.aclose()
        raise ApiError(500, "generation ended without its final chunk")

    async def pump(
        self,
        emit: Callable[[Chunk], Awaitable[None]],
        fail: Callable[[str], Awaitable[None]],
    ) -> bool:
        """Hand every chunk to ``emit``. The response has started, so a failure can only be
        told by ``fail`` (the stream's last message). False if the client went away."""
        try:
            async for chunk in self.chunks():
                await emit(chunk)
        except ConnectionResetError:
            log.info("client of %s went away mid-stream", self.name)
            return False
        except Exception as exc:
            err = as_api_error(exc)
            if err is None:
                log.exception("generation failed")
            with contextlib.suppress(ConnectionResetError):
                await fail(err.message if err else "internal error (see the shim's log)")
        finally:
            await self.aclose()
        return True

    def durations_ns(self) -> dict[str, int]:
        """Ollama's final-object durations, in nanoseconds."""
        t = self.timings

        def ns(seconds: float) -> int:
            return int(seconds * 1e9)

        return {
            "total_duration": ns(time.perf_counter() - self.started),
            "load_duration": ns(t.get("load_s", 0.0)),
            "prompt_eval_duration": ns(t.get("prefill_s", 0.0)),
            "eval_duration": ns(t.get("decode_s", 0.0)),
        }


class EarlyStream:
    """A streamed response that starts before its first chunk if the model has to be loaded:
    ``progress`` starts it and writes each report of the load (``show``: the adapter's form),
    ``fail`` tells a failure after that inside it (``show_error``)."""

    def __init__(
        self,
        request: web.Request,
        content_type: str,
        show: Callable[[web.StreamResponse, LoadProgress], Awaitable[None]],
        show_error: Callable[[web.StreamResponse, str], Awaitable[None]],
    ) -> None:
        self.request, self.content_type = request, content_type
        self.show, self.show_error = show, show_error
        self.response: web.StreamResponse | None = None

    async def started(self) -> web.StreamResponse:
        if self.response is None:
            self.response = await start_stream(self.request, self.content_type)
        return self.response

    async def progress(self, report: LoadProgress) -> None:
        await self.show(await self.started(), report)

    async def fail(self, exc: Exception) -> web.StreamResponse:
        response = await self.started()
        err = as_api_error(exc)
        if err is None:
            log.error("generation failed", exc_info=exc)
        with contextlib.suppress(ConnectionResetError):
            await self.show_error(
                response, err.message if err else "internal error (see the shim's log)"
            )
            await response.write_eof()
        return response


async def start_run(
    runner: ModelRunner,
    call: ApiCall,
    requests: RequestLog | None = None,
    early: EarlyStream | None = None,
) -> Run | web.StreamResponse:
    """Start ``call`` and wait for its first chunk; ApiError if it fails before that. The
    generation is counted in ``requests`` (the cluster page's list) when given. With
    ``early``, the model's load (if it has to be loaded) is reported in a response started
    meanwhile; a failure after that ends it, and is what this returns."""
    assert call.request is not None
    started = time.perf_counter()
    resolved, model = await resolve_for_api(runner, call.model)
    timings: dict[str, float] = {}
    gen = runner.generate(replace(call.request, model=resolved), timings, call.keep_alive,
                          early.progress if early is not None else None)  # fmt: skip
    if requests is not None:
        gen = requests.watch(resolved, "http", gen, timings)
    try:
        first = await gen.__anext__()
    except Exception as exc:
        await gen.aclose()
        if early is not None and early.response is not None:
            return await early.fail(exc)
        raise_as_api_error(exc)
    return Run(call.model, first, gen, timings, started, model)
