"""The cluster page's routes without a browser: /ui and its assets, /ui/events (a snapshot
about every second as server-sent events, a handler that ends when its client goes away), the
API token (a header everywhere, ``?token=`` on /ui and /ui/events only); and the request log
that feeds the page's tokens/s."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator

import aiohttp
import pytest
from aiohttp import web
from omninode_shim.http.server import ApiConfig, build_app
from omninode_shim.http.service import ApiService
from omninode_shim.request_log import RequestLog

from llm_omninode.backend.generate import Chunk

TOKEN = "s3cret-token"


class Snapshots:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict:
        self.calls += 1
        return {"at": 1.0, "name": "node0", "nodes": [], "models": [], "n": self.calls}


async def _serve(token: str | None, snapshots: Snapshots):
    service = ApiService(runner=None, registry=None, peer_aliases=None,  # type: ignore[arg-type]
                         snapshot=snapshots)  # fmt: skip
    runner = web.AppRunner(build_app(service, ApiConfig(token=token)), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def _first_event(response: aiohttp.ClientResponse) -> dict:
    async for line in response.content:
        if line.startswith(b"data: "):
            return json.loads(line[6:])
    raise AssertionError("no event")


def test_events_and_the_token_rule():
    async def main() -> None:
        snapshots = Snapshots()
        runner, url = await _serve(TOKEN, snapshots)
        try:
            async with aiohttp.ClientSession() as s:
                for path in ("/ui", "/ui/events", "/ui?token=wrong", "/ui/events?token=wrong",
                             f"/api/tags?token={TOKEN}", f"/metrics?token={TOKEN}"):  # fmt: skip
                    async with s.get(url + path) as r:
                        assert r.status == 401, path
                for path in ("/ui/app.js", "/ui/style.css", "/"):  # no data in them
                    async with s.get(url + path) as r:
                        assert r.status == 200, path
                async with s.get(f"{url}/ui?token={TOKEN}") as r:
                    assert r.status == 200 and r.content_type == "text/html"
                    page = await r.text()
                    assert "/ui/app.js" in page and "http" not in page.replace("http-equiv", "")
                auth = {"Authorization": f"Bearer {TOKEN}"}
                async with s.get(url + "/ui", headers=auth) as r:
                    assert r.status == 200
                async with s.get(f"{url}/ui/events?token={TOKEN}") as r:
                    assert r.status == 200 and r.content_type == "text/event-stream"
                    first = await _first_event(r)
                    second = await _first_event(r)
                    assert first["name"] == "node0" and second["n"] == first["n"] + 1
                # the client goes away: its handler ends, no snapshot is made for it again
                await asyncio.sleep(0.3)
                calls = snapshots.calls
                await asyncio.sleep(2.5)
                assert snapshots.calls == calls
        finally:
            await runner.cleanup()

    asyncio.run(main())


def test_events_without_a_token_and_without_a_snapshot():
    async def main() -> None:
        runner, url = await _serve(None, Snapshots())
        try:
            async with aiohttp.ClientSession() as s, s.get(url + "/ui/events") as r:
                assert (await _first_event(r))["name"] == "node0"
        finally:
            await runner.cleanup()
        service = ApiService(runner=None, registry=None, peer_aliases=None)  # type: ignore[arg-type]
        bare = web.AppRunner(build_app(service, ApiConfig()))
        await bare.setup()
        site = web.TCPSite(bare, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"http://127.0.0.1:{port}/ui/events") as r,
            ):
                assert r.status == 404
        finally:
            await bare.cleanup()

    asyncio.run(main())


async def _chunks(n: int, fail: bool = False) -> AsyncGenerator[Chunk, None]:
    for i in range(n):
        await asyncio.sleep(0.02)
        yield Chunk(f"t{i}", (i,))
    if fail:
        raise RuntimeError("stage lost")
    yield Chunk("", (), done=True, done_reason="length", prompt_tokens=5, completion_tokens=n)


def test_the_request_log_counts_tokens_and_outcomes():
    async def main() -> None:
        log = RequestLog(keep=2)
        timings = {"decode_s": 0.5}
        seen = []
        async for chunk in log.watch("smollm2", "http", _chunks(10), timings):
            seen.append(chunk)
            if len(seen) == 5:
                (running,) = log.snapshot()["running"]
                assert running["tokens"] == 5 and running["outcome"] == "running"
                assert running["tokens_per_s"] > 0
        (done,) = log.snapshot()["recent"]
        assert len(seen) == 11 and not log.running
        assert done["outcome"] == "length" and done["tokens"] == 10
        assert done["prompt_tokens"] == 5 and done["tokens_per_s"] == 20.0

        gen = log.watch("smollm2", "llm", _chunks(10))
        await gen.__anext__()
        await gen.aclose()  # the client went away
        assert log.snapshot()["recent"][0]["outcome"] == "cancelled"

        with pytest.raises(RuntimeError):
            async for _ in log.watch("smollm2", "llm", _chunks(2, fail=True)):
                pass
        recent = log.snapshot()["recent"]
        assert recent[0]["outcome"] == "error: stage lost" and len(recent) == 2

    asyncio.run(main())
