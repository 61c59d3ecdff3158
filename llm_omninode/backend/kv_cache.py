"""Per-sequence key/value caches of an MLX stage, bounded in count and length (the
bookkeeping both engines share is in sequences.py)."""

from __future__ import annotations

import time

import mlx.core as mx

from .sequences import ContextOverflowError, SequenceLimitError, Sequences, check_room

__all__ = ["ContextOverflowError", "KVCache", "SequenceCaches", "SequenceLimitError", "check_room"]


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


class SequenceCaches(Sequences):
    """Sequences holding MLX KVCache objects."""

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
        shape = (n_layers, n_kv_heads, head_dim, max_len, dtype)
        super().__init__(max_sequences, lambda: KVCache(*shape))
