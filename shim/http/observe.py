"""What the node shows of itself over HTTP: /metrics in Prometheus's text format."""

from __future__ import annotations

from aiohttp import web

from .service import SERVICE_KEY


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)


async def metrics(request: web.Request) -> web.Response:
    render = request.app[SERVICE_KEY].metrics
    if render is None:
        raise web.HTTPNotFound()
    body, content_type = render()
    # prometheus_client's type carries its own charset and version parameters
    return web.Response(body=body, headers={"Content-Type": content_type})
