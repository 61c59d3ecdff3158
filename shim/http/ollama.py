"""Ollama's HTTP API, as Ollama documents it, served by every shim.

Generation goes through the coordinator like any other request, so a shim that holds no layer
of a model serves it through the ring. Durations are nanoseconds; streams are NDJSON, and a
failure after the stream started is its last line, ``{"error": "..."}``. While the model loads
first, a stream's lines have no text and an ``omninode_progress`` field (the load's progress).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from llm_omninode import __version__
from llm_omninode.backend import describe
from llm_omninode.backend.generate import Chunk
from llm_omninode.backend.logprobs import TokenLogprob
from llm_omninode.backend.pooling import has_pooling
from llm_omninode.backend.registry import ModelNotFound, check_alias

from ..load_progress import LoadProgress
from . import listing
from . import logprobs as LP
from .bodies import iso, now_iso, read_json, write_ndjson
from .parse import (
    ApiCall,
    ApiError,
    get_bool,
    get_model,
    parse_ollama_chat,
    parse_ollama_generate,
)
from .pull import pull
from .run import EarlyStream, Run, raise_as_api_error, resolve_for_api, start_run
from .service import SERVICE_KEY, ModelRunner

# a streamed line while the model loads first: no text, done false, and this field (the
# load's progress: shim/load_progress.py), which Ollama's clients ignore
PROGRESS_FIELD = "omninode_progress"
# the Ollama API level these routes follow; clients compare it against their minimums
OLLAMA_API_VERSION = "0.12.0"


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", root)  # add_get answers HEAD too
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_post("/api/show", show)
    app.router.add_get("/api/ps", ps)
    app.router.add_post("/api/generate", generate)
    app.router.add_post("/api/chat", chat)
    app.router.add_post("/api/pull", pull)
    app.router.add_delete("/api/delete", delete)
    app.router.add_post("/api/copy", copy)


async def root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_API_VERSION, "omninode": __version__})


# ---- models ----------------------------------------------------------------------------------
async def tags(request: web.Request) -> web.Response:
    rows = await listing.cluster_models(request.app[SERVICE_KEY])
    return web.json_response({"models": [r.tag_row() for r in rows]})


async def show(request: web.Request) -> web.Response:
    body = await read_json(request)
    service = request.app[SERVICE_KEY]
    name = get_model(body, legacy_name=True)
    verbose = get_bool(body, "verbose", False)
    _, model = await resolve_for_api(service.runner, name)
    manifest = model.manifest
    template = "" if model.template.is_fallback else model.template.source
    parameters = listing.parameters_text(model.tokenizer)
    modelfile = f"# Modelfile of {name} (OmniNode)\nFROM {manifest.model_id}\n"
    if template:
        modelfile += f'TEMPLATE """{template}"""\n'
    modelfile += "".join(f"PARAMETER {line}\n" for line in parameters.splitlines())
    return web.json_response({
        "license": str(manifest.metadata.get("general.license", "")),
        "modelfile": modelfile,
        "parameters": parameters,
        "template": template,
        "details": describe.details(manifest),
        "model_info": listing.model_info(manifest, verbose),
        # as Ollama: a GGUF that says how to pool is an embedding model, others complete
        "capabilities": ["embedding"] if has_pooling(manifest.metadata) else ["completion"],
        "modified_at": iso(listing.modified_time(service, manifest.model_id)),
    })  # fmt: skip


async def ps(request: web.Request) -> web.Response:
    return web.json_response({"models": await listing.running_models(request.app[SERVICE_KEY])})


async def delete(request: web.Request) -> web.Response:
    from llm_omninode.backend.library import remove_model

    body = await read_json(request)
    service = request.app[SERVICE_KEY]
    name = get_model(body, legacy_name=True)
    for candidate in (name, name.removesuffix(":latest")):
        try:
            model_id = service.registry.resolve(candidate)
        except ModelNotFound:
            continue
        _, gone = remove_model(service.registry, candidate)
        if gone:
            with contextlib.suppress(Exception):  # unloading is best effort; the model is gone
                await service.runner.unload(model_id)
            service.runner.forget(model_id)
        return web.Response(status=200)
    raise ApiError(404, f"model {name!r} not found on this node")


async def copy(request: web.Request) -> web.Response:
    body = await read_json(request)
    service = request.app[SERVICE_KEY]
    source, destination = body.get("source"), body.get("destination")
    if not (isinstance(source, str) and source and isinstance(destination, str) and destination):
        raise ApiError(400, "source and destination must be non-empty strings")
    _, model = await resolve_for_api(service.runner, source)
    try:
        alias = check_alias(destination.removesuffix(":latest"))
    except ValueError as exc:
        raise ApiError(400, f"destination: {exc}") from exc
    service.registry.set_alias(alias, model.manifest.model_id)
    return web.Response(status=200)


# ---- generation ------------------------------------------------------------------------------
async def generate(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_ollama_generate(await read_json(request)), chat=False)


async def chat(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_ollama_chat(await read_json(request)), chat=True)


def _body(name: str, text: str, chat: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {"model": name, "created_at": now_iso()}
    if chat:
        doc["message"] = {"role": "assistant", "content": text}
    else:
        doc["response"] = text
    return doc


def _final(run: Run, last: Chunk, text: str, call: ApiCall, chat: bool) -> dict[str, Any]:
    doc = {
        **_body(run.name, text, chat),
        "done": True,
        "done_reason": last.done_reason or "stop",
        **run.durations_ns(),
        "prompt_eval_count": last.prompt_tokens,
        "eval_count": last.completion_tokens,
    }
    assert call.request is not None
    if not chat and not call.request.raw:  # as Ollama: the ids to continue from, unless raw
        doc["context"] = list(last.context)
    return doc


def _scored(run: Run, call: ApiCall, scored: Sequence[TokenLogprob]) -> dict[str, Any]:
    """Ollama's ``logprobs`` (>= 0.12) of these tokens, when they were asked for."""
    if call.request is None or not call.request.logprobs or run.model is None:
        return {}
    return {"logprobs": LP.entries(run.model.tokenizer, scored)}


async def _serve(request: web.Request, call: ApiCall, chat: bool) -> web.StreamResponse:
    service = request.app[SERVICE_KEY]
    if call.request is None:
        return await _load_or_unload(service.runner, call, chat)
    early = None
    if call.stream:

        async def show(response: web.StreamResponse, report: LoadProgress) -> None:
            line = {**_body(call.model, "", chat), "done": False, PROGRESS_FIELD: report.row()}
            await write_ndjson(response, line)

        async def show_error(response: web.StreamResponse, message: str) -> None:
            await write_ndjson(response, {"error": message})

        early = EarlyStream(request, "application/x-ndjson", show, show_error)
    run = await start_run(service.runner, call, service.requests, early)
    if not isinstance(run, Run):  # the load failed after its progress was streamed
        return run
    async with contextlib.aclosing(run):  # whatever happens to the client, the run ends
        if early is None:
            text, last = await run.collect()
            final = _final(run, last, text, call, chat)
            return web.json_response({**final, **_scored(run, call, run.scored)})
        response = await early.started()

        async def emit(chunk: Chunk) -> None:
            scored = _scored(run, call, chunk.logprobs)
            if chunk.done:
                await write_ndjson(response, {**_final(run, chunk, "", call, chat), **scored})
            elif chunk.text or scored:
                body = _body(run.name, chunk.text, chat)
                await write_ndjson(response, {**body, "done": False, **scored})

        async def fail(message: str) -> None:
            await write_ndjson(response, {"error": message})

        if await run.pump(emit, fail):
            with contextlib.suppress(ConnectionResetError):
                await response.write_eof()
        return response


async def _load_or_unload(runner: ModelRunner, call: ApiCall, chat: bool) -> web.Response:
    """A body with a model and nothing to say: load it, or with keep_alive 0, unload it."""
    name, model = await resolve_for_api(runner, call.model)
    try:
        if call.keep_alive == 0:
            await runner.unload(model.manifest.model_id)
            reason = "unload"
        else:
            await runner.load(name, call.keep_alive)
            reason = "load"
    except Exception as exc:
        raise_as_api_error(exc)
    return web.json_response({**_body(call.model, "", chat), "done": True, "done_reason": reason})
