"""What a stage costs in memory, planned before it is loaded: its weights at their kept size,
the KV cache for its context and sequences, and the compute buffers of its graphs. Pure
functions of the model's spec; the shim adds the runtime it measured at start and keeps the
sum within ``--max-memory`` (shim/stage_host.py), and the planner shares blocks on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import ModelSpec

# A sequence's context unless the node says otherwise (--max-context) or the model has less:
# Ollama's default num_ctx. Its KV cache is what a long context costs, so it is planned for.
DEFAULT_CONTEXT = 4096
KV_BYTES = 2  # float16 keys and values
PREFILL_CHUNK = 512  # positions per graph run of a long prompt (bounds the compute buffer)
KEPT_GRAPHS = 8  # decode graphs a stage keeps (per batch size and attended lengths in use)
MAX_BATCH = 8  # sequences whose steps one graph computes together
_F32 = 4


def context_for(spec: ModelSpec, max_context: int | None) -> int:
    """Positions one sequence may reach: the node's --max-context, else DEFAULT_CONTEXT,
    never more than the model was trained for."""
    return min(spec.context_length, max_context or DEFAULT_CONTEXT)


def kv_bytes_per_position(spec: ModelSpec) -> int:
    """KV cache bytes of one position in one block."""
    return 2 * spec.n_kv_heads * spec.head_dim * KV_BYTES


def compute_bytes(spec: ModelSpec, context: int, last: bool) -> int:
    """An upper bound on a stage's compute buffers: the largest prompt chunk's graph (its
    attention scores over the whole context dominate) plus the decode graphs kept, with
    logits on the last stage. Measured against ggml's allocator in tests/test_memory.py."""
    d, ff, heads = spec.d_model, spec.d_ff, spec.n_heads
    chunk = min(PREFILL_CHUNK, context)
    prefill = _F32 * chunk * (heads * context + 2 * ff + 4 * d)
    if last:
        prefill += _F32 * spec.vocab_size
    step = _F32 * MAX_BATCH * (heads * context + 2 * ff + 4 * d + (spec.vocab_size if last else 0))
    return prefill + KEPT_GRAPHS * step


@dataclass(frozen=True)
class StageMemory:
    """A stage's planned bytes: what its node promises to stay within."""

    weights: int
    kv: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute

    def to_json(self) -> dict[str, int]:
        return {"weights": self.weights, "kv": self.kv, "compute": self.compute}


def stage_memory(
    spec: ModelSpec, weights: int, blocks: int, last: bool, context: int, sequences: int
) -> StageMemory:
    """The plan for a stage of ``blocks`` blocks whose weights keep ``weights`` bytes, caching
    ``sequences`` sequences of ``context`` positions at once."""
    kv = kv_bytes_per_position(spec) * blocks * context * sequences
    return StageMemory(weights, kv, compute_bytes(spec, context, last))
