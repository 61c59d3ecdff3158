"""What a ggml stage (ggml_stage.py) needs of ggml-python beyond its ops: weight tensors over
the GGUF bytes (or repacked, as llama.cpp does, for the types ggml's CPU backend interleaves),
and graphs built once whose inputs and KV cache tensors point at NumPy buffers.

ggml checks with assertions that abort the process: everything here is sized and checked in
Python before ggml sees it.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import ggml
import numpy as np

from .ggml_kv import GgmlKV

F16, F32, I32, I64 = ggml.GGML_TYPE_F16, ggml.GGML_TYPE_F32, ggml.GGML_TYPE_I32, 27
NULL = ctypes.POINTER(ggml.ggml_tensor)()
# GGUF types ggml's CPU backend may repack (interleave rows) for its faster kernels; which of
# them it does depends on the CPU (AVX2: Q4_0, Q4_K, IQ4_NL, ...): it says so per tensor
REPACK_CANDIDATES = frozenset(
    {2, 8, 10, 12, 13, 14, 20, 39}
)  # Q4_0 Q8_0 Q2_K Q4_K Q5_K Q6_K IQ4_NL MXFP4
_MADV_PAGEOUT = 21  # Linux 5.4+: drop these pages from the process (file pages stay cached)


def _fixed(name: str, restype: object, argtypes: list) -> Callable:
    """A function of the ggml libraries with the types ggml-python 0.0.45 gets wrong (it
    declares ggml_backend_cpu_buffer_type's result as a Python int: a truncated pointer).
    Item access gives a fresh function object, not the one the bindings configured."""
    lib = next(lib for lib in ggml.lib._libraries if hasattr(lib, name))
    fn = lib[name]
    fn.restype, fn.argtypes = restype, argtypes
    return fn


cpu_buffer_type = _fixed("ggml_backend_cpu_buffer_type", ctypes.c_void_p, [])

_log = logging.getLogger("llm_omninode.ggml")
_LEVELS = {ggml.GGML_LOG_LEVEL_WARN: logging.WARNING, ggml.GGML_LOG_LEVEL_ERROR: logging.ERROR}


@ggml.ggml_log_callback
def _ggml_log(level: int, text: bytes, user_data: object) -> None:
    """ggml's messages through logging: warnings and errors; its chatter (one line per
    repacked tensor) not at all."""
    if level in _LEVELS:
        _log.log(_LEVELS[level], "%s", text.decode("utf-8", "replace").rstrip())


ggml.ggml_log_set(_ggml_log, None)


def ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def repack_buffer_type() -> int | None:
    """The CPU backend's "CPU_REPACK" buffer type, if this build has one."""
    reg = ggml.ggml_backend_cpu_reg()
    addr = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not addr:
        return None
    extra = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(addr)
    bufts = extra(ggml.ggml_backend_reg_dev_get(reg, 0))
    i = 0
    while bufts and bufts[i]:
        if ggml.ggml_backend_buft_name(bufts[i]) == b"CPU_REPACK":
            return bufts[i]
        i += 1
    return None


def _page_out(data: np.ndarray) -> None:
    """Let the kernel take back the pages of ``data`` (repacked elsewhere): never destructive
    (unlike MADV_DONTNEED on anonymous memory); a no-op where unsupported."""
    if not hasattr(mmap, "PAGESIZE"):
        return
    page = mmap.PAGESIZE
    start = -(-ptr(data) // page) * page
    end = (ptr(data) + data.nbytes) // page * page
    if end > start:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)


class Weights:
    """ggml tensors over a stage's GGUF tensors. A tensor points at its bytes where they are
    (a file mapping: nothing is copied), unless ``repack`` and the CPU backend interleaves its
    type: then it is repacked into a buffer of the same size and the file pages it was read
    from are given back, so either way a weight costs its GGUF size once."""

    def __init__(self, count: int, repack: bool) -> None:
        n = 2 * count + 8  # a probed tensor that cannot be repacked is made again
        params = ggml.ggml_init_params(
            mem_size=ggml.ggml_tensor_overhead() * n, mem_buffer=None, no_alloc=True
        )
        self.ctx = ggml.ggml_init(params)
        self.held: dict[str, np.ndarray] = {}  # the bytes each tensor was made from
        self.tensors: dict[str, object] = {}
        self.repacked: dict[str, int] = {}  # name -> bytes of its repacked buffer
        self._buffers: list[int] = []
        self._repack = repack_buffer_type() if repack else None

    def add(
        self, name: str, ggml_type: int, shape: Sequence[int], data: np.ndarray, repack: bool = True
    ) -> object:
        """A tensor over ``data`` (GGUF bytes), repacked if allowed and possible."""
        ne = (ctypes.c_int64 * 4)(*shape)
        if repack and self._repack and len(shape) == 2 and ggml_type in REPACK_CANDIDATES:
            w = ggml.ggml_new_tensor(self.ctx, ggml_type, 2, ne)
            if ggml.ggml_nbytes(w) == data.nbytes and self._repacked_into(w, data):
                self.held[name], self.tensors[name] = data, w
                self.repacked[name] = data.nbytes
                _page_out(data)
                return w
        w = ggml.ggml_new_tensor(self.ctx, ggml_type, len(shape), ne)
        if ggml.ggml_nbytes(w) != data.nbytes:
            raise ValueError(f"tensor {name}: {data.nbytes} bytes for its shape {tuple(shape)}")
        w.contents.data = ptr(data)
        self.held[name], self.tensors[name] = data, w
        return w

    def _repacked_into(self, w: object, data: np.ndarray) -> bool:
        """Whether the CPU backend repacks ``w``'s type and shape here (then it is done)."""
        size = ggml.ggml_backend_buft_get_alloc_size(self._repack, w)
        buf = ggml.ggml_backend_buft_alloc_buffer(self._repack, size)
        if not buf:
            return False
        ggml.ggml_backend_tensor_alloc(buf, w, ggml.ggml_backend_buffer_get_base(buf))
        if not w.contents.extra:  # type: ignore[attr-defined]  # no interleaved layout for it: the buffer was never touched
            ggml.ggml_backend_buffer_free(buf)
            return False
        ggml.ggml_backend_buffer_set_usage(buf, ggml.GGML_BACKEND_BUFFER_USAGE_WEIGHTS)
        ggml.ggml_backend_tensor_set(w, ptr(data), 0, data.nbytes)
        self._buffers.append(buf)
        return True

    def get(self, name: str) -> object:
        return self.tensors.get(name, NULL)

    @property
    def nbytes(self) -> int:
        """GGUF bytes of the tensors (shared arrays once): what the weights cost."""
        return sum({ptr(a): a.nbytes for a in self.held.values()}.values())

    def free(self) -> None:
        for buf in self._buffers:
            ggml.ggml_backend_buffer_free(buf)
        self._buffers = []
        if self.ctx is not None:
            ggml.ggml_free(self.ctx)
            self.ctx = None


# ---- graphs -------------------------------------------------------------------------------
@dataclass
class Graph:
    """A built, allocated graph and what each run writes and reads. A graph computes one or
    more sequences ("slots"), each attending over its own KV cache."""

    ctx: object
    graph: object
    galloc: object
    inputs: dict[str, np.ndarray]  # NumPy buffers the graph's input tensors point at
    output: object  # ggml tensor
    out_shape: tuple[int, int]
    # (tensor, slot, layer, kind, byte offset): cache tensors and their views
    kv_refs: list[tuple[object, int, int, int, int]] = field(default_factory=list)
    bound: list[tuple[int, int]] = field(default_factory=list)  # GgmlKV.where of each slot

    def bind(self, caches: Sequence[GgmlKV]) -> None:
        """Point the graph's cache tensors (views included) at ``caches``, one per slot."""
        where = [c.where for c in caches]
        if self.bound == where:
            return
        for tensor, slot, layer, kind, offs in self.kv_refs:
            tensor.contents.data = caches[slot].base(layer, kind) + offs  # type: ignore[attr-defined]
        self.bound = where

    def compute(self, backend: object) -> np.ndarray:
        status = ggml.ggml_backend_graph_compute(backend, self.graph)
        if status != 0:
            raise RuntimeError(f"ggml graph compute failed (status {status})")
        n = self.out_shape[0] * self.out_shape[1]
        out = (ctypes.c_float * n).from_address(self.output.contents.data)  # type: ignore[attr-defined]
        return np.ctypeslib.as_array(out).reshape(self.out_shape).copy()

    def free(self) -> None:
        if self.galloc is not None:
            ggml.ggml_gallocr_free(self.galloc)
            ggml.ggml_free(self.ctx)
            self.galloc = self.ctx = None


class GraphBuilder:
    """Creates the tensors of one graph in a no-alloc context; inputs point at NumPy arrays,
    cache tensors at the slots' caches; ``finish`` allocates the rest (ggml-alloc reuses
    memory between ops) and returns the Graph."""

    def __init__(self, n_nodes: int, caches: Sequence[GgmlKV]) -> None:
        mem = ggml.ggml_tensor_overhead() * n_nodes
        mem += ggml.ggml_graph_overhead_custom(n_nodes, False)
        params = ggml.ggml_init_params(mem_size=mem, mem_buffer=None, no_alloc=True)
        self.ctx = ggml.ggml_init(params)
        self.graph = ggml.ggml_new_graph_custom(self.ctx, n_nodes, False)
        self.inputs: dict[str, np.ndarray] = {}
        self._tensors: dict[str, object] = {}
        self.caches = list(caches)
        self._leaves: list[tuple[object, int, int, int]] = []

    def input(self, name: str, ggml_type: int, array: np.ndarray) -> object:
        """A tensor over ``array`` (C order: its last axis is ggml's ne0)."""
        ne = (ctypes.c_int64 * 4)(*reversed(array.shape))
        t = ggml.ggml_new_tensor(self.ctx, ggml_type, array.ndim, ne)
        t.contents.data = ptr(array)
        self.inputs[name], self._tensors[name] = array, t
        return t

    def tensor(self, name: str) -> object:
        """The input tensor ``name``."""
        return self._tensors[name]

    def cached(self, slot: int, layer: int, kind: int, ne: Sequence[int]) -> object:
        """Slot ``slot``'s layer ``layer`` keys (kind 0) or values (1): float16, shape ``ne``."""
        t = ggml.ggml_new_tensor(self.ctx, F16, len(ne), (ctypes.c_int64 * 4)(*ne))
        t.contents.data = self.caches[slot].base(layer, kind)
        self._leaves.append((t, slot, layer, kind))
        return t

    def expand(self, tensor: object) -> None:
        """Add ``tensor`` (and what it needs) to the graph now: ops run in that order."""
        ggml.ggml_build_forward_expand(self.graph, tensor)

    def finish(self, output: object, out_shape: tuple[int, int]) -> Graph:
        ggml.ggml_set_output(output)
        self.expand(output)
        galloc = ggml.ggml_gallocr_new(cpu_buffer_type())
        g = Graph(self.ctx, self.graph, galloc, self.inputs, output, out_shape)
        g.kv_refs = self._kv_refs()
        g.bound = [c.where for c in self.caches]
        if not ggml.ggml_gallocr_alloc_graph(galloc, self.graph):
            g.free()
            raise MemoryError("ggml could not allocate a stage's compute buffer")
        return g

    def _kv_refs(self) -> list[tuple[object, int, int, int, int]]:
        """The cache tensors and every view of them in the graph, with their byte offsets (a
        view's data pointer is fixed when it is made: re-pointing the cache must move it)."""
        where = {ctypes.addressof(t.contents): key for t, *key in self._leaves}  # type: ignore[attr-defined]
        refs = [(t, slot, layer, kind, 0) for t, slot, layer, kind in self._leaves]
        for i in range(ggml.ggml_graph_n_nodes(self.graph)):
            node = ggml.ggml_graph_node(self.graph, i)
            src = node.contents.view_src
            if src and ctypes.addressof(src.contents) in where:
                slot, layer, kind = where[ctypes.addressof(src.contents)]
                refs.append((node, slot, layer, kind, node.contents.view_offs))
        return refs
