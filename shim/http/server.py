"""The shim's HTTP endpoint: Ollama's API (http/ollama.py) and OpenAI's (http/openai.py).

aiohttp runs on the node's own event loop, beside QUIC, so a handler drives the coordinator
directly. Here: listening, the optional bearer token, reading a JSON body as hostile input
(size, UTF-8, nesting, an object), errors as JSON (Ollama's ``{"error": "..."}``; OpenAI's
``{"error": {"message": ...}}`` under /v1) whatever went wrong, and streaming helpers.
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .parse import ApiError

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger("omninode_shim.http")

DEFAULT_API_PORT = 11434  # Ollama's: clients find us where they look for it
MAX_BODY = 16 * 1024 * 1024  # a request's text is capped at 8 MiB; JSON escaping may double it
OPEN_PATHS = frozenset({"/"})  # "is it running?" needs no token
STOP_GRACE = 1.0  # seconds a stopping node lets HTTP handlers finish
NODE_KEY: web.AppKey[Node] = web.AppKey("node", object)  # type: ignore[arg-type]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_API_PORT
    token: str | None = None


CONFIG_KEY: web.AppKey[ApiConfig] = web.AppKey("config", ApiConfig)


class ApiStartError(OSError):
    """The API cannot listen where it was told to."""


def iso(ts: float) -> str:
    """Ollama's timestamps: RFC 3339 in UTC."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


def now_iso() -> str:
    return iso(time.time())


def is_openai(request: web.Request) -> bool:
    return request.path.startswith("/v1/")


def error_response(request: web.Request, status: int, message: str) -> web.Response:
    if is_openai(request):
        kind = "invalid_request_error" if status < 500 else "api_error"
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": None,
                                          "code": None}}  # fmt: skip
    else:
        body = {"error": message}
    return web.json_response(body, status=status)


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


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Token check, then every failure as a JSON error; the server itself never goes down."""
    token = request.app[CONFIG_KEY].token
    if token and request.path not in OPEN_PATHS:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return error_response(request, 401, "unauthorized: send Authorization: Bearer TOKEN")
    try:
        return await handler(request)
    except ApiError as exc:  # a refusal we expected: one line, no traceback
        level = logging.WARNING if exc.status >= 500 else logging.INFO
        log.log(level, "%s %s: %d %.2000s", request.method, request.path, exc.status,
                " ".join(exc.message.split()))  # fmt: skip
        return error_response(request, exc.status, exc.message)
    except web.HTTPException as exc:  # aiohttp's own: unknown route, wrong method
        if exc.status < 400:
            raise
        message = "not found" if exc.status == 404 else exc.reason
        return error_response(request, exc.status, f"{message}: {request.method} {request.path}")
    except ConnectionResetError:
        raise  # the client went away: nobody to answer
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(request, 500, "internal error (see the shim's log)")


def build_app(node: Node, config: ApiConfig) -> web.Application:
    from . import ollama, openai

    app = web.Application(middlewares=[_guard], client_max_size=MAX_BODY)
    app[NODE_KEY] = node
    app[CONFIG_KEY] = config
    ollama.add_routes(app)
    openai.add_routes(app)
    return app


class ApiServer:
    def __init__(self, node: Node, config: ApiConfig) -> None:
        self.config = config
        self.app = build_app(node, config)
        self.runner: web.AppRunner | None = None
        self.port = config.port

    async def start(self) -> None:
        # handler_cancellation: a client that goes away (before its first byte, queued, during
        # a load) cancels its handler, so its slot and sequences are freed at once; a stopping
        # node waits at most STOP_GRACE for handlers to end
        self.runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=STOP_GRACE,
        )
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.config.host, self.config.port)
        try:
            await site.start()
        except OSError as exc:
            await self.runner.cleanup()
            where = f"{self.config.host}:{self.config.port}"
            if exc.errno == errno.EADDRINUSE:
                raise ApiStartError(
                    f"HTTP API: {where} is already in use (is Ollama or another shim running?); "
                    "choose another with --api-port, or --no-api"
                ) from exc
            raise ApiStartError(f"HTTP API: cannot listen on {where}: {exc.strerror}") from exc
        sockets = site._server.sockets if site._server else []  # type: ignore[attr-defined]
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("HTTP API (Ollama, OpenAI) on http://%s:%d%s", self.config.host, self.port,
                 " (token required)" if self.config.token else "")  # fmt: skip

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


# ---- streaming -------------------------------------------------------------------------------
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
