"""What a model's first load tells the clients waiting for it: stages loaded, shard bytes
fetched.

The coordinator loads a plan's stages at once (shim/lifecycle.py ``ensure_ready``); each
stage reports here as its shards arrive (its own node's stage host, or a peer's ``stage.load``
stream) and when it is loaded. ``ProgressHub.loading`` sends the sum to every request waiting
for that model, at most every REPORT_EVERY seconds and once at the end, from the load's own
task: a listener that fails (its client went away) is dropped, the load goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("omninode_shim.progress")

REPORT_EVERY = 0.25  # seconds between two reports of one load
LISTENER_TIMEOUT = 10.0  # a listener slower than this (a client not reading) is dropped


@dataclass(frozen=True)
class LoadProgress:
    """A load under way: ``loaded`` of ``stages`` stages ready; ``fetched`` of ``total``
    shard bytes the stages lacked have arrived (``total`` grows as stages say what they lack)."""

    model: str  # the model id
    stages: int
    loaded: int
    fetched: int
    total: int

    def row(self) -> dict[str, object]:
        return {"status": "loading", "model": self.model, "stages": self.stages,
                "loaded": self.loaded, "fetched": self.fetched, "total": self.total}  # fmt: skip


Listener = Callable[[LoadProgress], Awaitable[None]]


@dataclass
class StageProgress:
    """One stage's share: its shard bytes (done, total) and whether it is loaded."""

    fetched: int = 0
    total: int = 0
    loaded: bool = False

    def bytes(self, done: int, total: int) -> None:
        self.fetched, self.total = max(self.fetched, done), max(self.total, total)


@dataclass
class LoadWatch:
    model: str
    stages: list[StageProgress]

    def stage(self, i: int) -> StageProgress:
        return self.stages[i]

    def now(self) -> LoadProgress:
        return LoadProgress(
            self.model, len(self.stages), sum(s.loaded for s in self.stages),
            sum(s.fetched for s in self.stages), sum(s.total for s in self.stages),
        )  # fmt: skip


class ProgressHub:
    """The requests waiting for each model's load (``listen``), and the loads that report to
    them (``loading``)."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[Listener]] = {}

    @contextlib.contextmanager
    def listen(self, model_id: str, listener: Listener | None):
        """While inside, ``listener`` hears every load of ``model_id``."""
        if listener is None:
            yield
            return
        self._listeners.setdefault(model_id, []).append(listener)
        try:
            yield
        finally:
            listeners = self._listeners.get(model_id, [])
            with contextlib.suppress(ValueError):
                listeners.remove(listener)
            if not listeners:
                self._listeners.pop(model_id, None)

    @contextlib.asynccontextmanager
    async def loading(self, model_id: str, stages: int) -> AsyncIterator[LoadWatch]:
        """A load of ``stages`` stages: reported now, every REPORT_EVERY seconds while it
        changes, and once when it ends (loaded or not)."""
        watch = LoadWatch(model_id, [StageProgress() for _ in range(stages)])
        done = asyncio.Event()

        async def report() -> None:
            last = None
            while True:
                now = watch.now()
                if now != last:
                    last = now
                    await self._tell(model_id, now)
                if done.is_set():
                    return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), REPORT_EVERY)

        reporter = asyncio.ensure_future(report())
        try:
            yield watch
        finally:
            done.set()  # not cancelled: a listener's write is never cut in half
            await reporter

    async def _tell(self, model_id: str, progress: LoadProgress) -> None:
        for listener in list(self._listeners.get(model_id, [])):
            try:
                await asyncio.wait_for(listener(progress), LISTENER_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - its client went away: the load goes on
                log.debug("progress listener dropped: %r", exc)
                with contextlib.suppress(ValueError):
                    self._listeners.get(model_id, []).remove(listener)
