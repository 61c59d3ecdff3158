"""Projections on NumPy's BLAS and NumPy decode steps (blas.py, host_step.py) vs MLX's own."""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from llm_omninode.backend import blas, host_step, qmatvec
from llm_omninode.backend.engine import SequenceLimitError, Stage, TensorData
from llm_omninode.backend.ggml_types import GGMLType
from llm_omninode.backend.gguf import open_gguf
from llm_omninode.backend.spec import ModelSpec

pytest.importorskip("gguf")
from tiny_model import write_tiny_llama  # noqa: E402

PROMPT = [1, 40, 70, 200, 7, 7, 99, 250, 3, 12, 150]
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-only default")


def stages(path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, bounds: list[int], **kw):
    monkeypatch.setenv("OMNI_BLAS", mode)
    f = open_gguf(path)
    spec = ModelSpec.from_metadata(f.metadata, f.tensors)
    tensors = {
        n: TensorData(n, t.ggml_type, t.shape, np.array(f.tensor_data(n)))
        for n, t in f.tensors.items()
    }
    f.close()
    return [Stage(spec, tensors, a, b, **kw) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def generate(stages: list[Stage], prompt: list[int], n: int) -> tuple[list[int], list]:
    """Greedy tokens and every step's logits through a pipeline of stages."""
    out, all_logits = [], []
    x: np.ndarray = np.asarray(prompt, np.int32)
    for _ in range(n):
        for stage in stages:
            x = stage.forward("s", x)
        all_logits.append(x)
        out.append(int(np.argmax(x)))
        x = np.array(out[-1:], np.int32)
    return out, all_logits


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"weight_type": GGMLType.Q8_0, "embed_type": GGMLType.F16, "tied": False},
        {"weight_type": GGMLType.F16, "embed_type": GGMLType.F32, "n_kv_heads": 4},
    ],
    ids=["q4_1-tied", "q8_0", "f16-mha"],
)
@pytest.mark.parametrize("kv", [mx.float16, mx.float32], ids=["kv16", "kv32"])
def test_host_equals_mlx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kw: dict, kv: mx.Dtype
) -> None:
    """Prefill and decode on the host path agree with MLX's kernels, split or not.

    Summation orders differ (OpenBLAS vs MLX), so a float16 cache or stage boundary can round
    a value the other way: 1 float16 ulp, up to ~5e-3 in the logits here.
    """
    path = write_tiny_llama(tmp_path / "m.gguf", n_blocks=4, seed=7, **kw)
    want_ids, want = generate(stages(path, monkeypatch, "mlx", [0, 4], kv_dtype=kv), PROMPT, 8)
    for bounds in ([0, 4], [0, 1, 3, 4]):
        host = stages(path, monkeypatch, "numpy", bounds, kv_dtype=kv)
        assert all(s.host_blas and s.host_step for s in host)
        ids, got = generate(host, PROMPT, 8)
        assert ids == want_ids, bounds
        for a, b in zip(got, want, strict=True):
            tol = 2e-4 if kv == mx.float32 and len(bounds) == 2 else 2e-2
            np.testing.assert_allclose(a, b, atol=tol)


def test_host_path_chunks_and_cache_growth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long prompt in chunks, then decode steps across the 256-position allocation step."""
    path = write_tiny_llama(tmp_path / "m.gguf", n_blocks=2, seed=3, context_length=512)
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 280, 250)]
    (mlx_stage,) = stages(path, monkeypatch, "mlx", [0, 2], kv_dtype=mx.float32)
    (host,) = stages(path, monkeypatch, "numpy", [0, 2], kv_dtype=mx.float32)
    monkeypatch.setattr("llm_omninode.backend.engine.PREFILL_CHUNK", 100)
    for stage in (mlx_stage, host):
        stage.forward("a", np.array(ids, np.int32))
    for t in (5, 6, 7, 8, 9, 10):
        want = mlx_stage.forward("a", np.array([t], np.int32))
        got = host.forward("a", np.array([t], np.int32))
        np.testing.assert_allclose(got, want, atol=2e-4)
    assert host.position("a") == len(ids) + 6


@pytest.mark.parametrize("traditional", [True, False])
@pytest.mark.parametrize("dims", [64, 32])
@pytest.mark.parametrize("freqs", [False, True])
def test_rope_matches_mlx(traditional: bool, dims: int, freqs: bool) -> None:
    spec = ModelSpec.__new__(ModelSpec)
    for k, v in dict(rope_dim=dims, rope_base=10000.0, rope_scale=0.5,
                     rope_traditional=traditional).items():  # fmt: skip
        object.__setattr__(spec, k, v)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 64)).astype(np.float32)  # (T, heads, head_dim)
    f = (rng.uniform(1, 50, dims // 2) * 10).astype(np.float32) if freqs else None
    want = mx.fast.rope(
        mx.array(x.transpose(1, 0, 2))[None], dims, traditional=traditional,
        base=None if freqs else 10000.0, scale=0.5, offset=17,
        freqs=None if f is None else mx.array(f),
    )  # fmt: skip
    got = host_step.rope(x, 17, spec, host_step.inv_freqs(spec, f))
    np.testing.assert_allclose(got, np.array(want[0]).transpose(1, 0, 2), atol=1e-4)


@linux
def test_default_on_linux_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_tiny_llama(tmp_path / "m.gguf", n_blocks=2)
    monkeypatch.delenv("OMNI_DENSE_MAX_MB", raising=False)
    (auto,) = stages(path, monkeypatch, "auto", [0, 2])
    (off,) = stages(path, monkeypatch, "mlx", [0, 2])
    assert auto.host_blas and auto.host_step and not off.host_blas and not off.host_step
    assert auto.nbytes > off.nbytes  # the dense copy is counted
    monkeypatch.setenv("OMNI_DENSE_MAX_MB", "0.01")  # over budget: stays quantized in MLX
    (small,) = stages(path, monkeypatch, "auto", [0, 2])
    assert not small.host_blas and small.nbytes == off.nbytes


def test_ggml_numerics_keep_mlx_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ggml roundings are emulated in MLX ops; only the matmuls move to the host BLAS.

    A different summation order flips a few 8-bit activation roundings (see engine.py), so
    the two agree to that "flip" size, as in test_ggml_numerics_match_numpy_emulation.
    """
    path = write_tiny_llama(tmp_path / "m.gguf", n_blocks=2)
    (stage,) = stages(path, monkeypatch, "numpy", [0, 2], ggml_numerics=True)
    assert stage.host_blas and not stage.host_step
    (ref,) = stages(path, monkeypatch, "mlx", [0, 2], ggml_numerics=True)
    ids = np.array(PROMPT, np.int32)
    np.testing.assert_allclose(stage.forward("s", ids), ref.forward("s", ids), atol=0.25)


@linux
def test_openblas_threads_are_controlled() -> None:
    """The matvec of a decode step runs NumPy's OpenBLAS on one thread, a prompt on all."""
    control = blas._openblas_threads()
    if control is None:
        pytest.skip("NumPy is not on a reachable OpenBLAS here")
    w = blas.HostWeight.from_dense(mx.array(np.random.default_rng(0).standard_normal((96, 64))))
    for rows in (1, blas.THREADED_MIN_ROWS):
        x = np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32)
        np.testing.assert_allclose(w.matmul_np(x), x @ w.wt, rtol=1e-5)
        assert blas._threads["now"] == (blas.DECODE_THREADS if rows == 1 else 0)


def test_max_threads_caps_prompts() -> None:
    """``omni-shim --threads N``: a prompt's matmuls use at most N OpenBLAS threads."""
    control = blas._openblas_threads()
    if control is None:
        pytest.skip("NumPy is not on a reachable OpenBLAS here")
    getter = control[1]
    try:
        blas.set_max_threads(1)
        blas.set_threads(0)
        assert getter() == 1
    finally:
        blas.set_max_threads(0)
        blas.set_threads(0)
    assert getter() == control[2]


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["f16", "bf16"])
def test_low_precision_compute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: mx.Dtype
) -> None:
    """Half-precision compute keeps MLX ops (host matmuls and cache), close to MLX's kernels."""
    path = write_tiny_llama(tmp_path / "m.gguf", n_blocks=3)
    out = {}
    for mode in ("numpy", "mlx"):
        (stage,) = stages(path, monkeypatch, mode, [0, 3], dtype=dtype)
        assert stage.host_blas == (mode == "numpy") and not stage.host_step
        logits = stage.forward("a", np.array(PROMPT[:5], np.int32))
        for t in PROMPT[5:8]:
            logits = stage.forward("a", np.array([t], np.int32))
        out[mode] = logits
    scale = float(np.abs(out["mlx"]).max())
    assert float(np.abs(out["numpy"] - out["mlx"]).max()) < 0.03 * scale


@linux
@pytest.mark.parametrize(
    "kw",
    [{}, {"weight_type": GGMLType.Q8_0, "embed_type": GGMLType.F16, "tied": False}],
    ids=["q4_1-tied", "q8_0"],
)
def test_batched_steps_equal_steps_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kw: dict
) -> None:
    """Decode steps of several sequences in one forward_batch: each sequence's hidden states
    and logits are bit for bit what it gets alone, over a 2-stage split."""
    path = write_tiny_llama(tmp_path / "m.gguf", **kw)
    alone = stages(path, monkeypatch, "numpy", [0, 2, 4])
    together = stages(path, monkeypatch, "numpy", [0, 2, 4])
    assert all(s.batches for s in together)
    prompts = [PROMPT[:3], PROMPT[2:9], PROMPT[5:6]]
    want = []
    for k, p in enumerate(prompts):  # reference: each sequence alone
        x = np.asarray(p, np.int32)
        steps = []
        for _ in range(4):
            for s in alone:
                x = s.forward(f"q{k}", x)
            steps.append(x)
            x = np.array([int(np.argmax(x))], np.int32)
        want.append(steps)
    xs = []
    for k, p in enumerate(prompts):  # prefills one by one, then batched decode steps
        x = np.asarray(p, np.int32)
        for s in together:
            x = s.forward(f"q{k}", x)
        assert np.array_equal(x, want[k][0])
        xs.append(np.array([int(np.argmax(x))], np.int32))
    for step in range(1, 4):
        outs: list = xs
        for s in together:
            outs = s.forward_batch([(f"q{k}", x) for k, x in enumerate(outs)])
        for k, logits in enumerate(outs):
            assert np.array_equal(logits, want[k][step]), (k, step)
        xs = [np.array([int(np.argmax(o))], np.int32) for o in outs]
    assert [s.position("q1") for s in together] == [len(prompts[1]) + 3] * 2


@linux
def test_batches_larger_than_the_kernel_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More sequences than the packed kernel's rows (a stage holds 16): still their numbers
    alone, in passes of at most KERNEL_MAX_ROWS."""
    path = write_tiny_llama(tmp_path / "m.gguf")
    n = qmatvec.KERNEL_MAX_ROWS + 3
    alone, together = (stages(path, monkeypatch, "numpy", [0, 4], max_sequences=n)[0]
                       for _ in range(2))  # fmt: skip
    want = []
    for k in range(n):
        alone.forward(f"s{k}", np.asarray(PROMPT[k : k + 2], np.int32))
        together.forward(f"s{k}", np.asarray(PROMPT[k : k + 2], np.int32))
        want.append(alone.forward(f"s{k}", np.array([k + 1], np.int32)))
    got = together.forward_batch([(f"s{k}", np.array([k + 1], np.int32)) for k in range(n)])
    for k in range(n):
        assert np.array_equal(got[k], want[k]), k


@linux
def test_batched_step_errors_stay_with_their_sequence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (stage,) = stages(write_tiny_llama(tmp_path / "m.gguf"), monkeypatch, "numpy", [0, 4],
                      max_sequences=2)  # fmt: skip
    ok = np.array([5], np.int32)
    out = stage.forward_batch(
        [("a", ok), ("b", np.array([1, 2], np.int32)), ("a", ok), ("c", ok), ("d", ok)]
    )
    assert out[0].shape == (stage.spec.vocab_size,)
    assert isinstance(out[1], ValueError) and "one position" in str(out[1])
    assert isinstance(out[2], ValueError)  # the same sequence twice
    assert out[3].shape == (stage.spec.vocab_size,)
    assert isinstance(out[4], SequenceLimitError)
    assert stage.position("a") == 1 and stage.position("c") == 1
    assert stage.forward_batch([]) == []
