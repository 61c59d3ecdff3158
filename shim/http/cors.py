"""Cross-origin requests from browser apps, as Ollama allows them: pages served from this
machine (localhost, 127.0.0.1, 0.0.0.0, any port), desktop and editor webviews (app://,
file://, tauri://, vscode-webview://, vscode-file://), the API's own address, and the
origins ``OMNI_ORIGINS`` adds (comma-separated, ``*`` wildcards, as OLLAMA_ORIGINS). A
preflight (OPTIONS) is answered here, before the token check (browsers send no credentials
on it); any request from another origin is refused with 403.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from fnmatch import fnmatchcase

from aiohttp import web

from llm_omninode import settings

_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")
DEFAULT_ORIGINS = (
    *(f"{scheme}://{host}{port}" for scheme in ("http", "https") for host in _HOSTS
      for port in ("", ":*")),
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*",
)  # fmt: skip
METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
# what Ollama's and OpenAI's client libraries send from a browser
HEADERS = (
    "Authorization, Content-Type, User-Agent, Accept, X-Requested-With, "
    "X-Stainless-Lang, X-Stainless-Package-Version, X-Stainless-OS, X-Stainless-Arch, "
    "X-Stainless-Runtime, X-Stainless-Runtime-Version, X-Stainless-Async, "
    "X-Stainless-Retry-Count, X-Stainless-Timeout, OpenAI-Organization, OpenAI-Project"
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def allowed(origin: str, own: str, extra: Iterable[str] = ()) -> bool:
    """Whether a browser page from ``origin`` may call this API (``own``: its address)."""
    if origin == own:
        return True
    return any(fnmatchcase(origin.lower(), p.lower()) for p in (*DEFAULT_ORIGINS, *extra))


@web.middleware
async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    if origin is None:  # not a browser's cross-origin call
        return await handler(request)
    if not allowed(origin, f"{request.scheme}://{request.host}", settings.origins()):
        return web.json_response({"error": f"origin {origin} is not allowed"}, status=403)
    cors_headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(status=204, headers={
            **cors_headers, "Access-Control-Allow-Methods": METHODS,
            "Access-Control-Allow-Headers": HEADERS, "Access-Control-Max-Age": "600",
        })  # fmt: skip
    response = await handler(request)
    response.headers.update(cors_headers)
    return response
