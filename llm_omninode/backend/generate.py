"""The autoregressive loop: prefill once, then one token per round until a stop condition.

Two halves, so the same bookkeeping serves the in-process path and the shim's network path:

- ``TokenPicker`` chooses tokens from logits. It lives with the last stage (only a 4-byte id
  leaves it) and keeps the sequence's seeded generator and penalty history.
- ``Generation`` is the coordinator's side, free of I/O: fed one token id at a time, it says
  what text to stream (never ending inside a UTF-8 character or a possible stop string) and
  when to stop (end token, stop string, max tokens, context).

``generate()`` drives both with a synchronous ``next_token(seq_id, ids, options)``, which runs
the stages and returns the picked id; ``options`` is given on the prefill call only, when the
last stage sets up the sequence's picker.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from .logprobs import Scores, TokenLogprob, token_logprobs
from .sampling import Sampler, SamplingOptions
from .tokenizer import IncrementalDecoder, Tokenizer
from .tool_calls import ToolCall, ToolCallStream

if TYPE_CHECKING:
    from .constraint import Guide

NextToken = Callable[[str, np.ndarray, "SamplingOptions | None"], int]


@dataclass(frozen=True)
class Chunk:
    text: str
    token_ids: tuple[int, ...] = ()
    done: bool = False
    done_reason: str | None = None  # "stop" (end token or stop string) | "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # with logprobs: each token picked since the last chunk, scored (its text may be in a
    # later chunk, held back by the stop matcher); with echo, the first chunk has the
    # prompt's (token i scored by the logits of position i - 1: the first has no logprob)
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    context: tuple[int, ...] = ()  # the done chunk: prompt and answer ids (Ollama's context)
    # calls the reply made (split_chunk, below): each as it is found, all on the last chunk
    tool_calls: tuple[ToolCall, ...] = ()


class TokenPicker:
    """One per sequence on the last stage: the sampler plus the ids the penalty looks at, and
    the sequence's constraint (backend/constraint.py) if it has one: only ids it allows are
    picked, and it takes each one picked."""

    def __init__(
        self, options: SamplingOptions, recent: Sequence[int] = (), guide: Guide | None = None
    ) -> None:
        self.sampler = Sampler(options)
        self.keep = options.repeat_last_n  # -1: everything
        self.history = self._trim(list(recent))
        self.guide = guide

    def _trim(self, history: list[int]) -> list[int]:
        return history if self.keep < 0 else history[len(history) - self.keep :]

    def pick(self, logits: np.ndarray) -> int:
        if self.guide is not None:
            logits = self.guide.mask(logits)
        token = self.sampler.sample(logits, self.history)
        if self.guide is not None:
            self.guide.advance(token)
        self.history = self._trim([*self.history, token])
        return token


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


class Generation:
    """The coordinator's bookkeeping for one sequence (no I/O: feed it token ids)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int | None,
        stop: Sequence[str] = (),
        context_length: int | None = None,
    ) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt: nothing to condition on")
        if context_length is not None and len(prompt_ids) >= context_length:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens does not fit the context of {context_length}"
            )
        self.tokenizer = tokenizer
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = max_tokens
        self.context_length = context_length
        self.decoder = IncrementalDecoder(tokenizer)
        self.matcher = StopMatcher(stop)
        self.generated = 0
        self.reason = "length"
        self.done = max_tokens == 0
        self._hit = False
        self.answer: list[int] = []  # the ids accepted, end token excluded
        self._scored: list[TokenLogprob] = []  # logprobs not yet handed out in a chunk
        self._prompt_scored: tuple[TokenLogprob, ...] = ()
        self._prompt_seen = False

    def score_prompt(self, scores: Sequence[TokenLogprob]) -> None:
        """The prompt's scores (echo), handed out with the next chunk; once (a replay after a
        failure scores the prompt again)."""
        if not self._prompt_seen:
            self._prompt_scored, self._prompt_seen = tuple(scores), True

    @property
    def n_prompt(self) -> int:
        return len(self.prompt_ids)

    def accept(self, token: int, score: TokenLogprob | None = None) -> list[Chunk]:
        """Take the next picked id (and its logprobs, if asked for); the text chunks it
        releases. Sets ``done`` when it ends."""
        if self.done:
            raise RuntimeError("the sequence has already ended")
        if token in self.tokenizer.eog_ids:
            self.reason, self.done = "stop", True
            return []
        self.generated += 1
        self.answer.append(token)
        if score is not None:
            self._scored.append(score)
        text, self._hit = self.matcher.feed(self.decoder.add(token))
        if self._hit:
            self.reason, self.done = "stop", True
        elif self._at_limit():
            self.done = True
        if text or self._hit:
            return [self._chunk(text, (token,))]
        return []

    def _at_limit(self) -> bool:
        """Max tokens reached, or the context is full."""
        if self.max_tokens is not None and self.generated >= self.max_tokens:
            return True
        full = self.context_length
        return full is not None and self.n_prompt + self.generated >= full

    def finish(self) -> list[Chunk]:
        """The held-back tail (unless a stop string ended it) and the final ``done`` chunk."""
        out = []
        if not self._hit and self.generated:
            tail, hit = self.matcher.feed(self.decoder.flush())
            if hit:
                self.reason = "stop"
            else:
                tail += self.matcher.flush()
            if tail:
                out.append(self._chunk(tail))
        self.done = True
        out.append(
            Chunk(
                "",
                done=True,
                done_reason=self.reason,
                prompt_tokens=self.n_prompt,
                completion_tokens=self.generated,
                logprobs=self._take_scored(),
                prompt_logprobs=self._take_prompt_scored(),
                context=(*self.prompt_ids, *self.answer),
            )
        )
        return out

    def _take_scored(self) -> tuple[TokenLogprob, ...]:
        scored, self._scored = tuple(self._scored), []
        return scored

    def _take_prompt_scored(self) -> tuple[TokenLogprob, ...]:
        scored, self._prompt_scored = self._prompt_scored, ()
        return scored

    def _chunk(self, text: str, ids: tuple[int, ...] = ()) -> Chunk:
        return Chunk(text, ids, prompt_tokens=self.n_prompt, completion_tokens=self.generated,
                     logprobs=self._take_scored(),
                     prompt_logprobs=self._take_prompt_scored())  # fmt: skip


def split_chunk(stream: ToolCallStream, chunk: Chunk, found: list[ToolCall]) -> list[Chunk]:
    """One generated chunk as the chunks to pass on when the reply may call tools: content
    text, a chunk per call found (``text`` empty, ``tool_calls`` set), and on the final chunk
    every call of the reply. ``found`` collects the calls so far."""
    events = stream.feed(chunk.text)
    if chunk.done:
        events += stream.finish()
    out: list[Chunk] = []
    # the chunk's ids and scores go with the first text passed on (or its end), once
    carried = Chunk("", chunk.token_ids, logprobs=chunk.logprobs,
                    prompt_logprobs=chunk.prompt_logprobs)  # fmt: skip
    for e in events:
        if isinstance(e, ToolCall):
            found.append(e)
            out.append(Chunk("", tool_calls=(e,)))
        else:
            out.append(replace(carried, text=e))
            carried = Chunk("")
    if chunk.done:
        ids, scores = carried.token_ids, (carried.logprobs, carried.prompt_logprobs)
        out.append(replace(chunk, text="", token_ids=ids, logprobs=scores[0],
                           prompt_logprobs=scores[1], tool_calls=tuple(found)))  # fmt: skip
    elif carried != Chunk(""):  # text held back: its ids still count (the request log's rate)
        out.append(carried)
    return out


def generate(
    next_token: NextToken,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    *,
    options: SamplingOptions,
    max_tokens: int | None,
    stop: Sequence[str] = (),
    context_length: int | None = None,
    free: Callable[[str], None] | None = None,
    seq_id: str | None = None,
    scored: Callable[[str], tuple[Scores | None, Scores | None]] | None = None,
    echo: bool = False,
) -> Iterator[Chunk]:
    """Stream chunks; the last one has ``done=True`` with the reason and token counts.

    ``scored(seq_id)``, when logprobs are asked for, gives what the last call of
    ``next_token`` scored: the prompt's positions (echo) and the picked token. With ``echo``
    the prompt is run even when no token is wanted."""
    gen = Generation(
        tokenizer, prompt_ids, max_tokens=max_tokens, stop=stop, context_length=context_length
    )
    seq_id = seq_id or uuid.uuid4().hex

    def take(token: int) -> TokenLogprob | None:
        if scored is None:
            return None
        prompt, picked = scored(seq_id)
        if prompt is not None:
            gen.score_prompt([TokenLogprob(prompt_ids[0], None), *token_logprobs(prompt)])
        return token_logprobs(picked)[0] if picked is not None else None

    try:
        if not gen.done or echo:
            token = next_token(seq_id, np.asarray(prompt_ids, dtype=np.int32), options)
            score = take(token)
            while not gen.done:
                yield from gen.accept(token, score)
                if gen.done:
                    break
                token = next_token(seq_id, np.asarray([token], dtype=np.int32), None)
                score = take(token)
    finally:
        if free is not None:
            free(seq_id)
    yield from gen.finish()
