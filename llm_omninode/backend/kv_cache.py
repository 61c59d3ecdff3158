"""Per-sequence key/value caches of one stage, bounded in count and length."""

from __future__ import annotations

import time
from collections import OrderedDict

import mlx.core as mx


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


class KVCache:
    """Keys and values of one sequence for the blocks of one stage.

    Storage grows in steps (not per token) up to ``max_len`` positions, so a decode step
    writes into preallocated space instead of concatenating the whole history.
    """

    step = 256

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: mx.Dtype,
    ) -> None:
        self.n_layers = n_layers
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.max_len = max_len
        self.dtype = dtype
        self.keys: list[mx.array] = []  # per layer (1, n_kv, capacity, head_dim)
        self.values: list[mx.array] = []
        self.offset = 0  # positions already cached
        self.capacity = 0
        self.last_used = time.monotonic()

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more positions (raises ContextOverflowError past max_len)."""
        need = check_room(self.offset, n, self.max_len)
        if need <= self.capacity:
            return
        new_cap = min(self.max_len, -(-need // self.step) * self.step)
        shape = (1, self.n_kv_heads, new_cap - self.capacity, self.head_dim)
        if not self.keys:
            self.keys = [mx.zeros(shape, self.dtype) for _ in range(self.n_layers)]
            self.values = [mx.zeros(shape, self.dtype) for _ in range(self.n_layers)]
        else:
            self.keys = [
                mx.concatenate([k, mx.zeros(shape, self.dtype)], axis=2) for k in self.keys
            ]
            self.values = [
                mx.concatenate([v, mx.zeros(shape, self.dtype)], axis=2) for v in self.values
            ]
        self.capacity = new_cap

    def update(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Store k, v (1, n_kv, T, hd) at the current offset; return all cached so far."""
        end = self.offset + k.shape[2]
        self.keys[layer][..., self.offset : end, :] = k.astype(self.dtype)
        self.values[layer][..., self.offset : end, :] = v.astype(self.dtype)
        return self.keys[layer][..., :end, :], self.values[layer][..., :end, :]

    def commit(self, n: int) -> None:
        self.offset += n
        self.last_used = time.monotonic()

    def state(self) -> list[mx.array]:
        """What Stage.forward evaluates before committing a step."""
        return self.keys + self.values

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state())


class SequenceCaches:
    """The KV caches of a stage by sequence id, at most ``max_sequences`` of them.

    A full stage refuses a new sequence rather than silently evicting a live one; whoever
    owns sequences (the coordinator, the shim's timeouts) frees them or calls evict_idle.
    """

    def __init__(
        self,
        max_sequences: int,
        *,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: mx.Dtype,
    ) -> None:
        if max_sequences < 1:
            raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
        self.max_sequences = max_sequences
        self._kv = (n_layers, n_kv_heads, head_dim, max_len, dtype)
        self._caches: OrderedDict[str, KVCache] = OrderedDict()

    def get(self, seq_id: str) -> KVCache:
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
        return KVCache(*self._kv)

    def keep(self, seq_id: str, cache: KVCache) -> None:
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
