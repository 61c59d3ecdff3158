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
from typing import Any

from aiohttp import web

from llm_omninode.backend.generate import Chunk

from ..load_progress import LoadProgress
from . import listing
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

    def __init__(self, run: Run, chat: bool) -> None:
        self.run, self.chat = run, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, chunked: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        if chunked and self.chat:
            kind += ".chunk"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.run.name,
                "system_fingerprint": "omninode"}  # fmt: skip

    def whole(self, text: str, last: Chunk) -> dict[str, Any]:
        finish = _FINISH.get(last.done_reason or "stop", "stop")
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head(False), "choices": [choice], "usage": _usage(last)}

    def delta(self, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
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
        shape = _Shape(run, chat)
        if early is None:
            text, last = await run.collect()
            return web.json_response(shape.whole(text, last))
        response = await early.started()
        first = True

        async def emit(chunk: Chunk) -> None:
            nonlocal first
            if chunk.done:
                finish = _FINISH.get(chunk.done_reason or "stop", "stop")
                await write_sse(response, shape.delta(None if chat else "", finish, first))
                if call.include_usage:
                    await write_sse(response, shape.usage_only(chunk))
                await write_sse(response, "[DONE]")
            elif chunk.text:
                await write_sse(response, shape.delta(chunk.text, None, first))
                first = False

        async def fail(message: str) -> None:
            await write_sse(response, {"error": {"message": message, "type": "api_error"}})

        if await run.pump(emit, fail):
            with contextlib.suppress(ConnectionResetError):
                await response.write_eof()
        return response
