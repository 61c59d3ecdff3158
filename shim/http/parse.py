"""HTTP request bodies (Ollama's and OpenAI's) -> the one internal ``GenerationRequest``.

Pure functions, no I/O. Each body is checked as hostile input: exact JSON types (a bool is not a
number), every range, and one exception, ``ApiError``, carrying the HTTP status and a message
that names the field. Fields we know but do not support yet (``images``, ``think``, ...) are
refused with 400 when they ask for something; an empty or neutral value asks for nothing and
passes. Fields nobody has defined are ignored, as Ollama does, so newer clients keep working.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeGuard

from llm_omninode.backend.constraint import Constraint, ConstraintError
from llm_omninode.backend.sampling import SamplingError, SamplingOptions
from llm_omninode.request import GenerationRequest, Message, RequestError

from . import logprobs as LP
from . import tools as tool_bodies


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ApiCall:
    """A parsed generation call. ``request`` is None for Ollama's load/unload calls (a body
    with a model and no prompt or messages)."""

    model: str
    request: GenerationRequest | None
    stream: bool
    keep_alive: float | None = None  # seconds; None: the default; < 0: forever
    include_usage: bool = False  # OpenAI stream_options.include_usage


def bad(message: str) -> ApiError:
    return ApiError(400, message)


def _fields(parse: Callable[[Any], Any], value: Any) -> Any:
    """``parse(value)`` (a reader of shim/http/logprobs.py or tools.py), its ValueError as a
    400."""
    try:
        return parse(value)
    except ValueError as exc:
        raise bad(str(exc)) from exc


# ---- small typed getters ---------------------------------------------------------------------
def _is_number(value: object) -> TypeGuard[int | float]:
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]


def get_model(body: dict[str, Any], *, legacy_name: bool = False) -> str:
    model = body.get("model")
    if model is None and legacy_name:  # Ollama's older clients send "name"
        model = body.get("name")
    if model is None:
        raise bad("model is required")
    if not (type(model) is str and 0 < len(model) <= 256 and model.isprintable()):
        raise bad("model must be a non-empty string of at most 256 printable characters")
    return model


def get_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if type(value) is not bool:
        raise bad(f"{name} must be true or false")
    return value


def get_text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and type(value) is not str:
        raise bad(f"{name} must be a string")
    return value


def refuse_if_set(body: dict[str, Any], names: tuple[str, ...], why: str = "") -> None:
    """400 naming the first field here that asks for a feature we do not have."""
    for name in names:
        if _asks(body.get(name)):
            raise bad(f"{name} is not supported yet{why}")


def _asks(value: object) -> bool:
    """Whether a field's value asks for anything (None, "", [], {}, false and 0 do not)."""
    if value is None or value is False:
        return False
    if type(value) in (int, float) and value == 0:
        return False
    return not (isinstance(value, str | list | dict) and len(value) == 0)


# ---- keep_alive ------------------------------------------------------------------------------
_DURATION_RE = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_KEEP_ALIVE = 10 * 365 * 86400.0  # past this, "forever" is what was meant


def parse_keep_alive(value: object) -> float | None:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m", "1h30m", "-1");
    None keeps the default. Negative means forever, 0 unload right away."""
    if value is None:
        return None
    if _is_number(value) and type(value) is not bool:
        seconds = float(value)
    elif type(value) is str and value.strip():
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        magnitude = _duration(text.lstrip("+-"))
        if magnitude is None:
            raise bad(f'keep_alive: not a duration: {value[:40]!r} (try "5m" or 300)')
        seconds = sign * magnitude
    else:
        raise bad('keep_alive must be a number of seconds or a duration such as "5m"')
    return -1.0 if seconds < 0 else min(seconds, MAX_KEEP_ALIVE)


def _duration(text: str) -> float | None:
    """Seconds of a bare number or a Go duration without its sign; None if neither."""
    try:
        number = float(text)  # a bare number is seconds
        return number if math.isfinite(number) else None
    except ValueError:
        pass
    pos, seconds = 0, 0.0
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            return None
        seconds += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return seconds if text and pos == len(text) else None


# ---- Ollama options --------------------------------------------------------------------------
_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "seed", "repeat_penalty", "repeat_last_n")
# resource hints for llama.cpp's runner: they cannot change the text, so they are accepted
_HINTS = frozenset({
    "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock", "numa",
    "low_vram", "f16_kv", "vocab_only", "logits_all", "embedding_only", "num_keep",
    "draft_num_predict",
})  # fmt: skip
# samplers we do not have: accepted only at the value that turns them off
_NEUTRAL = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "penalize_newline": None}  # fmt: skip


@dataclass(frozen=True)
class OllamaOptions:
    sampling: SamplingOptions
    max_tokens: int | None  # None: until the end token or the context is full
    stop: tuple[str, ...]
    num_ctx: int | None


def parse_stop(value: object, where: str = "stop") -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if type(value) is str else value
    if type(items) is not list or len(items) > 16:
        raise bad(f"{where} must be a string or a list of at most 16 strings")
    for i, s in enumerate(items):
        if not (type(s) is str and 0 < len(s) <= 256):
            raise bad(f"{where}[{i}] must be a string of 1..256 characters")
    return tuple(items)


def parse_ollama_options(options: object) -> OllamaOptions:
    if options is None:
        options = {}
    if type(options) is not dict:
        raise bad("options must be an object")
    sampling: dict[str, Any] = {}
    max_tokens: int | None = None
    num_ctx: int | None = None
    for name, value in options.items():
        if value is None or name in _HINTS:
            continue
        if name == "seed" and type(value) is int and value < 0:
            continue  # Ollama's -1: a random seed, which is what no seed gives
        if name in _SAMPLING:
            sampling[name] = value
        elif name == "num_predict":
            if type(value) is not int:
                raise bad("options.num_predict must be an integer (-1: no limit)")
            max_tokens = value if value >= 0 else None  # -1 infinite, -2 fill the context
        elif name == "num_ctx":
            if type(value) is not int or value < 1:
                raise bad("options.num_ctx must be a positive integer")
            num_ctx = min(value, 2**24)
        elif name == "stop":
            continue  # below
        elif name in _NEUTRAL:
            neutral = _NEUTRAL[name]
            if neutral is not None and value != neutral:
                raise bad(f"options.{name} is not supported yet (only {neutral}, which is off)")
        else:
            raise bad(f"options.{str(name)[:40]!r} is not a known option")
    try:
        parsed = SamplingOptions.from_dict(sampling)
    except SamplingError as exc:
        raise bad(f"options: {exc}") from exc
    return OllamaOptions(parsed, max_tokens, parse_stop(options.get("stop"), "options.stop"),
                         num_ctx)  # fmt: skip


# ---- structured output -----------------------------------------------------------------------
def _schema(schema: object, where: str) -> Constraint:
    try:
        return Constraint.json_schema(schema)
    except ConstraintError as exc:
        raise bad(f"{where}: {exc}") from exc


def parse_format(value: object) -> Constraint | None:
    """Ollama's ``format``: ``"json"`` (any JSON object), a JSON schema, or nothing."""
    if value is None or value == "":
        return None
    if value == "json":
        return Constraint.any_json()
    if type(value) is dict:
        return _schema(value, "format")
    raise bad('format must be "json" or a JSON schema object')


def parse_response_format(value: object) -> Constraint | None:
    """OpenAI's ``response_format``: ``{"type": "text"}`` (nothing), ``{"type":
    "json_object"}`` (any JSON object) or ``{"type": "json_schema", "json_schema": {"name",
    "schema", "strict"}}`` (always followed strictly)."""
    if value is None:
        return None
    if type(value) is not dict:
        raise bad("response_format must be an object")
    kind = value.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.any_json()
    if kind != "json_schema":
        raise bad(f"response_format.type must be text, json_object or json_schema, not "
                  f"{str(kind)[:40]!r}")  # fmt: skip
    spec = value.get("json_schema")
    if type(spec) is not dict:
        raise bad("response_format.json_schema must be an object with the schema")
    if spec.get("name") is not None and type(spec["name"]) is not str:
        raise bad("response_format.json_schema.name must be a string")
    get_bool(spec, "strict", True)  # a type check: the schema is always followed
    if "schema" not in spec:
        raise bad("response_format.json_schema.schema is required")
    return _schema(spec["schema"], "response_format.json_schema.schema")


# ---- Ollama bodies ---------------------------------------------------------------------------
def _request(**fields: Any) -> GenerationRequest:
    try:
        return GenerationRequest(**fields)
    except (ValueError, RequestError) as exc:
        raise bad(str(exc)) from exc


def _ollama_call(body: dict[str, Any], build: Callable[[OllamaOptions], GenerationRequest | None]):
    model = get_model(body)
    stream = get_bool(body, "stream", True)
    keep_alive = parse_keep_alive(body.get("keep_alive"))
    constraint = parse_format(body.get("format"))
    refuse_if_set(body, ("think",), " (this model does not think)")
    request = build(parse_ollama_options(body.get("options")))
    if request is not None and constraint is not None:
        request = replace(request, constraint=constraint)
    return ApiCall(model, request, stream, keep_alive)


def parse_ollama_generate(body: dict[str, Any]) -> ApiCall:
    refuse_if_set(body, ("images",), " (this model reads text only)")
    refuse_if_set(body, ("tools",), " (send tools to /api/chat)")
    refuse_if_set(body, ("suffix",), " (fill-in-the-middle)")
    refuse_if_set(body, ("template",), " (the model's own chat template is used)")
    prompt, system = get_text(body, "prompt"), get_text(body, "system")
    raw = get_bool(body, "raw", False)
    scores, context = _fields(LP.chat_logprobs, body), _fields(LP.context_ids, body.get("context"))
    if context and raw:
        raise bad("context continues a templated prompt: not with raw")

    def build(o: OllamaOptions) -> GenerationRequest | None:
        if not prompt:  # no prompt: Ollama's load (or, with keep_alive 0, unload) call
            return None
        return _request(
            model=get_model(body), prompt=prompt, system=system or None, raw=raw,
            options=o.sampling, max_tokens=o.max_tokens, stop=o.stop, num_ctx=o.num_ctx,
            context=context, **scores,
        )  # fmt: skip

    return _ollama_call(body, build)


_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def parse_messages(raw: object, *, openai: bool = False) -> tuple[Message, ...]:
    if type(raw) is not list or len(raw) > 4096:
        raise bad("messages must be a list of at most 4096 messages")
    roles = {**_ROLES, "developer": "system"} if openai else _ROLES
    out = []
    for i, m in enumerate(raw):
        if type(m) is not dict:
            raise bad(f"messages[{i}] must be an object")
        role = m.get("role")
        if openai and role == "function":
            raise bad(f"messages[{i}].role 'function' is not supported (use tools)")
        if type(role) is not str or role not in roles:
            raise bad(f"messages[{i}].role must be one of {', '.join(sorted(roles))}")
        for field in ("images", "function_call", "audio"):
            if _asks(m.get(field)):
                raise bad(f"messages[{i}].{field} is not supported yet")
        content = m.get("content")
        if openai and type(content) is list:
            content = _text_parts(content, f"messages[{i}].content")
        if content is None:
            content = ""
        if type(content) is not str:
            raise bad(f"messages[{i}].content must be a string")
        try:  # with its tool calls, or as a tool's result
            out.append(tool_bodies.message(roles[role], content, m, f"messages[{i}]"))
        except ValueError as exc:
            raise bad(str(exc)) from exc
    return tool_bodies.name_results(tuple(out))


def _text_parts(parts: list, where: str) -> str:
    """OpenAI content parts: text only."""
    texts = []
    for j, part in enumerate(parts):
        if type(part) is not dict or part.get("type") != "text":
            kind = part.get("type") if type(part) is dict else None
            raise bad(f"{where}[{j}]: content of type {kind!r} is not supported yet (text only)")
        text = part.get("text")
        if type(text) is not str:
            raise bad(f"{where}[{j}].text must be a string")
        texts.append(text)
    return "".join(texts)


def parse_ollama_chat(body: dict[str, Any]) -> ApiCall:
    messages = parse_messages(body.get("messages") or [])
    scores = _fields(LP.chat_logprobs, body)

    def build(o: OllamaOptions) -> GenerationRequest | None:
        if not messages:  # no messages: Ollama's load (or unload) call
            return None
        return _request(
            model=get_model(body), messages=messages, options=o.sampling,
            max_tokens=o.max_tokens, stop=o.stop, num_ctx=o.num_ctx, **scores,
            **_fields(tool_bodies.ollama_tool_fields, body),
        )  # fmt: skip

    return _ollama_call(body, build)


# ---- OpenAI bodies ---------------------------------------------------------------------------
def _openai_sampling(body: dict[str, Any]) -> tuple[SamplingOptions, int | None, tuple[str, ...]]:
    refuse_if_set(body, ("functions", "function_call"), " (send tools instead)")
    refuse_if_set(body, ("logit_bias",))
    refuse_if_set(body, ("presence_penalty", "frequency_penalty"))
    n = body.get("n")
    if n is not None and n != 1:
        raise bad("n must be 1 (one choice per request)")
    values: dict[str, Any] = {}
    for name in ("temperature", "top_p", "seed"):
        if body.get(name) is not None:
            values[name] = body[name]
    try:
        sampling = SamplingOptions.from_dict(values)
    except SamplingError as exc:
        raise bad(str(exc)) from exc
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and not (type(max_tokens) is int and max_tokens >= 0):
        raise bad("max_tokens must be a non-negative integer")
    return sampling, max_tokens, parse_stop(body.get("stop"))


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if type(options) is not dict:
        raise bad("stream_options must be an object")
    return get_bool(options, "include_usage", False)


def parse_openai_chat(body: dict[str, Any]) -> ApiCall:
    model = get_model(body)
    messages = parse_messages(body.get("messages"), openai=True)
    if not messages:
        raise bad("messages must not be empty")
    sampling, max_tokens, stop = _openai_sampling(body)
    constraint = parse_response_format(body.get("response_format"))
    tools = _fields(tool_bodies.openai_tool_fields, body)
    if constraint is not None and tools.get("tool_choice") == "required":
        raise bad("response_format cannot go with a required tool call (the call is the answer)")
    request = _request(model=model, messages=messages, options=sampling, max_tokens=max_tokens,
                       stop=stop, constraint=constraint, **_fields(LP.chat_logprobs, body),
                       **tools)  # fmt: skip
    return ApiCall(model, request, get_bool(body, "stream", False), None, _include_usage(body))


def parse_openai_completion(body: dict[str, Any]) -> ApiCall:
    model = get_model(body)
    prompt = body.get("prompt")
    tokens = _fields(LP.prompt_tokens, prompt)  # token ids: fed as they are
    if tokens is None and type(prompt) is list and len(prompt) == 1:
        prompt = prompt[0]
    if tokens is None and type(prompt) is not str:
        raise bad("prompt must be a string or token ids (one prompt per request)")
    refuse_if_set(body, ("suffix",), " (fill-in-the-middle)")
    refuse_if_set(body, ("tools", "tool_choice"), " (send tools to /v1/chat/completions)")
    if body.get("best_of") not in (None, 1):
        raise bad("best_of must be 1")
    # no max_tokens: until the end token, as Ollama's /v1 does (OpenAI itself stops at 16);
    # a text prompt is one user turn in the chat template, as Ollama's /v1 sends it to
    # /api/generate (not raw)
    sampling, max_tokens, stop = _openai_sampling(body)
    request = _request(
        model=model, prompt=None if tokens else prompt, prompt_tokens=tokens, raw=bool(tokens),
        options=sampling, max_tokens=max_tokens, stop=stop,
        constraint=parse_response_format(body.get("response_format")),
        **_fields(LP.completion_logprobs, body),
    )  # fmt: skip
    return ApiCall(model, request, get_bool(body, "stream", False), None, _include_usage(body))
