"""Embedding bodies (shim/http/embed_parse.py) and the pooled STEP frame (net/frames.py):
pure checks, no shim."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from omninode_shim.http import embed_parse as P
from omninode_shim.http.parse import ApiError

from llm_omninode.net import frames as F


def test_ollama_bodies() -> None:
    call = P.parse_ollama_embed({"model": "m", "input": ["a", "b"], "truncate": False,
                                 "dimensions": 8, "keep_alive": "1m",
                                 "options": {"num_ctx": 32}})  # fmt: skip
    assert call.inputs == ("a", "b") and not call.truncate and call.dimensions == 8
    assert call.keep_alive == 60 and call.num_ctx == 32 and call.normalize
    assert P.parse_ollama_embed({"model": "m", "input": ""}).inputs == ()
    assert P.parse_ollama_embed({"model": "m"}).inputs == ()
    legacy = P.parse_ollama_embeddings({"model": "m", "prompt": "hi"})
    assert legacy.inputs == ("hi",) and not legacy.normalize
    for body in ({"model": "m", "input": 3}, {"model": "m", "input": [None]},
                 {"model": "m", "input": "a", "dimensions": True},
                 {"model": "m", "input": "a", "options": {"temperature": "hot"}}):  # fmt: skip
        with pytest.raises(ApiError) as info:
            P.parse_ollama_embed(body)
        assert info.value.status == 400


def test_openai_bodies() -> None:
    assert P.parse_openai_embeddings({"model": "m", "input": "x"}).inputs == ("x",)
    assert P.parse_openai_embeddings({"model": "m", "input": [1, 2]}).inputs == ((1, 2),)
    call = P.parse_openai_embeddings({"model": "m", "input": [[1], [2, 3]],
                                      "encoding_format": "base64"})  # fmt: skip
    assert call.inputs == ((1,), (2, 3)) and call.base64
    for raw in ([], [1, "a"], [[1], 2], [True], [[2**31]], ["a", ""], {"a": 1}):
        with pytest.raises(ApiError):
            P.parse_openai_embeddings({"model": "m", "input": raw})


def test_finish_and_base64() -> None:
    v = np.array([3.0, 4.0, 12.0], np.float32)
    unit = P.finish(v, P.EmbedCall("m", ()))
    np.testing.assert_allclose(unit, v / 13, rtol=1e-6)
    two = P.finish(v, P.EmbedCall("m", (), dimensions=2))
    np.testing.assert_allclose(two, [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(P.finish(v, P.EmbedCall("m", (), normalize=False)), v)
    with pytest.raises(ApiError):
        P.finish(np.array([np.inf, 1.0]), P.EmbedCall("m", ()))
    item = P.openai_item(unit, 3, True)
    assert item["index"] == 3 and item["object"] == "embedding"
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(item["embedding"]), "<f4"), unit)


def test_pooled_step_frame() -> None:
    vec = np.arange(6, dtype="<f4")
    frame = F.pooled_step(4, 17, vec.tobytes(), 6)
    back = F.decode(F.encode(frame))
    assert back.header == {"step": 4, "pos": 17, "shape": [1, 6], "dtype": "float32",
                           "more": False, "pooled": True}  # fmt: skip
    assert F.pooled_bytes(back, 6) == vec.tobytes()
    with pytest.raises(F.FrameError):
        F.pooled_bytes(back, 5)  # not the model's width
    token = F.decode(F.encode(F.token_step(0, 0, [1])))
    assert "pooled" not in token.header
    with pytest.raises(F.FrameError):
        F.pooled_bytes(token, 1)
    for bad in ({"more": True}, {"shape": [2, 3]}, {"pooled": 1}):
        header = {**frame.header, **bad}
        with pytest.raises(F.FrameError):
            F.encode(F.Frame(F.FrameType.STEP, header, vec.tobytes()))
    wire = bytearray(F.encode(frame))
    wire[F.FIXED_SIZE + 17] |= F.STEP_MORE  # flags: pooled and more, as no stage sends them
    with pytest.raises(F.FrameError, match="not marked more"):
        F.decode(bytes(wire))
