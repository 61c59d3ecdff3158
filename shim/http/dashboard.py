"""The cluster page: ``GET /ui`` (plain HTML, CSS and JS shipped in the package, shim/http/ui/;
nothing fetched from elsewhere) and ``GET /ui/events``, server-sent events carrying the node's
snapshot (shim/snapshot.py) as one JSON ``data:`` line about every second.

The API token, when set, guards /ui and /ui/events like every route; a browser cannot put an
Authorization header on an EventSource, so these two also take it as ``?token=`` (server.py's
guard compares it in constant time). The page's script and style hold no data and are open.
"""

from __future__ import annotations

import asyncio
import json
from importlib import resources

from aiohttp import web

from .service import SERVICE_KEY

EVENT_INTERVAL_S = 1.0
PAGE = "/ui"
EVENTS = "/ui/events"
ASSETS = {"/ui/app.js": "application/javascript", "/ui/style.css": "text/css"}
TOKEN_PATHS = frozenset({PAGE, EVENTS})  # these take ?token= as well as the header
HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def add_routes(app: web.Application) -> None:
    app.router.add_get(PAGE, page)
    app.router.add_get(EVENTS, events)
    for path in ASSETS:
        app.router.add_get(path, asset)


def _file(name: str) -> bytes:
    return resources.files(__package__).joinpath("ui").joinpath(name).read_bytes()


async def page(request: web.Request) -> web.Response:
    return web.Response(body=_file("index.html"), content_type="text/html", charset="utf-8",
                        headers=HEADERS)  # fmt: skip


async def asset(request: web.Request) -> web.Response:
    name = request.path.rsplit("/", 1)[1]
    return web.Response(body=_file(name), content_type=ASSETS[request.path], charset="utf-8",
                        headers=HEADERS)  # fmt: skip


async def events(request: web.Request) -> web.StreamResponse:
    """A snapshot now and every EVENT_INTERVAL_S until the client goes away: its handler is
    cancelled then (the server's handler_cancellation), or its next write fails."""
    snapshot = request.app[SERVICE_KEY].snapshot
    if snapshot is None:
        raise web.HTTPNotFound()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **HEADERS})
    await response.prepare(request)
    await response.write(b"retry: 2000\n\n")  # the browser reconnects after 2 s if cut off
    while True:
        body = json.dumps(snapshot(), separators=(",", ":"), default=str)
        try:
            await response.write(f"data: {body}\n\n".encode())
        except (ConnectionResetError, RuntimeError):  # gone, or the transport closed
            break
        if request.transport is None or request.transport.is_closing():
            break
        await asyncio.sleep(EVENT_INTERVAL_S)
    return response
