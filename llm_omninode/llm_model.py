"""``llm -m omni/<alias>``: an llm.Model whose prompts a shim runs (llm_omninode/client.py),
and the same model for llm's async API (``llm.get_async_model``): ``AsyncOmniModel``.

While a model loads first (stages planned, shards fetched, loaded), the shim reports progress;
when stderr is a terminal, one line there shows it, erased before the answer starts.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

import llm
from pydantic import Field, field_validator


class _OmniBase:
    """What both models share: options, name, the request a prompt becomes, the usage."""

    can_stream = True
    supports_tools = True  # a model whose template takes none says so when asked (llm_tools.py)
    supports_schema = True  # `llm --schema`: the answer is constrained to it (JSON)
    alias: str

    class Options(llm.Options):
        temperature: float | None = Field(None, description="Sampling temperature; 0 is greedy")
        top_k: int | None = Field(None, description="Keep the k most likely tokens (0: off)")
        top_p: float | None = Field(None, description="Nucleus sampling threshold")
        min_p: float | None = Field(None, description="Drop tokens below min_p x the top prob")
        repeat_penalty: float | None = Field(None, description="Penalty for repeated tokens")
        repeat_last_n: int | None = Field(None, description="How far back the penalty looks")
        seed: int | None = Field(None, description="Random seed: same seed, same text")
        max_tokens: int | None = Field(None, description="Most tokens to generate")
        stop: str | None = Field(
            None, description='Stop string, or a JSON list of them: \'["\\n\\n", "User:"]\''
        )

        @field_validator("stop")
        @classmethod
        def _stop_is_text_or_list(cls, value):
            if value is not None:
                _parse_stop(value)
            return value

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.model_id = f"omni/{alias}"

    def __str__(self) -> str:
        return f"OmniNode: {self.model_id}"

    def build_request(self, prompt, conversation):
        from .backend.constraint import Constraint
        from .backend.sampling import SamplingOptions
        from .llm_tools import request_messages, request_tools
        from .request import DEFAULT_MAX_TOKENS, GenerationRequest

        o = prompt.options
        # prompt.messages is the whole chain (llm 0.36): earlier turns, tool calls and results
        system, messages = request_messages(prompt)
        options = SamplingOptions().updated(
            temperature=o.temperature,
            top_k=o.top_k,
            top_p=o.top_p,
            min_p=o.min_p,
            repeat_penalty=o.repeat_penalty,
            repeat_last_n=o.repeat_last_n,
            seed=o.seed,
        )
        return GenerationRequest(
            model=self.alias,
            messages=messages,
            tools=request_tools(prompt),
            system=system,
            options=options,
            max_tokens=o.max_tokens if o.max_tokens is not None else DEFAULT_MAX_TOKENS,
            stop=_parse_stop(o.stop) if o.stop else (),
            constraint=Constraint.json_schema(prompt.schema) if prompt.schema else None,
        )

    def request_for(self, prompt, conversation):
        """``build_request``, a bad option as llm's ModelError."""
        try:
            return self.build_request(prompt, conversation)
        except ValueError as exc:
            raise llm.ModelError(str(exc)) from exc

    @staticmethod
    def note(response, chunk) -> None:
        """What a chunk says about the response: a tool call the reply made; on the last,
        why it ended and the tokens counted."""
        for call in chunk.tool_calls:
            response.add_tool_call(llm.ToolCall(call.name, call.arguments))
        if chunk.done:
            response.response_json = {"done_reason": chunk.done_reason}
            response.set_usage(input=chunk.prompt_tokens, output=chunk.completion_tokens)


class OmniModel(_OmniBase, llm.Model):  # type: ignore[misc]  # Options: ours
    def execute(self, prompt, stream, response, conversation):
        from .client import ShimClient, ShimError

        request = self.request_for(prompt, conversation)
        line = LoadLine(self.alias)
        try:
            with ShimClient.connect() as client:
                for chunk in client.generate(request, line.show):
                    line.clear()
                    if chunk.text:
                        yield chunk.text
                    self.note(response, chunk)
        except ShimError as exc:
            raise llm.ModelError(str(exc)) from exc
        finally:
            line.clear()


class AsyncOmniModel(_OmniBase, llm.AsyncModel):  # type: ignore[misc]  # Options: ours
    """The same model, its prompts run on the caller's event loop (no thread blocks)."""

    async def execute(self, prompt, stream, response, conversation):
        from .client import AsyncShimClient, ShimError

        request = self.request_for(prompt, conversation)
        line = LoadLine(self.alias)
        try:
            async with await AsyncShimClient.connect() as client:
                async for chunk in client.generate(request, line.show):
                    line.clear()
                    if chunk.text:
                        yield chunk.text
                    self.note(response, chunk)
        except ShimError as exc:
            raise llm.ModelError(str(exc)) from exc
        finally:
            line.clear()


class LoadLine:
    """The shim's load reports as one line on ``err`` (stderr), rewritten in place, only if
    it is a terminal (a log or a pipe gets nothing); ``clear`` erases it."""

    def __init__(self, alias: str, err: IO[str] | None = None) -> None:
        self.alias = alias
        self.err = err if err is not None else sys.stderr
        self.shown = False

    def show(self, report: dict[str, Any]) -> None:
        if not self.err.isatty():
            return
        self.err.write("\r\x1b[K" + load_text(self.alias, report))
        self.err.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.shown = False
            self.err.write("\r\x1b[K")
            self.err.flush()


def load_text(alias: str, report: dict[str, Any]) -> str:
    """``loading smollm2: 1/2 stages, 40.1/86.4 MiB fetched`` from a shim's load report."""

    def count(key: str) -> int:
        value = report.get(key)
        return value if type(value) is int and value >= 0 else 0

    text = f"omni: loading {alias}: {count('loaded')}/{count('stages')} stages"
    if count("total"):
        text += f", {count('fetched') / 2**20:.1f}/{count('total') / 2**20:.1f} MiB fetched"
    return text


def _parse_stop(value: str) -> tuple[str, ...]:
    if value.startswith("["):
        try:
            items = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"stop: not a JSON list: {exc}") from exc
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            raise ValueError("stop: a JSON list of non-empty strings")
        return tuple(items)
    return (value,)
