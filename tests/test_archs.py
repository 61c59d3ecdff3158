"""qwen2 and gemma3 on tiny Q4_K_M-like files: the stage against a float64 NumPy forward.

The reference is written from the architectures' definitions (HF / llama.cpp), not from the
engine: NEOX rope, q/k/v biases (qwen2); per-head q/k RMS norms, post-attention and post-FFN
norms, tanh-GELU, embeddings times sqrt(d_model), sliding-window layers (five in six) with
their own rope base (gemma3). Weights come from the `gguf` package's dequantizers. The files
mix every quantized type a stage converts; it holds them at about their GGUF size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import support.stage_model as stage_model
from support.tiny_model import write_tiny_llama

from llm_omninode.backend.engine import Stage
from llm_omninode.backend.ggml_types import GGMLType

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

WINDOW = 4
PROMPT = [1, 40, 70, 200, 7, 7, 99, 250, 3, 12, 150]


def mixed_types(name: str) -> GGMLType | None:
    """A Q4_K_M-like mix over every converted type (K-quants need rows of 256)."""
    block = int(name.split(".")[1]) if name.startswith("blk.") else -1
    kind = name.split(".")[-2]
    if kind in ("attn_q", "attn_k"):
        return GGMLType.Q5_0
    if kind == "attn_v":
        return (GGMLType.Q8_0, GGMLType.Q6_K, GGMLType.Q5_1)[block % 3]
    if kind == "attn_output":
        return GGMLType.Q5_1  # rows of n_heads * head_dim = 128: too short for K-quants
    if kind in ("ffn_gate", "ffn_up"):
        return (GGMLType.Q5_K, GGMLType.Q4_K, GGMLType.Q3_K)[block % 3]
    if kind == "ffn_down":
        return (GGMLType.Q6_K, GGMLType.Q4_K, GGMLType.Q2_K)[block % 3]
    if kind == "token_embd":
        return GGMLType.Q5_0
    return GGMLType.Q8_0  # output.weight


def write(path: Path, arch: str, **kw: object) -> Path:
    options: dict[str, object] = {
        "n_blocks": 6,  # gemma3: layers 0-4 slide, layer 5 is global
        "d_model": 256,
        "n_heads": 4,
        "n_kv_heads": 1 if arch == "gemma3" else 2,
        "d_ff": 512,
        "type_of": mixed_types,
        "arch": arch,
        "tied": arch == "gemma3",
        "sliding_window": WINDOW,
        "seed": 7,
    }
    if arch == "gemma3":
        options["head_dim"] = 32  # key_length != d_model / n_heads, as in gemma
    options.update(kw)
    return write_tiny_llama(path, **options)  # type: ignore[arg-type]


class Model(stage_model.Model):
    """The tiny file's stages, and its weights dequantized by the ``gguf`` package."""

    def w(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        rows = int(np.prod(t.shape[1:]))
        a = dequantize(np.asarray(t.data).reshape(rows, -1), gguf.GGMLQuantizationType(t.ggml_type))
        return a.reshape(tuple(reversed(t.shape))).astype(np.float64)


def reference_logits(m: Model, ids: Sequence[int]) -> np.ndarray:
    spec, arch = m.spec, m.spec.arch
    gemma = arch == "gemma3"
    T, nh, nkv, hd = len(ids), spec.n_heads, spec.n_kv_heads, spec.head_dim

    def rms(x: np.ndarray, name: str) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + spec.rms_eps) * m.w(name)

    def rope_neox(x: np.ndarray, base: float) -> np.ndarray:  # pairs (i, i + hd/2)
        half = hd // 2
        theta = np.arange(T)[:, None] * base ** (-np.arange(half) / half)
        c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        y = x @ m.w(name + ".weight").T
        bias = name + ".bias"
        return y + m.w(bias) if bias in m.tensors else y

    def gelu_tanh(x: np.ndarray) -> np.ndarray:
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    x = m.w("token_embd.weight")[list(ids)]
    if gemma:
        x = x * np.sqrt(spec.d_model)
    pos = np.arange(T)
    for b in range(spec.n_blocks):
        p = f"blk.{b}."
        sliding = gemma and b % 6 != 5
        base = 10000.0 if sliding else 1e6
        visible = pos[None, :] <= pos[:, None]
        if sliding:
            visible &= pos[:, None] - pos[None, :] < WINDOW
        h = rms(x, p + "attn_norm.weight")
        q = linear(h, p + "attn_q").reshape(T, nh, hd)
        k = linear(h, p + "attn_k").reshape(T, nkv, hd)
        v = linear(h, p + "attn_v").reshape(T, nkv, hd)
        if gemma:
            q, k = rms(q, p + "attn_q_norm.weight"), rms(k, p + "attn_k_norm.weight")
        q, k = rope_neox(q, base), rope_neox(k, base)
        o = np.zeros((T, nh, hd))
        for i in range(nh):
            j = i // (nh // nkv)
            s = np.where(visible, q[:, i] @ k[:, j].T / np.sqrt(hd), -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            o[:, i] = s / s.sum(-1, keepdims=True) @ v[:, j]
        a = linear(o.reshape(T, -1), p + "attn_output")
        if gemma:
            a = rms(a, p + "post_attention_norm.weight")
        x = x + a
        h = rms(x, p + "ffn_norm.weight")
        g, u = linear(h, p + "ffn_gate"), linear(h, p + "ffn_up")
        act = gelu_tanh(g) if gemma else g / (1 + np.exp(-g))
        f = linear(act * u, p + "ffn_down")
        if gemma:
            f = rms(f, p + "post_ffw_norm.weight")
        x = x + f
    head = "token_embd.weight" if spec.tied_embedding else "output.weight"
    return (rms(x[-1:], "output_norm.weight") @ m.w(head).T)[0]


@pytest.fixture(scope="module", params=["qwen2", "gemma3"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Model:
    arch = request.param
    m = Model(write(tmp_path_factory.mktemp(arch) / "m.gguf", arch))
    yield m
    m.file.close()


def test_spec_from_metadata(model: Model) -> None:
    spec = model.spec
    assert not spec.rope_traditional  # NEOX rope for both
    if spec.arch == "qwen2":
        assert spec.attn_bias and not spec.qk_norm and spec.sliding_window == 0
    else:
        assert spec.qk_norm and spec.post_norms and spec.activation == "gelu"
        assert spec.head_dim == 32 and spec.sliding_window == WINDOW
        assert [spec.is_sliding(i) for i in range(6)] == [True] * 5 + [False]
        assert spec.layer_rope(0) == (10000.0, 1.0) and spec.layer_rope(5) == (1e6, 1.0)
        assert spec.embed_scale == pytest.approx(16.0)


@pytest.mark.parametrize("scale_dtype", [mx.float32, mx.float16], ids=["f32", "f16"])
def test_matches_numpy_reference(model: Model, scale_dtype: mx.Dtype) -> None:
    """Prefill and decode steps past the sliding window. With float32 quantization constants
    the weights are ggml's values exactly; with float16 (the default, about the GGUF size)
    the K-quants' constants are rounded once (quant.py), which moves these logits by up to
    ~1e-2 (measured: qwen2 6e-4, gemma3 4e-3 to 1.1e-2 on logits of up to ~130)."""
    (stage,) = model.stages([0, 6], kv_dtype=mx.float32, scale_dtype=scale_dtype)
    atol = 2e-4 if scale_dtype == mx.float32 else 3e-2
    n0 = 6  # prompt longer than the window, then decode steps well past it
    logits = stage.forward("s", np.array(PROMPT[:n0], np.int32))
    want = reference_logits(model, PROMPT[:n0])
    np.testing.assert_allclose(logits, want, atol=atol, rtol=1e-4)
    for n in range(n0, len(PROMPT)):
        logits = stage.forward("s", np.array(PROMPT[n : n + 1], np.int32))
        want = reference_logits(model, PROMPT[: n + 1])
        np.testing.assert_allclose(logits, want, atol=atol, rtol=1e-4)
    print(f"{model.spec.arch} {scale_dtype}: max |error| {np.abs(logits - want).max():.2e}")


def test_weights_held_at_about_their_gguf_size(model: Model) -> None:
    """A stage holds its slice's tensors at about their GGUF bytes: no float copies of
    quantized ones (the embedding rows are gathered from the quantized table; gemma's tied
    head multiplies by it too). The mix here is ~1.1x (Q2_K's per-16 biases cost most)."""
    spec = model.spec
    for a, b in ((0, 6), (0, 3), (3, 6), (2, 4)):
        (stage,) = model.stages([a, b])
        names = [n for i in range(a, b) for n in spec.block_tensor_names(i)]
        names += ["token_embd.weight"] if a == 0 else []
        names += spec.head_tensor_names() if b == spec.n_blocks else []
        gguf_bytes = sum(model.tensors[n].data.nbytes for n in set(names))
        ratio = stage.nbytes / gguf_bytes
        print(f"{spec.arch} [{a}, {b}): {stage.nbytes} bytes for {gguf_bytes} GGUF ({ratio:.3f}x)")
        assert ratio < 1.16


def test_split_invariance(model: Model) -> None:
    """Two or three stages (float16 boundaries, gemma's scaled) compute what one does."""
    ids = np.array(PROMPT, np.int32)

    def run(stages: list[Stage], seq: str) -> np.ndarray:
        x: np.ndarray = ids
        for s in stages:
            x = s.forward(seq, x)
        return x

    one = run(model.stages([0, 6]), "a")
    for bounds in ([0, 3, 6], [0, 1, 5, 6]):
        split = run(model.stages(bounds), "b")
        # the float16 boundary rounds the hidden state by ~2^-11 relative, no more
        np.testing.assert_allclose(split, one, atol=2e-2)
        assert int(np.argmax(split)) == int(np.argmax(one))


def test_chunked_prefill_across_the_window(model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_omninode.backend import engine

    (stage,) = model.stages([0, 6], kv_dtype=mx.float32)
    whole = stage.forward("a", np.array(PROMPT, np.int32))
    monkeypatch.setattr(engine, "PREFILL_CHUNK", 3)
    np.testing.assert_allclose(stage.forward("b", np.array(PROMPT, np.int32)), whole, atol=1e-4)


def test_large_hidden_states_cross_a_boundary(tmp_path: Path) -> None:
    """gemma's residual stream exceeds float16's range; the boundary scale keeps it finite."""
    m = Model(write(tmp_path / "g.gguf", "gemma3"))
    first, last = m.stages([0, 3, 6])
    big = np.full((2, m.spec.d_model), 9e4, np.float32)
    wire = (big * m.spec.boundary_scale).astype(np.float16)
    assert np.isfinite(wire).all() and m.spec.boundary_scale < 1
    assert np.isfinite(last.forward("s", wire)).all()
    h = first.forward("t", np.array(PROMPT, np.int32))
    assert h.dtype == np.float16 and np.isfinite(h).all()
    m.file.close()
