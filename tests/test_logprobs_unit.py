"""Logprobs without processes: the reduction (backend/logprobs.py), both engines' ``each``
pass over every position, the SCORES frame and its checks, the tail's setup and the
coordinator's sink (shim/scoring.py), and the API fields (shim/http/parse.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
from omninode_shim.http.parse import (
    ApiError,
    parse_ollama_chat,
    parse_ollama_generate,
    parse_openai_chat,
    parse_openai_completion,
)
from omninode_shim.scoring import (
    ScoreSink,
    Scoring,
    ScoringError,
    score_frames,
    scoring_from,
)
from support.stage_model import Model
from support.tiny_model import write_tiny_llama

from llm_omninode.backend import logprobs as L
from llm_omninode.backend.logprobs import Scores, SequenceScorer, score_rows
from llm_omninode.net import frames as F

PROMPT = [1, 5, 9, 2, 7, 7, 3, 11, 4, 6]


def _naive(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (x.max(axis=1, keepdims=True) + np.log(np.exp(x - x.max(axis=1, keepdims=True))
                                                      .sum(axis=1, keepdims=True)))  # fmt: skip


def test_score_rows_is_the_log_softmax_of_the_raw_logits() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (7, 300)).astype(np.float32)
    logits[3, [10, 20, 30]] = 50.0  # a tie: lower ids first
    actual = rng.integers(0, 300, 7)
    got = score_rows(logits, actual, 5)
    ref = _naive(logits)
    assert got.ids.dtype == np.int32 and got.logprobs.dtype == np.float32
    assert got.ids.shape == (7, 6) and got.k == 5 and got.rows == 7
    np.testing.assert_allclose(got.logprobs[:, 0], ref[np.arange(7), actual], atol=1e-5)
    for r in range(7):
        best = np.argsort(-ref[r], kind="stable")[:5]
        assert list(got.ids[r, 1:]) == list(best)
        np.testing.assert_allclose(got.logprobs[r, 1:], ref[r, best], atol=1e-5)
    assert list(got.ids[3, 1:4]) == [10, 20, 30]
    assert (got.logprobs <= 0).all()
    assert score_rows(logits[0], [4], 0).ids.shape == (1, 1)
    wide = rng.normal(0, 3, (4, 5000)).astype(np.float32)  # the top k found block-wise
    wide[1] = 0.0  # all tied: the lowest ids
    wide[2, 4990:] = 40.0  # the best in the tail past the last whole block
    got = score_rows(wide, [0] * 4, 20)
    for r in range(4):
        assert list(got.ids[r, 1:]) == list(np.lexsort((np.arange(5000), -wide[r]))[:20])
    for bad in ([(logits, actual, 21)], [(logits, actual[:3], 2)], [(logits, [300] * 7, 2)]):
        with pytest.raises(ValueError):
            score_rows(*bad[0])


def test_prompt_rows_score_each_position_against_the_next_token() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(len(PROMPT), 16)).astype(np.float32)
    scorer = SequenceScorer(3, PROMPT)
    assert scorer.prompt_rows(len(PROMPT) - 1, 1) is None  # the last: scored once picked
    assert SequenceScorer(3).prompt_rows(0, 5) is None  # no echo
    rows = scorer.prompt_rows(4, 6)  # the final piece: positions 4..9
    assert rows is not None
    rows(logits[4:7])  # in two passes, as an engine hands them over
    rows(logits[7:10])
    got = rows.scores()
    assert got is not None and got.rows == 5  # positions 4..8: the tokens at 5..9
    ref = score_rows(logits[4:9], PROMPT[5:10], 3)
    np.testing.assert_array_equal(got.ids, ref.ids)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    model = Model(write_tiny_llama(tmp_path_factory.mktemp("lp") / "tiny.gguf", n_blocks=2))
    yield model
    model.file.close()


@pytest.mark.parametrize("engine", ["ggml", "mlx"])
def test_each_hands_every_position_over_in_bounded_passes(
    tiny: Model, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``forward(each=...)`` on the last stage: every position's logits, a few rows per pass
    (LOGITS_BUDGET), the same as ``all_logits``; only the last row is returned."""
    if engine == "ggml":
        pytest.importorskip("ggml")
    first, last = tiny.stages([0, 1, 2], engine=engine)
    ids = np.asarray(PROMPT, np.int32)
    rows = last.forward("a", first.forward("a", ids), all_logits=True)
    vocab = tiny.spec.vocab_size
    monkeypatch.setattr(L, "LOGITS_BUDGET", 3 * vocab)
    passes: list[np.ndarray] = []
    out = last.forward("b", first.forward("b", ids), each=lambda x: passes.append(x.copy()))
    assert [len(p) for p in passes] == [3, 3, 3, 1]
    np.testing.assert_allclose(np.concatenate(passes), rows, atol=1e-4)
    np.testing.assert_allclose(out, rows[-1], atol=1e-4)
    assert L.rows_per_pass(vocab, 512) == 3 and L.rows_per_pass(10**9, 512) == 1


def _scores(rows: int, k: int) -> Scores:
    ids = np.arange(rows * (k + 1), dtype=np.int32).reshape(rows, k + 1)
    return Scores(ids, -np.ones((rows, k + 1), np.float32))


def test_scores_frame_round_trip_and_checks() -> None:
    s = _scores(3, 2)
    frame = F.scores_frame(4, 10, s.ids, s.logprobs, True)
    back = F.decode(F.encode(frame))
    ids, lps = F.scores_of(back)
    np.testing.assert_array_equal(ids, s.ids)
    np.testing.assert_array_equal(lps, s.logprobs)
    header = {"step": 4, "pos": 10, "rows": 3, "k": 2, "pick": True}

    def raw(h: dict, payload: bytes) -> bytes:
        data = json.dumps(h).encode()
        return F.FIXED.pack(F.MAGIC, F.VERSION, F.FrameType.SCORES, 0, len(data),
                            len(payload)) + data + payload  # fmt: skip

    payload = frame.payload
    bad = [
        ({**header, "k": 21}, payload, "'k'"),
        ({**header, "rows": 0}, b"", "'rows'"),
        ({**header, "rows": F.MAX_SCORE_ROWS + 1}, payload, "'rows'"),
        ({**header, "pick": 1}, payload, "pick"),
        ({**header, "extra": 1}, payload, "exactly"),
        (header, payload[:-4], "exactly"),
    ]
    for h, p, words in bad:
        with pytest.raises(F.FrameError, match=words):
            F.decode(raw(h, p))
    for ids, lps in [(-s.ids, s.logprobs), (s.ids, s.logprobs * 0 + np.nan),
                     (s.ids, -s.logprobs)]:  # fmt: skip
        with pytest.raises(F.FrameError, match="finite"):
            F.scores_of(F.decode(F.encode(F.scores_frame(0, 0, ids, lps, False))))


def test_tail_setup_is_checked() -> None:
    assert scoring_from({}, b"", 100, 64) is None
    plain = scoring_from({"logprobs": 3}, b"", 100, 64)
    assert plain is not None and plain.k == 3 and plain.prompt is None
    echo = Scoring(2, tuple(PROMPT))
    got = scoring_from(echo.header(), echo.payload(), 100, 64)
    assert got is not None and list(got.prompt) == PROMPT
    cases = [
        ({"logprobs": 21}, b""),
        ({"logprobs": True}, b""),
        ({"logprobs": 1}, b"\0" * 4),  # a prompt without echo
        ({}, b"\0" * 4),
        ({"logprobs": 1, "echo": True}, b"\0" * 5),
        ({"logprobs": 1, "echo": True}, b""),
        ({"logprobs": 1, "echo": True}, b"\0" * 4 * 65),  # past the context
        ({"logprobs": 1, "echo": True}, np.array([5, 100], "<i4").tobytes()),  # vocabulary
    ]
    for header, payload in cases:
        with pytest.raises(ScoringError):
            scoring_from(header, payload, 100, 64)


def test_score_frames_and_the_coordinators_sink(monkeypatch: pytest.MonkeyPatch) -> None:
    """A step's rows go in frames of at most MAX_SCORE_ROWS, the last marked ``pick``; the
    sink files prompt rows by position and returns the pick; what does not fit is refused."""
    monkeypatch.setattr(F, "MAX_SCORE_ROWS", 4)
    prompt = list(range(1, 11))
    frames = score_frames(2, 0, _scores(9, 1), _scores(1, 1))
    assert [(f.header["pos"], f.header["rows"], f.header["pick"]) for f in frames] == [
        (0, 4, False), (4, 4, False), (8, 2, True)
    ]  # fmt: skip
    assert score_frames(0, 0, None, None) == []
    sink = ScoreSink(Scoring(1, tuple(prompt)), 100, prompt)
    got = [sink.take(F.decode(F.encode(f)), 2) for f in frames]
    assert got == [None, None, 0] and sink.picked is not None and sink.picked.token == 0
    echo = sink.echo()
    assert echo[0].token == 1 and echo[0].logprob is None and len(echo) == 10
    assert [e.token for e in echo[1:]] == [r[0] for r in _scores(9, 1).ids.tolist()]
    for frame, step in [
        (F.scores_frame(3, 0, *_parts(1, 1), True), 2),  # a later step's
        (F.scores_frame(2, 0, *_parts(1, 2), True), 2),  # another k
        (F.scores_frame(2, 9, *_parts(2, 1), True), 2),  # a prompt row past the prompt
        (F.scores_frame(2, 0, np.full((1, 2), 100, np.int32), -np.ones((1, 2)), True), 2),
    ]:
        with pytest.raises(ScoringError):
            sink.take(F.decode(F.encode(frame)), step)


def _parts(rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = _scores(rows, k)
    return s.ids, s.logprobs


def test_api_fields() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    chat = parse_openai_chat({"model": "m", "messages": msgs, "logprobs": True,
                              "top_logprobs": 20}).request  # fmt: skip
    assert chat is not None and chat.logprobs and chat.top_logprobs == 20 and not chat.echo
    done = parse_openai_completion({"model": "m", "prompt": [[5, 6]], "logprobs": 0,
                                    "echo": True}).request  # fmt: skip
    assert done is not None and done.prompt_tokens == (5, 6) and done.raw and done.echo
    text = parse_openai_completion({"model": "m", "prompt": "hi"}).request
    assert text is not None and not text.raw and not text.logprobs  # templated, as Ollama
    gen = parse_ollama_generate({"model": "m", "prompt": "x", "context": [1, 2],
                                 "logprobs": True, "top_logprobs": 1}).request  # fmt: skip
    assert gen is not None and gen.context == (1, 2) and gen.top_logprobs == 1
    bad = [
        (parse_openai_chat, {"messages": msgs, "top_logprobs": 3}, "needs logprobs"),
        (parse_openai_chat, {"messages": msgs, "logprobs": 1}, "true or false"),
        (parse_openai_chat, {"messages": msgs, "logprobs": True, "top_logprobs": -1}, "[0, 20]"),
        (parse_openai_completion, {"prompt": "x", "logprobs": 21}, "[0, 20]"),
        (parse_openai_completion, {"prompt": "x", "echo": True}, "echo needs logprobs"),
        (parse_openai_completion, {"prompt": [1, "a"]}, "token ids"),
        (parse_openai_completion, {"prompt": [[1], [2]]}, "one prompt"),
        (parse_ollama_chat, {"messages": msgs, "top_logprobs": 21}, "[0, 20]"),
        (parse_ollama_generate, {"prompt": "x", "context": [-1]}, "context"),
        (parse_ollama_generate, {"prompt": "x", "context": [1], "raw": True}, "raw"),
    ]
    for parse, body, words in bad:
        with pytest.raises(ApiError) as err:
            parse({"model": "m", **body})
        assert err.value.status == 400 and words in err.value.message, (body, err.value.message)
