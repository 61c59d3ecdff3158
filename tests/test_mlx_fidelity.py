"""engine.Stage (MLX; on Linux MLX's CPU device) on the real files: teacher-forced fidelity
against llama.cpp (tests/support/teacher.py, the same golden data as the ggml stage's tests),
and the weights held against the GGUF bytes of each stage's slice.

MLX computes in float32 where llama.cpp rounds activations to 8 bits before each quantized
matmul, so it is not llama.cpp's arithmetic; the bounds are those of issue 14: the same top
token wherever llama.cpp's margin is >= 0.5, mean KL over its top 20 <= 1e-2. Measured (MLX
0.32 CPU, float16 quantization constants): SmolLM2 207/207 at margin >= 0.5, 254/255 at >= 0.1,
KL 3.5e-3; Qwen2.5-Coder-0.5B 153/153, 175/176, 6.0e-4; gemma-3-270m 160/160, 188/192, 7.1e-3
(7.1e-3 with float32 constants too: the gap is llama.cpp's 8-bit activations, not the scales).
Held/GGUF bytes: SmolLM2 1.02-1.03, gemma-3-270m 1.06-1.07, Qwen2.5-Coder-0.5B 1.07-1.09.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from support.stage_model import Model
from support.teacher import Fidelity, golden, through_stages

KL_BOUND = 1e-2
_RUNS: dict[tuple[str, tuple[float, ...]], Fidelity] = {}  # one run per file and split


def fidelity(model: Model, name: str, bounds_at: Sequence[float] = (0, 1)) -> Fidelity:
    key = (name, tuple(bounds_at))
    if key not in _RUNS:
        _RUNS[key] = _run(model, name, bounds_at)
    return _RUNS[key]


def _run(model: Model, name: str, bounds_at: Sequence[float]) -> Fidelity:
    n = model.spec.n_blocks
    stages = model.stages([round(b * n) for b in bounds_at], hidden_dtype=np.float32)
    fid = through_stages(golden(name), stages)
    print(f"\n{name} (MLX, {len(stages)} stage(s)): {fid.summary()}")
    return fid


def assert_issue_bounds(fid: Fidelity) -> None:
    agree, n = fid.agreement(0.5)
    assert agree == n, f"top-1 differs from llama.cpp at {n - agree} of {n} margins >= 0.5"
    assert fid.mean_kl <= KL_BOUND, fid.mean_kl


def slice_bytes(model: Model, start: int, end: int) -> int:
    """GGUF bytes of the tensors a stage [start, end) loads."""
    spec = model.spec
    names = {n for i in range(start, end) for n in spec.block_tensor_names(i)}
    if start == 0:
        names.add("token_embd.weight")
    if end == spec.n_blocks:
        names.update(spec.head_tensor_names())
    return sum(model.tensors[n].data.nbytes for n in names if n in model.tensors)


def check_held_bytes(model: Model, limit: float = 1.1) -> None:
    n = model.spec.n_blocks
    for bounds in ([0, n], [0, n // 2, n]):
        for stage in model.stages(bounds):
            want = slice_bytes(model, stage.start, stage.end)
            ratio = stage.nbytes / want
            print(f"[{stage.start}, {stage.end}): {stage.nbytes / 2**20:.1f} MiB held, "
                  f"{want / 2**20:.1f} MiB in the GGUF ({ratio:.3f}x)")  # fmt: skip
            assert ratio <= limit


@pytest.fixture
def smollm2(smollm2_path: Path) -> Model:
    return Model(smollm2_path)


@pytest.fixture
def gemma3(gemma3_path: Path) -> Model:
    return Model(gemma3_path)


@pytest.fixture
def qwen2(qwen2_path: Path) -> Model:
    return Model(qwen2_path)


@pytest.mark.model
def test_teacher_forced_smollm2_one_and_two_stages(smollm2: Model) -> None:
    """One stage within the issue's bounds; two stages (hidden states crossing as float32)
    compute what one does, bit for bit."""
    one = fidelity(smollm2, "smollm2")
    assert_issue_bounds(one)
    two = fidelity(smollm2, "smollm2", (0, 0.5, 1))
    assert two.kl == one.kl and two.agree == one.agree


@pytest.mark.large_model
def test_teacher_forced_qwen2(qwen2: Model) -> None:
    assert_issue_bounds(fidelity(qwen2, "qwen2.5-coder-0.5b"))


@pytest.mark.large_model
def test_teacher_forced_gemma3(gemma3: Model) -> None:
    assert_issue_bounds(fidelity(gemma3, "gemma3-270m"))


@pytest.mark.model
def test_held_bytes_smollm2(smollm2: Model) -> None:
    check_held_bytes(smollm2)


@pytest.mark.large_model
@pytest.mark.parametrize("name", ["gemma3", "qwen2"])
def test_held_bytes_q4_k_m(name: str, request: pytest.FixtureRequest) -> None:
    check_held_bytes(request.getfixturevalue(name))
