"""Splits are bit-identical: with hidden states crossing stage boundaries as float32 (what a
shim sends), 1, 2 and 3 stages give the same logits bit for bit, for a prompt and for decode
steps after it, on the three real models, with either engine (ggml: Linux's; MLX on its CPU
device). float16 on the wire (OMNI_WIRE_DTYPE=float16) rounds, and only comes close.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.stage_model import Model

PROMPT = [1, 504, 3458, 282, 253, 2372, 30, 198, 504, 2]  # small ids: inside every vocabulary
DECODE = [17, 42, 7]
ENGINES = ("ggml", "mlx")


def _run(model: Model, bounds: list[int], hidden_dtype: type, engine: str) -> list[np.ndarray]:
    """Logits after the prompt, then after each decode step, through stages ``bounds``."""
    stages = model.stages(bounds, engine, hidden_dtype=hidden_dtype)
    out = []
    for step in [PROMPT, *([t] for t in DECODE)]:
        x: np.ndarray = np.array(step, np.int32)
        for stage in stages:
            x = stage.forward("s", x)
        out.append(x)
    return out


def _splits(n: int) -> list[list[int]]:
    return [[0, n], [0, n // 2, n], [0, n // 3, 2 * n // 3, n]]


def _check(path: Path, engine: str) -> None:
    model = Model(path)
    n = model.spec.n_blocks
    one, *more = (_run(model, bounds, np.float32, engine) for bounds in _splits(n))
    for split in more:
        for a, b in zip(one, split, strict=True):
            assert a.dtype == np.float32
            np.testing.assert_array_equal(a, b)
    # float16 on the wire rounds: close, not equal (gemma's large residual stream, measured
    # with ggml: up to 2.5 in a logit)
    for a, b in zip(one, _run(model, _splits(n)[1], np.float16, engine), strict=True):
        assert np.argmax(a) == np.argmax(b)
        np.testing.assert_allclose(a, b, atol=3.0)


@pytest.mark.model
@pytest.mark.parametrize("engine", ENGINES)
def test_smollm2_splits_are_bit_identical(smollm2_path: Path, engine: str) -> None:
    _check(smollm2_path, engine)


@pytest.mark.large_model
@pytest.mark.parametrize("engine", ENGINES)
def test_qwen2_splits_are_bit_identical(qwen2_path: Path, engine: str) -> None:
    _check(qwen2_path, engine)


@pytest.mark.large_model
@pytest.mark.parametrize("engine", ENGINES)
def test_gemma3_splits_are_bit_identical(gemma3_path: Path, engine: str) -> None:
    _check(gemma3_path, engine)
