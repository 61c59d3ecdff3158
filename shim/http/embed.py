"""The embedding routes: Ollama's /api/embed and legacy /api/embeddings, OpenAI's
/v1/embeddings. Each input is embedded over the model's plan (shim/embedding.py, through
``ApiService.embedder``); bodies are parsed by embed_parse.py."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from aiohttp import web

from .bodies import read_json
from .embed_parse import (
    EmbedCall,
    finish,
    openai_item,
    parse_ollama_embed,
    parse_ollama_embeddings,
    parse_openai_embeddings,
)
from .parse import ApiError
from .run import raise_as_api_error, resolve_for_api
from .service import SERVICE_KEY


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/embed", api_embed)
    app.router.add_post("/api/embeddings", api_embeddings)
    app.router.add_post("/v1/embeddings", v1_embeddings)


async def _run(request: web.Request, call: EmbedCall) -> tuple[list[np.ndarray], int, float]:
    """The call's finished vectors, its prompt tokens and load seconds; ApiError on failure.
    No inputs: the model is only loaded (Ollama's way to load one)."""
    service = request.app[SERVICE_KEY]
    if service.embedder is None:
        raise ApiError(501, "this node does not serve embeddings")
    resolved, _ = await resolve_for_api(service.runner, call.model)
    t0 = time.perf_counter()
    try:
        if not call.inputs:
            await service.runner.load(resolved, call.keep_alive)
            return [], 0, time.perf_counter() - t0
        done = await service.embedder.embed(
            resolved, call.inputs, truncate=call.truncate, keep_alive=call.keep_alive,
            num_ctx=call.num_ctx,
        )  # fmt: skip
    except Exception as exc:
        raise_as_api_error(exc)
    return [finish(v, call) for v in done.vectors], done.prompt_tokens, done.load_s


async def api_embed(request: web.Request) -> web.Response:
    started = time.perf_counter()
    call = parse_ollama_embed(await read_json(request))
    vectors, tokens, load_s = await _run(request, call)
    return web.json_response({
        "model": call.model,
        "embeddings": [v.tolist() for v in vectors],
        "total_duration": int((time.perf_counter() - started) * 1e9),
        "load_duration": int(load_s * 1e9),
        "prompt_eval_count": tokens,
    })  # fmt: skip


async def api_embeddings(request: web.Request) -> web.Response:
    call = parse_ollama_embeddings(await read_json(request))
    vectors, _, _ = await _run(request, call)
    return web.json_response({"embedding": vectors[0].tolist() if vectors else []})


async def v1_embeddings(request: web.Request) -> web.Response:
    call = parse_openai_embeddings(await read_json(request))
    vectors, tokens, _ = await _run(request, call)
    data: list[dict[str, Any]] = [openai_item(v, i, call.base64) for i, v in enumerate(vectors)]
    return web.json_response({
        "object": "list",
        "data": data,
        "model": call.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })  # fmt: skip
