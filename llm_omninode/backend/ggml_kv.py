"""The KV caches of a ggml stage (ggml_stage.py): one float16 NumPy buffer pair per sequence,
which the stage's graphs point at (nothing copied into ggml). Together they stay within the
stage's KV budget (memory.py plans it): a sequence that would grow past it is refused with
SequenceLimitError, nothing changed, as a full stage refuses a new sequence."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from .sequences import SequenceLimitError, Sequences, check_room

KV_STEP = 256  # caches grow, and graphs attend, in steps of this many positions


def attended(positions: int, max_len: int) -> int:
    """Cache positions a step attends over (the rest masked): a multiple of KV_STEP."""
    return min(max_len, -(-positions // KV_STEP) * KV_STEP)


class GgmlKV:
    """Keys and values of one sequence for a stage's blocks, float16, grown in KV_STEP steps up
    to ``max_len`` positions: keys (layers, positions, n_kv_heads * head_dim); values the same,
    or with ``v_trans`` (layers, n_kv_heads * head_dim, positions) as llama.cpp caches them
    for attention without flash attention."""

    def __init__(
        self,
        n_layers: int,
        width: int,
        max_len: int,
        v_trans: bool,
        grant: Callable[[GgmlKV, int], None] | None = None,
    ) -> None:
        self.n_layers, self.width, self.max_len, self.v_trans = n_layers, width, max_len, v_trans
        self._grant = grant  # raises SequenceLimitError if this cache may not grow to N bytes
        self.keys = np.zeros((n_layers, 0, width), np.float16)
        self.values = np.zeros(
            (n_layers, width, 0) if v_trans else (n_layers, 0, width), np.float16
        )
        self.offset = 0  # positions already cached
        self.last_used = time.monotonic()

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def reserve(self, n: int) -> None:
        """Room for ``n`` more positions (ContextOverflowError past max_len, nothing changed)."""
        need = check_room(self.offset, n, self.max_len)
        if need > self.capacity:
            old, cap = self.capacity, attended(need, self.max_len)
            if self._grant is not None:
                self._grant(self, 2 * self.n_layers * cap * self.width * 2)
            keys = np.zeros((self.n_layers, cap, self.width), np.float16)
            keys[:, :old] = self.keys
            if self.v_trans:
                values = np.zeros((self.n_layers, self.width, cap), np.float16)
                values[:, :, :old] = self.values
            else:
                values = np.zeros_like(keys)
                values[:, :old] = self.values
            self.keys, self.values = keys, values

    def commit(self, n: int) -> None:
        self.offset += n
        self.last_used = time.monotonic()

    def base(self, layer: int, kind: int) -> int:
        """Address of layer ``layer``'s keys (kind 0) or values (kind 1)."""
        a = self.values if kind else self.keys
        return a.ctypes.data + layer * a[0].nbytes

    @property
    def where(self) -> tuple[int, int]:
        """Identifies the buffers (a graph pointed at them need not be re-pointed)."""
        return (self.keys.ctypes.data, self.values.ctypes.data)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class GgmlSequences(Sequences):
    """Sequences (count bound, prefix adoption, idle eviction) holding GgmlKV caches, all of
    them within ``max_bytes`` (None: unbounded)."""

    def __init__(
        self,
        max_sequences: int,
        n_layers: int,
        width: int,
        max_len: int,
        v_trans: bool,
        max_bytes: int | None = None,
    ) -> None:
        super().__init__(
            max_sequences, lambda: GgmlKV(n_layers, width, max_len, v_trans, grant=self._grant)
        )
        self.max_bytes = max_bytes

    def _grant(self, cache: GgmlKV, nbytes: int) -> None:
        """Let ``cache`` grow to ``nbytes`` if all caches then stay within ``max_bytes``."""
        if self.max_bytes is None:
            return
        others = sum(c.nbytes for c in self._caches.values() if c is not cache)
        if others + nbytes > self.max_bytes:
            raise SequenceLimitError(
                f"the stage's KV cache budget ({self.max_bytes / 2**20:.1f} MiB) is taken by "
                f"{len(self._caches)} sequence(s); retry when one ends"
            )
