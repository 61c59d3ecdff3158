"""Embedding request bodies (Ollama's /api/embed and /api/embeddings, OpenAI's /v1/embeddings)
-> ``EmbedCall``, and a pooled vector -> what the API returns. Pure functions, no I/O; bodies
are checked as hostile input, as parse.py does for generation."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm_omninode.backend.pooling import l2_normalized

from .parse import ApiError, bad, get_model, parse_keep_alive, parse_ollama_options

MAX_INPUTS = 2048  # inputs in one request (OpenAI's limit)
MAX_ID = 2**31 - 1


@dataclass(frozen=True)
class EmbedCall:
    model: str
    inputs: tuple[str | tuple[int, ...], ...]  # texts, or token ids (OpenAI's)
    truncate: bool = True  # cut an input longer than the context (else 400)
    dimensions: int | None = None  # keep the first N values (then scaled to unit length)
    keep_alive: float | None = None
    num_ctx: int | None = None  # Ollama's options.num_ctx: a smaller context to cut to
    normalize: bool = True  # unit length (all but the legacy /api/embeddings)
    base64: bool = False  # OpenAI's encoding_format "base64"


def _count(inputs: list) -> list:
    if len(inputs) > MAX_INPUTS:
        raise bad(f"input: at most {MAX_INPUTS} inputs per request, got {len(inputs)}")
    return inputs


def _dimensions(body: dict[str, Any]) -> int | None:
    value = body.get("dimensions")
    if value is None:
        return None
    if type(value) is not int or not 1 <= value <= MAX_ID:
        raise bad("dimensions must be a positive integer")
    return value


def _truncate(body: dict[str, Any]) -> bool:
    value = body.get("truncate", True)
    if type(value) is not bool:
        raise bad("truncate must be true or false")
    return value


def parse_ollama_embed(body: dict[str, Any]) -> EmbedCall:
    """/api/embed: ``input`` a string or a list of strings (an empty string: none, which
    only loads the model)."""
    model = get_model(body)
    raw = body.get("input")
    if raw is None or raw == "":
        inputs: list = []
    elif type(raw) is str:
        inputs = [raw]
    elif type(raw) is list and all(type(x) is str for x in raw):
        inputs = _count(raw)
    else:
        raise bad("input must be a string or a list of strings")
    options = parse_ollama_options(body.get("options"))
    return EmbedCall(model, tuple(inputs), _truncate(body), _dimensions(body),
                     parse_keep_alive(body.get("keep_alive")), options.num_ctx)  # fmt: skip


def parse_ollama_embeddings(body: dict[str, Any]) -> EmbedCall:
    """The legacy /api/embeddings: one ``prompt`` (empty: only load the model); its vector is
    returned as the model pools it, not normalised (as Ollama does)."""
    model = get_model(body)
    prompt = body.get("prompt", "")
    if type(prompt) is not str:
        raise bad("prompt must be a string")
    options = parse_ollama_options(body.get("options"))
    return EmbedCall(model, (prompt,) if prompt else (), True, None,
                     parse_keep_alive(body.get("keep_alive")), options.num_ctx,
                     normalize=False)  # fmt: skip


def _ids(value: list, where: str) -> tuple[int, ...]:
    if not value:
        raise bad(f"{where} must not be empty")
    if not all(type(t) is int and 0 <= t <= MAX_ID for t in value):
        raise bad(f"{where} must hold non-negative integer token ids")
    return tuple(value)


def parse_openai_embeddings(body: dict[str, Any]) -> EmbedCall:
    """/v1/embeddings: ``input`` a string, a list of strings, a list of token ids or a list
    of such lists; none may be empty."""
    model = get_model(body)
    raw = body.get("input")
    inputs: list
    if type(raw) is str:
        inputs = [raw]
    elif type(raw) is list and raw and all(type(x) is str for x in raw):
        inputs = _count(raw)
    elif type(raw) is list and raw and all(type(x) is int for x in raw):
        inputs = [_ids(raw, "input")]
    elif type(raw) is list and raw and all(type(x) is list for x in raw):
        inputs = [_ids(x, f"input[{i}]") for i, x in enumerate(_count(raw))]
    else:
        raise bad("input must be a non-empty string, list of strings, list of token ids, or "
                  "list of lists of token ids")  # fmt: skip
    if any(x == "" for x in inputs):
        raise bad("input must not hold empty strings")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise bad('encoding_format must be "float" or "base64"')
    return EmbedCall(model, tuple(inputs), True, _dimensions(body), base64=fmt == "base64")


def finish(vector: np.ndarray, call: EmbedCall) -> np.ndarray:
    """A pooled vector as the API returns it: Ollama scales it to unit length, then keeps
    ``dimensions`` values and scales those again; the legacy route leaves it as it is."""
    if not call.normalize:
        return np.asarray(vector, np.float32)
    try:
        v = l2_normalized(vector)
        if call.dimensions is not None and call.dimensions < v.size:
            v = l2_normalized(v[: call.dimensions])
    except ValueError as exc:  # NaN or infinity
        raise ApiError(500, f"the model computed a bad embedding: {exc}") from exc
    return v


def openai_item(vector: np.ndarray, index: int, as_base64: bool) -> dict[str, Any]:
    """One entry of /v1/embeddings' ``data``: floats, or base64 of little-endian float32."""
    values: Any = (
        base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")
        if as_base64
        else vector.tolist()
    )
    return {"object": "embedding", "embedding": values, "index": index}
