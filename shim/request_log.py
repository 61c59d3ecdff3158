"""The generations coordinated here, running and recent, as the cluster page shows them.

``RequestLog.watch`` wraps a generation's chunks where they pass (the HTTP adapters' runs,
shim/http/run.py, and the ``generate`` requests of ``llm``, shim/node.py): it counts each
chunk's tokens as it goes by and keeps the final timings, so the page reads each running
request's tokens a second and the last few requests' outcomes without the coordinator's help.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from llm_omninode.backend.generate import Chunk

RATE_WINDOW_S = 3.0  # a running request's tokens/s: over its last few seconds
RECENT = 20  # finished requests kept


@dataclass
class Entry:
    """One generation: when it started, the tokens seen so far, how it ended."""

    id: int
    model: str
    via: str  # "http" | "llm"
    started: float = field(default_factory=time.time)
    first_token: float | None = None  # time.time() of the first chunk with tokens
    tokens: int = 0
    prompt_tokens: int = 0
    finished: float | None = None
    outcome: str = ""  # "stop", "length", "cancelled", "error: ..."
    timings: dict[str, float] = field(default_factory=dict)  # load_s, prefill_s, decode_s
    samples: deque[tuple[float, int]] = field(default_factory=deque)  # (monotonic, tokens)

    def note(self, chunk: Chunk) -> None:
        now = time.monotonic()
        if chunk.token_ids and self.first_token is None:
            self.first_token = time.time()
        self.tokens += len(chunk.token_ids)
        if chunk.done:
            self.tokens = max(self.tokens, chunk.completion_tokens)
            self.prompt_tokens = chunk.prompt_tokens
        self.samples.append((now, self.tokens))
        while len(self.samples) > 2 and now - self.samples[1][0] > RATE_WINDOW_S:
            self.samples.popleft()

    def tokens_per_s(self) -> float | None:
        """Running: over the last few seconds, up to now (a stalled one falls to 0); finished:
        its completion tokens over its decode time."""
        if self.finished is not None:
            decode = self.timings.get("decode_s", 0.0)
            return self.tokens / decode if decode > 0 and self.tokens else None
        if not self.samples or self.first_token is None:
            return None
        t0, n0 = self.samples[0]
        elapsed = time.monotonic() - t0
        return (self.tokens - n0) / elapsed if elapsed > 0.05 else None

    def row(self) -> dict[str, Any]:
        rate = self.tokens_per_s()
        end = self.finished or time.time()
        first = None if self.first_token is None else round(self.first_token - self.started, 3)
        return {
            "id": self.id,
            "model": self.model,
            "via": self.via,
            "started": round(self.started, 3),
            "elapsed_s": round(end - self.started, 3),
            "first_token_s": first,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "tokens_per_s": None if rate is None else round(rate, 2),
            "outcome": self.outcome or ("running" if self.first_token else "waiting"),
            **{k: round(v, 3) for k, v in self.timings.items()},
        }


class RequestLog:
    def __init__(
        self, keep: int = RECENT, on_finish: Callable[[Entry], None] | None = None
    ) -> None:
        self.on_finish = on_finish  # told of each generation as it ends (the node's metrics)
        self.running: dict[int, Entry] = {}
        self.recent: deque[Entry] = deque(maxlen=keep)
        self._ids = itertools.count(1)

    async def watch(
        self,
        model: str,
        via: str,
        chunks: AsyncGenerator[Chunk, None],
        timings: dict[str, float] | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """``chunks``, unchanged, counted on the way; closing this closes them."""
        entry = Entry(next(self._ids), model, via)
        self.running[entry.id] = entry
        outcome = "cancelled"  # the consumer stopped before the last chunk (client gone)
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    entry.note(chunk)
                    if chunk.done:
                        outcome = chunk.done_reason or "stop"
                    yield chunk
        except Exception as exc:
            outcome = f"error: {str(exc)[:200] or type(exc).__name__}"
            raise
        finally:
            entry.outcome, entry.finished = outcome, time.time()
            entry.timings = dict(timings or {})
            self.running.pop(entry.id, None)
            self.recent.appendleft(entry)
            if self.on_finish is not None:
                self.on_finish(entry)

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """Running requests (oldest first) and finished ones (newest first)."""
        return {
            "running": [e.row() for e in self.running.values()],
            "recent": [e.row() for e in self.recent],
        }
