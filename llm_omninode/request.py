"""The one internal request type: the llm plugin and the HTTP adapters all build this.

On the wire (plugin -> shim, shim -> coordinator) it travels as the JSON object of
``to_wire``; ``from_wire`` reads one back and treats it as hostile, since it comes from the
network: known keys only, exact types (a bool is not an int), bounded sizes, and one exception
type, ``RequestError``, whose message names the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .backend.constraint import Constraint, ConstraintError
from .backend.logprobs import MAX_TOP_LOGPROBS
from .backend.sampling import SamplingError, SamplingOptions
from .backend.tool_calls import (
    ToolCall,
    ToolSpecError,
    calls_from_json,
    calls_json,
    check_choice,
    check_tools,
    tool_messages_view,
)

DEFAULT_MAX_TOKENS = 512

ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_MESSAGES = 4096
MAX_TEXT_BYTES = 1024 * 1024  # one message's content, the prompt or the system prompt (UTF-8)
MAX_TOTAL_TEXT_BYTES = 8 * 1024 * 1024  # all of a request's text together
MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_MODEL_CHARS = 256
MAX_MAX_TOKENS = 2**31 - 1  # far past any context; bounds what a peer can make us count to
MAX_NUM_CTX = 2**24  # a per-request context cap; the model's own is the real bound
MAX_TOOL_REF_CHARS = 256  # a tool message's tool_name or tool_call_id
_WIRE_KEYS = (
    "model", "messages", "prompt", "system", "raw", "options", "max_tokens", "stop", "num_ctx",
    "constraint", "tools", "tool_choice", "forced_tool",
)  # fmt: skip
_MESSAGE_KEYS = frozenset({"role", "content", "tool_calls", "tool_name", "tool_call_id"})


class RequestError(ValueError):
    """A request that cannot be served as sent; the message names the field."""


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's calls
    tool_name: str | None = None  # a tool result: the function it answers (Ollama's field)
    tool_call_id: str | None = None  # a tool result: the call it answers (OpenAI's field)

    def to_dict(self) -> dict[str, Any]:
        """The wire form; the tool fields only when set (older shims take the rest)."""
        return self._doc(calls_json, "tool_name")

    def template_view(self) -> dict[str, Any]:
        """The message as chat templates read it (Hugging Face's shape)."""
        return self._doc(tool_messages_view, "name")

    def _doc(self, calls: Callable[[tuple[ToolCall, ...]], Any], name_key: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            doc["tool_calls"] = calls(self.tool_calls)
        if self.tool_name is not None:
            doc[name_key] = self.tool_name
        if self.tool_call_id is not None:
            doc["tool_call_id"] = self.tool_call_id
        return doc


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    # chat when ``messages`` is set (rendered with the model's template); else a completion of
    # ``prompt``, templated as one user turn unless ``raw``
    messages: tuple[Message, ...] = ()
    prompt: str | None = None
    system: str | None = None
    raw: bool = False
    options: SamplingOptions = field(default_factory=SamplingOptions)
    max_tokens: int | None = DEFAULT_MAX_TOKENS  # None: until end of generation or context
    stop: tuple[str, ...] = ()
    num_ctx: int | None = None  # a smaller context for this request (Ollama's num_ctx)
    # HTTP only (not on the plugin's wire): a prompt of token ids (raw: fed as they are);
    # ids of an earlier answer's ``context`` the templated prompt continues (Ollama's)
    prompt_tokens: tuple[int, ...] | None = None
    context: tuple[int, ...] = ()
    logprobs: bool = False  # each picked token's log-probability ...
    top_logprobs: int = 0  # ... and the most likely alternatives (0..MAX_TOP_LOGPROBS)
    echo: bool = False  # the prompt's own tokens scored too (with logprobs)
    constraint: Constraint | None = None  # structured output: what the answer must match
    # functions the model may call (OpenAI's tool specs, checked by tool_calls.check_tools)
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str = "auto"  # "auto" | "none" | "required"
    forced_tool: str | None = None  # the function that must be called (tool_choice "required")

    def __post_init__(self) -> None:
        if not self.messages and self.prompt is None and self.prompt_tokens is None:
            raise ValueError("a request needs messages or a prompt")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        if (self.top_logprobs or self.echo) and not self.logprobs:
            raise ValueError("top_logprobs and echo need logprobs")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if self.num_ctx is not None and not 1 <= self.num_ctx <= MAX_NUM_CTX:
            raise ValueError(f"num_ctx must be in [1, {MAX_NUM_CTX}]")
        choice, _ = check_choice(self.tool_choice, self.forced_tool, self.tools)
        object.__setattr__(self, "tool_choice", choice)  # a named function is required

    def chat_messages(self) -> list[dict[str, Any]]:
        """Messages for the chat template, the system prompt first."""
        out = []
        if self.system:
            out.append({"role": "system", "content": self.system})
        if self.messages:
            out.extend(m.template_view() for m in self.messages)
        else:
            out.append({"role": "user", "content": self.prompt or ""})
        return out

    # ---- wire ------------------------------------------------------------------------------
    def to_wire(self) -> dict[str, Any]:
        """A JSON-able object with every field (``num_ctx``, ``constraint`` and the tool fields
        only when set, so shims that predate them still take the request); ``from_wire`` reads
        it back."""
        doc: dict[str, Any] = {
            "model": self.model,
            "messages": [m.to_dict() for m in self.messages],
            "prompt": self.prompt,
            "system": self.system,
            "raw": self.raw,
            "options": self.options.to_dict(),
            "max_tokens": self.max_tokens,
            "stop": list(self.stop),
        }
        if self.num_ctx is not None:
            doc["num_ctx"] = self.num_ctx
        if self.constraint is not None:
            doc["constraint"] = self.constraint.to_wire()
        if self.tools:
            doc["tools"] = list(self.tools)
        if self.tool_choice != "auto":
            doc["tool_choice"] = self.tool_choice
        if self.forced_tool is not None:
            doc["forced_tool"] = self.forced_tool
        return doc

    @classmethod
    def from_wire(cls, doc: object) -> GenerationRequest:
        """A request from a peer's JSON object; RequestError for anything out of bounds.

        Only ``model`` is required; a missing field takes its default.
        """
        if not isinstance(doc, dict):
            raise RequestError("request must be a JSON object")
        unknown = sorted(repr(k)[:40] for k in doc if k not in _WIRE_KEYS)
        if unknown:  # a hostile doc may hold thousands: name a few
            raise RequestError(f"request has unknown field(s): {', '.join(unknown[:5])}")
        if "model" not in doc:
            raise RequestError("request.model is missing")
        text = _TextBudget()
        model = doc["model"]
        if not (type(model) is str and 0 < len(model) <= MAX_MODEL_CHARS and model.isprintable()):
            raise RequestError(f"model must be 1..{MAX_MODEL_CHARS} printable characters")

        raw_messages = doc.get("messages", [])
        if type(raw_messages) is not list or len(raw_messages) > MAX_MESSAGES:
            raise RequestError(f"messages must be a list of at most {MAX_MESSAGES}")
        messages = [_message_from_wire(i, m, text) for i, m in enumerate(raw_messages)]

        prompt, system = (doc.get(k) for k in ("prompt", "system"))
        prompt = None if prompt is None else text.take("prompt", prompt)
        system = None if system is None else text.take("system", system)
        raw = doc.get("raw", False)
        if type(raw) is not bool:
            raise RequestError("raw must be true or false")
        try:
            options = SamplingOptions.from_dict(doc.get("options", {}))
        except SamplingError as exc:
            raise RequestError(f"options: {exc}") from exc
        max_tokens = doc.get("max_tokens", DEFAULT_MAX_TOKENS)
        if max_tokens is not None and not (
            type(max_tokens) is int and 0 <= max_tokens <= MAX_MAX_TOKENS
        ):
            raise RequestError(f"max_tokens must be null or an integer in [0, {MAX_MAX_TOKENS}]")
        raw_stop = doc.get("stop", [])
        if type(raw_stop) is not list or len(raw_stop) > MAX_STOP:
            raise RequestError(f"stop must be a list of at most {MAX_STOP} strings")
        stop = []
        for i, s in enumerate(raw_stop):
            if not (type(s) is str and 0 < len(s) <= MAX_STOP_CHARS):
                raise RequestError(f"stop[{i}] must be a string of 1..{MAX_STOP_CHARS} characters")
            stop.append(text.take(f"stop[{i}]", s))
        num_ctx = doc.get("num_ctx")
        if num_ctx is not None and not (type(num_ctx) is int and 1 <= num_ctx <= MAX_NUM_CTX):
            raise RequestError(f"num_ctx must be null or an integer in [1, {MAX_NUM_CTX}]")
        constraint = doc.get("constraint")
        try:
            constraint = None if constraint is None else Constraint.from_wire(constraint)
        except ConstraintError as exc:
            raise RequestError(f"constraint: {exc}") from exc
        tool_choice, forced_tool = doc.get("tool_choice", "auto"), doc.get("forced_tool")
        try:
            tools = check_tools(doc.get("tools"))
            if type(tool_choice) is not str or type(forced_tool) not in (str, type(None)):
                raise RequestError("tool_choice and forced_tool must be strings")
            return cls(
                model, tuple(messages), prompt, system, raw, options, max_tokens, tuple(stop),
                num_ctx, constraint=constraint, tools=tools, tool_choice=tool_choice,
                forced_tool=forced_tool,
            )  # fmt: skip
        except ValueError as exc:  # the dataclass's own rules (messages or a prompt, ...)
            raise RequestError(str(exc)) from exc


def _message_from_wire(i: int, m: object, text: _TextBudget) -> Message:
    if type(m) is not dict or not {"role", "content"} <= set(m) <= _MESSAGE_KEYS:
        raise RequestError(f"messages[{i}] must be an object with role, content and tool fields")
    role = m["role"]
    if type(role) is not str or role not in ROLES:
        raise RequestError(f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}")
    content = text.take(f"messages[{i}].content", m["content"])
    refs = {}
    for key in ("tool_name", "tool_call_id"):
        value = m.get(key)
        if value is not None and not (type(value) is str and len(value) <= MAX_TOOL_REF_CHARS):
            raise RequestError(f"messages[{i}].{key}: at most {MAX_TOOL_REF_CHARS} characters")
        refs[key] = None if value is None else text.take(f"messages[{i}].{key}", value)
    try:
        calls = calls_from_json(m.get("tool_calls", []))
        if calls:  # arguments count against the request's text like any other text
            args = json.dumps(calls_json(calls), ensure_ascii=False)
            text.take(f"messages[{i}].tool_calls", args)
    except ToolSpecError as exc:
        raise RequestError(f"messages[{i}].{exc}") from exc
    return Message(role, content, calls, refs["tool_name"], refs["tool_call_id"])


class _TextBudget:
    """Checks each text field and counts the request's UTF-8 bytes against the total cap."""

    def __init__(self) -> None:
        self.used = 0

    def take(self, name: str, value: object) -> str:
        if type(value) is not str:
            raise RequestError(f"{name} must be a string")
        if len(value) > MAX_TEXT_BYTES:  # characters <= bytes: refuse before encoding
            raise RequestError(f"{name} is longer than {MAX_TEXT_BYTES} bytes")
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError as exc:  # JSON can carry lone surrogates such as "\ud800"
            raise RequestError(f"{name} is not valid Unicode (lone surrogate)") from exc
        if size > MAX_TEXT_BYTES:
            raise RequestError(f"{name} is longer than {MAX_TEXT_BYTES} bytes")
        self.used += size
        if self.used > MAX_TOTAL_TEXT_BYTES:
            raise RequestError(f"{name}: the request's text exceeds {MAX_TOTAL_TEXT_BYTES} bytes")
        return value
