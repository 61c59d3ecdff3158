"""OpenAI's chat and completions routes (/v1), as Ollama serves them, on every shim.

Streams are server-sent events ending with ``data: [DONE]``; a failure after the stream
started is an event ``{"error": {...}}`` before it. While the model loads first, the stream
carries the load's progress as SSE comments. Sampling fields OpenAI leaves unset keep
the model defaults Ollama uses, as Ollama's own /v1 does.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from llm_omninode.backend.generate import Chunk
from llm_omninode.backend.logprobs import TokenLogprob

from ..load_progress import LoadProgress
from . import listing
from . import logprobs as LP
from .bodies import read_json, write_sse
from .parse import ApiCall, ApiError, parse_openai_chat, parse_openai_completion
from .run import EarlyStream, Run, start_run
from .service import SERVICE_KEY

# a streamed request whose model loads first gets its progress as SSE comments
# (": omninode_progress {...}"), which SSE clients skip
PROGRESS_COMMENT = "omninode_progress"
# Ollama reports "length" and "stop"; OpenAI's names are the same
_FINISH = {"length": "length", "stop": "stop"}


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)


async def models(request: web.Request) -> web.Response:
    rows = await listing.cluster_models(request.app[SERVICE_KEY])
    data = [{"id": r.name, "object": "model", "created": int(r.modified), "owned_by": "omninode"}
            for r in rows]  # fmt: skip
    return web.json_response({"object": "list", "data": data})


async def model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    rows = await listing.cluster_models(request.app[SERVICE_KEY])
    for r in rows:
        if name in (r.name, r.name.removesuffix(":latest")):
            return web.json_response(
                {
                    "id": r.name,
                    "object": "model",
                    "created": int(r.modified),
                    "owned_by": "omninode",
                }
            )
    raise ApiError(404, f"model {name!r} not found")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    call = parse_openai_chat(await read_json(request))
    return await _serve(request, call, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    call = parse_openai_completion(await read_json(request))
    return await _serve(request, call, chat=False)


def _usage(last: Chunk) -> dict[str, int]:
    return {
        "prompt_tokens": last.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": last.prompt_tokens + last.completion_tokens,
    }


class _Shape:
    """The response objects of one call: ids, timestamps, and chat vs completion fields."""

    def __init__(self, run: Run, chat: bool, call: ApiCall) -> None:
        self.run, self.chat = run, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        request, model = call.request, run.model
        self.tokenizer = (
            None if model is None or request is None or not request.logprobs else (model.tokenizer)
        )
        self.sent = 0  # completions: characters of text sent so far (text_offset)

    def _head(self, chunked: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        if chunked and self.chat:
            kind += ".chunk"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.run.name,
                "system_fingerprint": "omninode"}  # fmt: skip

    def echoed(self, text: str, prompt: Sequence[TokenLogprob]) -> str:
        """A completion's text with the prompt the model saw before it (echo)."""
        if not prompt or self.tokenizer is None:
            return text
        return LP.prompt_text(self.tokenizer, [s.token for s in prompt]) + text

    def logprobs(self, text: str, scored: Sequence[TokenLogprob]) -> Any:
        """A choice's ``logprobs`` (None unless asked for); ``text`` is what this choice
        sends, after which a completion's offsets go on."""
        if self.tokenizer is None:
            return None
        if self.chat:
            return {"content": LP.entries(self.tokenizer, scored)}
        doc = LP.legacy(self.tokenizer, scored, self.sent)
        self.sent += len(text)
        return doc

    def whole(self, text: str, last: Chunk) -> dict[str, Any]:
        finish = _FINISH.get(last.done_reason or "stop", "stop")
        prompt, scored = self.run.prompt_scored, self.run.scored
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": self.logprobs(text, scored), "finish_reason": finish}  # fmt: skip
        else:
            text = self.echoed(text, prompt)
            logprobs = self.logprobs(text, [*prompt, *scored])
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {**self._head(False), "choices": [choice], "usage": _usage(last)}

    def delta(self, chunk: Chunk | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        text = None if chunk is None else chunk.text
        scored = () if chunk is None else chunk.logprobs
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": self.logprobs(text or "", scored),
                      "finish_reason": finish}  # fmt: skip
        else:
            prompt = () if chunk is None else chunk.prompt_logprobs
            text = self.echoed(text or "", prompt)
            logprobs = self.logprobs(text, [*prompt, *scored])
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {**self._head(True), "choices": [choice]}

    def usage_only(self, last: Chunk) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": _usage(last)}


async def _serve(request: web.Request, call: ApiCall, chat: bool) -> web.StreamResponse:
    service = request.app[SERVICE_KEY]
    early = None
    if call.stream:

        async def show(response: web.StreamResponse, report: LoadProgress) -> None:
            # an SSE comment: every SSE client skips it, so OpenAI's chunks stay as they are
            await response.write(f": {PROGRESS_COMMENT} {json.dumps(report.row())}\n\n".encode())

        async def show_error(response: web.StreamResponse, message: str) -> None:
            await write_sse(response, {"error": {"message": message, "type": "api_error"}})

        early = EarlyStream(request, "text/event-stream", show, show_error)
    run = await start_run(service.runner, call, service.requests, early)
    if not isinstance(run, Run):  # the load failed after its progress was streamed
        return run
    async with contextlib.aclosing(run):  # whatever happens to the client, the run ends
        shape = _Shape(run, chat, call)
        if early is None:
            text, last = await run.collect()
            return web.json_response(shape.whole(text, last))
        response = await early.started()
        first = True

        async def emit(chunk: Chunk) -> None:
            nonlocal first
            if chunk.done:
                finish = _FINISH.get(chunk.done_reason or "stop", "stop")
                scored = chunk.logprobs or chunk.prompt_logprobs
                last = chunk if scored or not chat else None  # chat: no content, unless scored
                await write_sse(response, shape.delta(last, finish, first))
                if call.include_usage:
                    await write_sse(response, shape.usage_only(chunk))
                await write_sse(response, "[DONE]")
            elif chunk.text or chunk.logprobs or chunk.prompt_logprobs:
                await write_sse(response, shape.delta(chunk, None, first))
                first = False

        async def fail(message: str) -> None:
            await write_sse(response, {"error": {"message": message, "type": "api_error"}})

        if await run.pump(emit, fail):
            with contextlib.suppress(ConnectionResetError):
                await response.write_eof()
        return response
