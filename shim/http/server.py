"""The shim's HTTP endpoint: Ollama's API (http/ollama.py) and OpenAI's (http/openai.py).

aiohttp runs on the node's own event loop, beside QUIC, so a handler drives the coordinator
directly (through the ``ApiService`` the node hands over, http/service.py). Here: listening,
the optional bearer token, and errors as JSON (Ollama's ``{"error": "..."}``; OpenAI's
``{"error": {"message": ...}}`` under /v1) whatever went wrong. Bodies in and out: bodies.py.
"""

from __future__ import annotations

import errno
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from . import dashboard, embed, observe, ollama, openai
from .bodies import MAX_BODY
from .cors import cors
from .parse import ApiError
from .service import SERVICE_KEY, ApiService

log = logging.getLogger("omninode_shim.http")

DEFAULT_API_PORT = 11434  # Ollama's: clients find us where they look for it
# "is it running?" needs no token, nor the cluster page's script and style (they hold no data)
OPEN_PATHS = frozenset({"/", *dashboard.ASSETS})
STOP_GRACE = 1.0  # seconds a stopping node lets HTTP handlers finish

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_API_PORT
    token: str | None = None


CONFIG_KEY: web.AppKey[ApiConfig] = web.AppKey("config", ApiConfig)


class ApiStartError(OSError):
    """The API cannot listen where it was told to."""


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


def _token_ok(request: web.Request, token: str) -> bool:
    """The bearer token, compared in constant time; the cluster page and its events also take
    it as ``?token=`` (a browser's EventSource cannot send a header)."""
    want = token.encode()
    given = request.headers.get("Authorization", "")
    if hmac.compare_digest(given.encode(), b"Bearer " + want):
        return True
    query = request.query.get("token") if request.path in dashboard.TOKEN_PATHS else None
    return query is not None and hmac.compare_digest(query.encode(), want)


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Token check, then every failure as a JSON error; the server itself never goes down."""
    token = request.app[CONFIG_KEY].token
    if token and request.path not in OPEN_PATHS and not _token_ok(request, token):
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


def build_app(service: ApiService, config: ApiConfig) -> web.Application:
    app = web.Application(middlewares=[cors, _guard], client_max_size=MAX_BODY)
    app[SERVICE_KEY] = service
    app[CONFIG_KEY] = config
    ollama.add_routes(app)
    openai.add_routes(app)
    observe.add_routes(app)
    dashboard.add_routes(app)
    embed.add_routes(app)
    return app


class ApiServer:
    def __init__(self, service: ApiService, config: ApiConfig) -> None:
        self.config = config
        self.app = build_app(service, config)
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
