"""JSON in and out of the HTTP API: a request body read as hostile input (size, UTF-8,
nesting, an object), streamed answers (NDJSON, server-sent events), Ollama's timestamps."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from .parse import ApiError

MAX_BODY = 16 * 1024 * 1024  # a request's text is capped at 8 MiB; JSON escaping may double it


def iso(ts: float) -> str:
    """Ollama's timestamps: RFC 3339 in UTC."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def now_iso() -> str:
    return iso(time.time())


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; ApiError (413 or 400) for anything else."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(413, f"request body is larger than {MAX_BODY} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(413, f"request body is larger than {MAX_BODY} bytes") from exc
    if not raw.strip():
        raise ApiError(400, "request body is empty: send a JSON object")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not UTF-8 (byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise ApiError(400, f"invalid JSON: {exc.msg} at {where}") from exc
    except RecursionError as exc:  # "[[[[...": deeper than the parser's stack
        raise ApiError(400, "invalid JSON: nested too deeply") from exc
    if type(doc) is not dict:
        raise ApiError(400, "request body must be a JSON object")
    return doc


async def start_stream(request: web.Request, content_type: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": content_type,
                                           "Cache-Control": "no-cache"})  # fmt: skip
    await response.prepare(request)
    return response


async def write_ndjson(response: web.StreamResponse, doc: dict[str, Any]) -> None:
    await response.write(json.dumps(doc, ensure_ascii=False).encode("utf-8") + b"\n")


async def write_sse(response: web.StreamResponse, doc: dict[str, Any] | str) -> None:
    data = doc if isinstance(doc, str) else json.dumps(doc, ensure_ascii=False)
    await response.write(f"data: {data}\n\n".encode())
