import numpy as np
import pytest

from llm_omninode.backend.sampling import (
    Sampler,
    SamplingError,
    SamplingOptions,
    _candidates,
    apply_repeat_penalty,
)


def logits_with(peaks: dict[int, float], size: int = 100) -> np.ndarray:
    x = np.full(size, -10.0, dtype=np.float32)
    for i, v in peaks.items():
        x[i] = v
    return x


def test_greedy_is_argmax():
    s = Sampler(SamplingOptions.greedy())
    assert s.sample(logits_with({7: 5.0, 3: 4.9})) == 7


def test_repeat_penalty_changes_greedy_choice():
    opts = SamplingOptions(temperature=0.0, repeat_penalty=1.5, repeat_last_n=64)
    x = logits_with({7: 5.0, 3: 4.0})
    assert Sampler(opts).sample(x, history=[7]) == 3
    assert Sampler(opts).sample(x, history=[]) == 7


def test_repeat_penalty_sign_rule_and_window():
    x = np.array([2.0, -2.0, 1.0], dtype=np.float32)
    out = apply_repeat_penalty(x, [0, 1, 0], 2.0, 64)
    assert out.tolist() == [1.0, -4.0, 1.0]
    # outside the last-n window: untouched
    assert apply_repeat_penalty(x, [0, 2], 2.0, 1).tolist() == [2.0, -2.0, 0.5]
    assert apply_repeat_penalty(x, [0], 2.0, 0).tolist() == x.tolist()


def test_top_k_one_is_greedy_even_hot():
    s = Sampler(SamplingOptions(temperature=5.0, top_k=1, seed=1))
    assert {s.sample(logits_with({4: 1.0, 5: 0.9})) for _ in range(50)} == {4}


def test_top_p_keeps_the_nucleus():
    s = Sampler(SamplingOptions(temperature=1.0, top_k=0, top_p=0.5, repeat_penalty=1.0, seed=3))
    x = logits_with({1: 10.0, 2: 9.0, 3: 0.0})
    assert {s.sample(x) for _ in range(100)} == {1}


def test_min_p_drops_the_tail():
    s = Sampler(SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2, seed=5))
    x = logits_with({1: 3.0, 2: 2.5, 3: 0.0})  # p3/p1 = e^-3 < 0.2
    picks = {s.sample(x) for _ in range(300)}
    assert picks == {1, 2}


def test_same_seed_same_draws_and_temperature_spreads():
    x = logits_with({i: 1.0 for i in range(10)})
    opts = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, seed=42)
    a = [Sampler(opts).sample(x) for _ in range(1)]
    s1, s2 = Sampler(opts), Sampler(opts)
    assert [s1.sample(x) for _ in range(30)] == [s2.sample(x) for _ in range(30)]
    assert len({s1.sample(x) for _ in range(200)}) > 5
    assert a


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"min_p": -0.1},
        {"top_k": -1},
        {"repeat_penalty": 0},
        {"repeat_last_n": -2},
        {"seed": -1},
    ],
)
def test_invalid_options_are_refused(bad):
    with pytest.raises(SamplingError):
        SamplingOptions(**bad)


def test_updated_ignores_none_and_refuses_unknown():
    o = SamplingOptions().updated(temperature=None, top_k=5)
    assert o.top_k == 5 and o.temperature == SamplingOptions().temperature
    with pytest.raises(SamplingError):
        SamplingOptions().updated(bogus=1)


@pytest.mark.parametrize("top_k", [1, 40, 500])
def test_top_k_over_a_large_vocabulary_is_exact(top_k):
    """A Qwen-sized vocabulary takes the cutoff path: the same candidates, in the same order,
    as sorting everything; with ties and NaNs, the same values."""
    rng = np.random.default_rng(top_k)
    o = SamplingOptions(top_k=top_k, top_p=1.0)
    for _ in range(5):
        logits = (rng.standard_normal(151936) * 3).astype(np.float32)
        ids, probs = _candidates(logits, o)
        want = np.argsort(-logits, kind="stable")[:top_k]
        assert np.array_equal(ids, want)
        assert np.allclose(probs.sum(), 1.0)
    tied = rng.integers(-4, 4, 151936).astype(np.float32)
    tied[rng.integers(0, 151936, 30)] = np.nan
    ids, _ = _candidates(tied, o)
    assert np.array_equal(tied[ids], np.sort(tied[~np.isnan(tied)])[::-1][:top_k])
