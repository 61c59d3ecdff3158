"""The sequences a stage holds, by id, whatever engine keeps their KV caches: bounded in
count, a context bound per sequence, prefix adoption, idle eviction. No engine imported
here (a ggml stage must not load MLX)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any


class ContextOverflowError(ValueError):
    """A sequence would grow past the stage's context length."""


class SequenceLimitError(RuntimeError):
    """The stage already holds its maximum number of sequences; free one first."""


def check_room(offset: int, n: int, max_len: int) -> int:
    """The positions a sequence reaches with ``n`` more; ContextOverflowError past max_len."""
    need = offset + n
    if need > max_len:
        raise ContextOverflowError(
            f"sequence would reach {need} positions; the context is {max_len} "
            f"({offset} cached + {n} new)"
        )
    return need


class Sequences:
    """The KV caches of a stage by sequence id, at most ``max_sequences`` of them.

    A full stage refuses a new sequence rather than silently evicting a live one; whoever
    owns sequences (the coordinator, the shim's timeouts) frees them or calls evict_idle.
    """

    def __init__(self, max_sequences: int, new_cache: Callable[[], Any]) -> None:
        if max_sequences < 1:
            raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
        self.max_sequences = max_sequences
        self._new_cache = new_cache  # an engine's empty cache for one sequence
        self._caches: OrderedDict[str, Any] = OrderedDict()

    def get(self, seq_id: str) -> Any:
        """The sequence's cache, created on first use (not yet registered: see ``keep``)."""
        cache = self._caches.get(seq_id)
        if cache is not None:
            self._caches.move_to_end(seq_id)
            return cache
        if len(self._caches) >= self.max_sequences:
            raise SequenceLimitError(
                f"stage holds {len(self._caches)} sequences (max_sequences="
                f"{self.max_sequences}); free one before starting {seq_id!r}"
            )
        return self._new_cache()

    def keep(self, seq_id: str, cache: Any) -> None:
        self._caches[seq_id] = cache

    def free(self, seq_id: str) -> None:
        self._caches.pop(seq_id, None)

    def position(self, seq_id: str) -> int:
        cache = self._caches.get(seq_id)
        return 0 if cache is None else cache.offset

    def adopt(self, old_id: str, new_id: str, keep: int) -> int:
        """Continue ``old_id``'s cache as ``new_id`` from its first ``keep`` positions (a
        chat's next turn shares the previous turn's prefix); the positions kept, 0 if
        ``old_id`` is not here or holds fewer than ``keep``. ``old_id`` is gone after."""
        cache = self._caches.get(old_id)
        if cache is None or cache.offset < keep or new_id in self._caches or keep < 1:
            return 0
        del self._caches[old_id]
        cache.offset = keep  # later positions are overwritten as the new turn is computed
        cache.last_used = time.monotonic()
        self._caches[new_id] = cache
        return keep

    def ids(self) -> list[str]:
        return list(self._caches)

    @property
    def nbytes(self) -> int:
        """Bytes of all the caches held now."""
        return sum(c.nbytes for c in self._caches.values())

    def evict_idle(self, max_idle_s: float) -> list[str]:
        now = time.monotonic()
        gone = [s for s, c in self._caches.items() if now - c.last_used > max_idle_s]
        for s in gone:
            del self._caches[s]
        return gone
