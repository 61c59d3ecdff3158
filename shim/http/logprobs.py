"""Logprobs in the APIs' own shapes, and the request fields that ask for them (pure).

- OpenAI chat and Ollama (>= 0.12): a list of ``{token, logprob, bytes, top_logprobs: [{token,
  logprob, bytes}]}``, one per generated token (OpenAI wraps it in ``{"content": [...]}``).
- OpenAI's legacy completions: ``{tokens, token_logprobs, top_logprobs: [{token: logprob}],
  text_offset}``; with ``echo`` the prompt's tokens come first, the first one's logprob null.

Values are the log-softmax of the model's raw logits (backend/logprobs.py), whatever the
sampling options.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llm_omninode.backend.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from llm_omninode.backend.tokenizer import Tokenizer

MAX_PROMPT_IDS = 2**24  # a prompt of token ids; the model's context is the real bound


# ---- request fields (ValueError names the field; parse.py makes it a 400) ---------------------
def bad(message: str) -> ValueError:
    return ValueError(message)


def get_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and type(value) is not bool:
        raise bad(f"{name} must be true or false")
    return bool(value)


def _top(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if value is None:
        return 0
    if type(value) is not int or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise bad(f"{name} must be an integer in [0, {MAX_TOP_LOGPROBS}]")
    return value


def chat_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI chat's and Ollama's ``logprobs`` (true/false) and ``top_logprobs`` (0..20), as
    GenerationRequest fields."""
    asked = get_bool(body, "logprobs")
    top = _top(body, "top_logprobs")
    if top and not asked:
        raise bad("top_logprobs needs logprobs: true")
    return {"logprobs": asked, "top_logprobs": top}


def completion_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI completions' ``logprobs`` (an integer 0..20: the top k; null: none) and
    ``echo``."""
    value = body.get("logprobs")
    if value is not None and (type(value) is not int or not 0 <= value <= MAX_TOP_LOGPROBS):
        raise bad(f"logprobs must be null or an integer in [0, {MAX_TOP_LOGPROBS}]")
    echo = get_bool(body, "echo")
    if echo and value is None:  # the prompt's text comes back with its scores only
        raise bad(f"echo needs logprobs (an integer in [0, {MAX_TOP_LOGPROBS}])")
    return {"logprobs": value is not None, "top_logprobs": value or 0, "echo": echo}


def prompt_tokens(value: object) -> tuple[int, ...] | None:
    """A completion prompt of token ids (a list of integers, or a list holding one such list);
    None when the prompt is text. Ranges are checked against the vocabulary later."""
    if type(value) is list and len(value) == 1 and type(value[0]) is list:
        value = value[0]
    if type(value) is not list or not value or type(value[0]) is not int:
        return None
    if len(value) > MAX_PROMPT_IDS or not all(type(t) is int and t >= 0 for t in value):
        raise bad(f"prompt of token ids must be 1..{MAX_PROMPT_IDS} non-negative integers")
    return tuple(value)


def context_ids(value: object) -> tuple[int, ...]:
    """Ollama's ``context``: the ids an earlier /api/generate answer returned."""
    if value is None or value == []:
        return ()
    if type(value) is not list or len(value) > MAX_PROMPT_IDS:
        raise bad("context must be a list of token ids")
    if not all(type(t) is int and t >= 0 for t in value):
        raise bad("context must hold non-negative integer token ids")
    return tuple(value)


# ---- responses -------------------------------------------------------------------------------
def _piece(tokenizer: Tokenizer, token: int) -> tuple[str, list[int]]:
    data = tokenizer.token_bytes(token)
    return data.decode("utf-8", "replace"), list(data)


def entries(tokenizer: Tokenizer, scored: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """OpenAI chat's ``logprobs.content`` and Ollama's ``logprobs``."""
    out = []
    for s in scored:
        text, raw = _piece(tokenizer, s.token)
        top = []
        for token, logprob in s.top:
            t_text, t_raw = _piece(tokenizer, token)
            top.append({"token": t_text, "logprob": logprob, "bytes": t_raw})
        out.append({"token": text, "logprob": s.logprob, "bytes": raw, "top_logprobs": top})
    return out


def legacy(tokenizer: Tokenizer, scored: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """OpenAI completions' ``logprobs`` of these tokens (an echoed prompt's first has a null
    logprob); text offsets count characters from ``offset``."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                           "text_offset": []}  # fmt: skip
    done = b""
    for s in scored:
        data = tokenizer.token_bytes(s.token)
        out["text_offset"].append(offset + len(done.decode("utf-8", "ignore")))
        done += data
        out["tokens"].append(data.decode("utf-8", "replace"))
        out["token_logprobs"].append(s.logprob)
        top = None if s.logprob is None else {_piece(tokenizer, t)[0]: v for t, v in s.top}
        out["top_logprobs"].append(top)
    return out


def prompt_text(tokenizer: Tokenizer, tokens: Sequence[int]) -> str:
    """The prompt as the model saw it (template and special tokens included): echo's text."""
    return b"".join(tokenizer.token_bytes(t) for t in tokens).decode("utf-8", "replace")
