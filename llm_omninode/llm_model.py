"""``llm -m omni/<alias>``: an llm.Model whose prompts a shim runs (llm_omninode/client.py)."""

from __future__ import annotations

import json

import llm
from pydantic import Field, field_validator


class OmniModel(llm.Model):
    can_stream = True
    supports_schema = True  # `llm --schema`: the answer is constrained to it (JSON)

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
        from .request import DEFAULT_MAX_TOKENS, GenerationRequest, Message

        o = prompt.options
        messages: list[Message] = []
        system = prompt.system or None
        for previous in conversation.responses if conversation else []:
            if previous.prompt.system and system is None:
                system = previous.prompt.system
            messages.append(Message("user", previous.prompt.prompt or ""))
            messages.append(Message("assistant", previous.text_or_raise()))
        messages.append(Message("user", prompt.prompt or ""))
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
            messages=tuple(messages),
            system=system,
            options=options,
            max_tokens=o.max_tokens if o.max_tokens is not None else DEFAULT_MAX_TOKENS,
            stop=_parse_stop(o.stop) if o.stop else (),
            constraint=Constraint.json_schema(prompt.schema) if prompt.schema else None,
        )

    def execute(self, prompt, stream, response, conversation):
        from .client import ShimClient, ShimError

        try:
            request = self.build_request(prompt, conversation)
            client = ShimClient.connect()
        except (ValueError, ShimError) as exc:
            raise llm.ModelError(str(exc)) from exc
        prompt_tokens = completion_tokens = 0
        with client:
            try:
                for chunk in client.generate(request):
                    if chunk.text:
                        yield chunk.text
                    prompt_tokens, completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
                    if chunk.done:
                        response.response_json = {"done_reason": chunk.done_reason}
            except ShimError as exc:
                raise llm.ModelError(str(exc)) from exc
        response.set_usage(input=prompt_tokens, output=completion_tokens)


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
