"""The autoregressive loop: prefill once, then one token per round until a stop condition.

``forward(seq_id, x)`` is whatever runs the stages (in-process now, over the network later); it
returns the last stage's logits. Text is streamed so that no chunk ends inside a UTF-8
character or inside a possible stop string.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .sampling import Sampler, SamplingOptions
from .tokenizer import IncrementalDecoder, Tokenizer

Forward = Callable[[str, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Chunk:
    text: str
    token_ids: tuple[int, ...] = ()
    done: bool = False
    done_reason: str | None = None  # "stop" (end token or stop string) | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class StopMatcher:
    """Holds back text that might be the start of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def generate(
    forward: Forward,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    *,
    options: SamplingOptions,
    max_tokens: int | None,
    stop: Sequence[str] = (),
    context_length: int | None = None,
    free: Callable[[str], None] | None = None,
    seq_id: str | None = None,
) -> Iterator[Chunk]:
    """Stream chunks; the last one has ``done=True`` with the reason and token counts."""
    if not prompt_ids:
        raise ValueError("empty prompt: nothing to condition on")
    if context_length is not None and len(prompt_ids) >= context_length:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens does not fit the context of {context_length}"
        )
    seq_id = seq_id or uuid.uuid4().hex
    sampler = Sampler(options)
    decoder = IncrementalDecoder(tokenizer)
    matcher = StopMatcher(stop)
    history = list(prompt_ids)
    n_prompt = len(prompt_ids)
    generated = 0
    reason = "length"
    hit = False
    try:
        if max_tokens == 0:
            yield Chunk("", done=True, done_reason="length", prompt_tokens=n_prompt)
            return
        logits = forward(seq_id, np.asarray(prompt_ids, dtype=np.int32))
        while True:
            token = sampler.sample(logits, history)
            if token in tokenizer.eog_ids:
                reason = "stop"
                break
            history.append(token)
            generated += 1
            text, hit = matcher.feed(decoder.add(token))
            if text or hit:
                yield Chunk(text, (token,), prompt_tokens=n_prompt, completion_tokens=generated)
            if hit:
                reason = "stop"
                break
            if max_tokens is not None and generated >= max_tokens:
                break
            if context_length is not None and len(history) >= context_length:
                break
            logits = forward(seq_id, np.asarray([token], dtype=np.int32))
        if not hit:
            tail, hit = matcher.feed(decoder.flush())
            if hit:
                reason = "stop"
            else:
                tail += matcher.flush()
            if tail:
                yield Chunk(tail, prompt_tokens=n_prompt, completion_tokens=generated)
    finally:
        if free is not None:
            free(seq_id)
    yield Chunk(
        "",
        done=True,
        done_reason=reason,
        prompt_tokens=n_prompt,
        completion_tokens=generated,
    )
