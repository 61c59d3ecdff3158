"""Tool calling: tool specs checked, which call syntax a chat template teaches, and the model's
calls found in its text (pure functions and a small streaming splitter, no I/O).

A model calls a tool by writing text its template taught it. The syntax is the family's:

- ``hermes`` (Qwen2.5, Qwen3, Hermes, SmolLM3): ``<tool_call>{"name": .., "arguments": {..}}
  </tool_call>``, any number of them, text around them is the reply's content;
- ``llama3`` (Llama 3.1-3.3): the whole reply is ``{"name": .., "parameters": {..}}``, maybe
  after ``<|python_tag|>``, several joined by ``;``;
- ``mistral``: ``[TOOL_CALLS] [{"name": .., "arguments": {..}}, ...]``.

The family is read from the template's source (``tool_format``); a template that shows none of
them cannot take tools (gemma3's files carry no template at all; SmolLM2-135M's is plain
ChatML). Text that looks like a call but does not parse stays text: a model's junk never
raises.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from .constraint import Constraint

MAX_TOOLS = 128
MAX_TOOLS_BYTES = 256 * 1024  # all tool specs together, as JSON
MAX_SCHEMA_DEPTH = 32  # nesting of a tool's parameters schema
MAX_NAME_CHARS = 64
MAX_CALLS = 64  # calls taken from one reply
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}")

ToolFormat = Literal["hermes", "llama3", "mistral"]
CHOICES = ("auto", "none", "required")


class ToolSpecError(ValueError):
    """A tool spec, tool choice or tool call that cannot be used; the message names the field."""


@dataclass(frozen=True)
class ToolCall:
    """One call of a function: its name and its arguments (a JSON object)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str | None = None  # OpenAI's tool_call_id, when the client gave one

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "arguments": self.arguments}
        if self.id is not None:
            doc["id"] = self.id
        return doc


# ---- specs -----------------------------------------------------------------------------------
def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value, giving up past ``limit`` (no deep recursion)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if d > limit:
            return d
        deepest = max(deepest, d)
        if isinstance(v, dict):
            todo.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            todo.extend((x, d + 1) for x in v)
    return deepest


def check_name(value: object, where: str) -> str:
    if not (type(value) is str and _NAME.fullmatch(value)):
        raise ToolSpecError(
            f"{where} must be 1..{MAX_NAME_CHARS} characters of letters, digits, _ . : -"
        )
    return value


def check_tools(raw: object, where: str = "tools") -> tuple[dict[str, Any], ...]:
    """Tool specs as OpenAI and Ollama send them, ``[{"type": "function", "function": {"name",
    "description", "parameters"}}]``, checked and reduced to those keys; ToolSpecError if not."""
    if raw is None:
        return ()
    if type(raw) is not list or len(raw) > MAX_TOOLS:
        raise ToolSpecError(f"{where} must be a list of at most {MAX_TOOLS} tools")
    out, names = [], set()
    for i, tool in enumerate(raw):
        at = f"{where}[{i}]"
        if type(tool) is not dict:
            raise ToolSpecError(f"{at} must be an object")
        if tool.get("type", "function") != "function":
            raise ToolSpecError(f"{at}.type must be 'function' (the only kind of tool)")
        fn = tool.get("function")
        if type(fn) is not dict:
            raise ToolSpecError(f"{at}.function must be an object with a name")
        name = check_name(fn.get("name"), f"{at}.function.name")
        if name in names:
            raise ToolSpecError(f"{at}.function.name {name!r} is given twice")
        names.add(name)
        spec: dict[str, Any] = {"name": name}
        description = fn.get("description")
        if description is not None:
            if type(description) is not str:
                raise ToolSpecError(f"{at}.function.description must be a string")
            spec["description"] = description
        parameters = fn.get("parameters")
        if parameters is not None:
            if type(parameters) is not dict:
                raise ToolSpecError(f"{at}.function.parameters must be a JSON schema object")
            if _depth(parameters, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
                raise ToolSpecError(f"{at}.function.parameters nests deeper than 32")
            spec["parameters"] = parameters
        out.append({"type": "function", "function": spec})
    try:
        size = len(json.dumps(out, ensure_ascii=False).encode("utf-8"))
    except (TypeError, ValueError) as exc:  # NaN, lone surrogates, non-JSON values
        raise ToolSpecError(f"{where} is not plain JSON: {exc}") from exc
    if size > MAX_TOOLS_BYTES:
        raise ToolSpecError(f"{where} take {size} bytes as JSON (at most {MAX_TOOLS_BYTES})")
    return tuple(out)


def check_choice(
    choice: str, forced: str | None, tools: tuple[dict[str, Any], ...]
) -> tuple[str, str | None]:
    """A tool choice against the tools it chooses from (a named function must be one)."""
    if choice not in CHOICES:
        raise ToolSpecError(f"tool_choice must be one of {', '.join(CHOICES)} or a function")
    if forced is not None:
        names = {t["function"]["name"] for t in tools}
        if forced not in names:
            raise ToolSpecError(f"tool_choice names {forced!r}, which is not among the tools")
        choice = "required"
    if choice == "required" and not tools:
        raise ToolSpecError("tool_choice requires a tool call but no tools are given")
    return choice, forced


def check_arguments(value: object, where: str) -> dict[str, Any]:
    """A call's arguments: an object, or (OpenAI's form) a JSON string of one."""
    if type(value) is str:
        try:
            value = json.loads(value) if value.strip() else {}
        except (ValueError, RecursionError) as exc:
            raise ToolSpecError(f"{where} is not valid JSON: {exc}") from exc
    if value is None:
        return {}
    if type(value) is not dict:
        raise ToolSpecError(f"{where} must be a JSON object")
    if _depth(value, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise ToolSpecError(f"{where} nests deeper than {MAX_SCHEMA_DEPTH}")
    return value


# ---- which syntax a template teaches ----------------------------------------------------------
def tool_format(template_source: str | None) -> ToolFormat | None:
    """The call syntax a chat template teaches, or None if it takes no tools."""
    if not template_source or "tools" not in template_source:
        return None
    if "<tool_call>" in template_source:
        return "hermes"
    if "[TOOL_CALLS]" in template_source:
        return "mistral"
    if "<|python_tag|>" in template_source or (
        "<|start_header_id|>" in template_source and '"parameters"' in template_source
    ):
        return "llama3"
    return None


# what a forced call's reply starts with, then the key of its arguments
_OPENING = {"hermes": ("<tool_call>\n", "arguments"), "llama3": ("", "parameters"),
            "mistral": ("[TOOL_CALLS] ", "arguments")}  # fmt: skip


def forced_prefix(fmt: ToolFormat, name: str | None, constrained: bool = False) -> str:
    """Text put at the start of the reply so that it goes on as a call (of ``name``): the
    family's opening when a constraint (``call_schema``) writes the rest, else the call
    object's start too."""
    head, key = _OPENING[fmt]
    if constrained:
        return head
    head += "[" if fmt == "mistral" else ""
    if name is None:
        return head + '{"name": "'
    return head + json.dumps({"name": name})[:-1] + f', "{key}": '


def call_schema(fmt: ToolFormat, tools: tuple[dict[str, Any], ...], forced: str | None) -> Any:
    """The JSON schema of what follows ``forced_prefix(..., constrained=True)``: a call object
    of the allowed functions, their ``parameters`` as its arguments' schema (Mistral: a list
    of them)."""
    key = _OPENING[fmt][1]
    chosen = [t["function"] for t in tools if forced is None or t["function"]["name"] == forced]
    variants = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                key: f.get("parameters") or {"type": "object"},
            },
            "required": ["name", key],
        }
        for f in chosen
    ]
    one = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {"type": "array", "items": one, "minItems": 1} if fmt == "mistral" else one


# ---- a request's tools on a model ---------------------------------------------------------------
class Template(Protocol):
    """What is read of a chat template (backend/chat_template.py's ChatTemplate)."""

    @property
    def source(self) -> str: ...

    @property
    def is_fallback(self) -> bool: ...


class ToolRequest(Protocol):
    """What is read of a request (llm_omninode/request.py's GenerationRequest)."""

    @property
    def model(self) -> str: ...

    @property
    def raw(self) -> bool: ...

    @property
    def tools(self) -> tuple[dict[str, Any], ...]: ...

    @property
    def tool_choice(self) -> str: ...

    @property
    def forced_tool(self) -> str | None: ...

    @property
    def constraint(self) -> Constraint | None: ...  # the client's own (structured output)


def template_format(template: Template) -> ToolFormat | None:
    """The call syntax of a model's template (None for the fallback, which takes no tools)."""
    return None if template.is_fallback else tool_format(template.source)


def _uses_tools(request: ToolRequest) -> bool:
    return bool(request.tools) and request.tool_choice != "none" and not request.raw


def tool_variables(template: Template, request: ToolRequest) -> dict[str, Any]:
    """The template's ``tools`` variable; ToolSpecError if the model cannot take tools."""
    if not _uses_tools(request):
        return {}
    if template_format(template) is None:
        raise ToolSpecError(f"{request.model} does not support tools (its chat template has none)")
    return {"tools": list(request.tools)}


def _forced(template: Template, request: ToolRequest) -> ToolFormat | None:
    fmt = template_format(template)
    return fmt if _uses_tools(request) and request.tool_choice == "required" else None


def call_constraint(template: Template, request: ToolRequest) -> Constraint | None:
    """What constrains a forced call's reply: a call object of the allowed functions. None if
    no call is forced, the client constrains the answer itself, or the schema cannot be
    compiled (a keyword the matcher lacks, too big): the call is then only begun."""
    from .constraint import Constraint, ConstraintError

    fmt = _forced(template, request)
    if fmt is None or request.constraint is not None:
        return None
    try:
        return Constraint.json_schema(call_schema(fmt, request.tools, request.forced_tool))
    except ConstraintError:
        return None


def reply_prefix(template: Template, request: ToolRequest) -> str:
    """The start of a forced call, written after the prompt (empty unless one is forced)."""
    fmt = _forced(template, request)
    if fmt is None:
        return ""
    constrained = call_constraint(template, request) is not None
    return forced_prefix(fmt, request.forced_tool, constrained)


def reply_stream(template: Template, request: ToolRequest) -> ToolCallStream | None:
    """The splitter of this request's reply into content and calls (None without tools)."""
    fmt = template_format(template)
    if not _uses_tools(request) or fmt is None:
        return None
    return ToolCallStream(fmt, reply_prefix(template, request))


# ---- parsing ---------------------------------------------------------------------------------
def _call(doc: object) -> ToolCall | None:
    """A call object of any family (``arguments`` or ``parameters``), or None."""
    if type(doc) is not dict:
        return None
    if type(doc.get("function")) is dict and "name" not in doc:  # {"function": {...}}
        doc = doc["function"]
        assert isinstance(doc, dict)
    name = doc.get("name")
    if not (type(name) is str and _NAME.fullmatch(name)):
        return None
    args = doc.get("arguments", doc.get("parameters", {}))
    try:
        return ToolCall(name, check_arguments(args, "arguments"))
    except ToolSpecError:
        return None


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _calls_of(doc: object) -> list[ToolCall] | None:
    """Calls in an object or a list of objects; None unless every item is one."""
    items = doc if type(doc) is list else [doc]
    calls = [_call(d) for d in items]
    if not calls or len(calls) > MAX_CALLS or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def parse_hermes_block(body: str) -> list[ToolCall] | None:
    """The inside of ``<tool_call>...</tool_call>``."""
    return _calls_of(_loads(body.strip()))


def _unfenced(text: str) -> str:
    """The inside of a Markdown code fence (```json ... ```), or the text as it is."""
    if len(text) < 6 or not (text.startswith("```") and text.endswith("```")):
        return text
    inner = text[3:-3]
    first, newline, rest = inner.partition("\n")
    if newline and (not first.strip() or first.strip().isalnum()):  # a language tag
        inner = rest
    return inner.strip()


def parse_whole(fmt: ToolFormat, text: str) -> list[ToolCall] | None:
    """A whole reply that is only calls, or None. Besides each family's own form, a bare call
    object (or list, or ``;``-joined objects) is taken, fenced as Markdown code or not: small
    models often answer so (llama.cpp's Hermes parser takes fenced calls too)."""
    body = text.strip()
    if fmt == "mistral" and body.startswith("[TOOL_CALLS]"):
        body = body.removeprefix("[TOOL_CALLS]").strip()
    body = body.removeprefix("<|python_tag|>").strip()
    body = _unfenced(body)
    if not body.startswith(("{", "[")):
        return None
    whole = _calls_of(_loads(body))
    if whole is not None:
        return whole
    calls: list[ToolCall] = []
    for part in body.split(";"):  # {...}; {...}
        found = _calls_of(_loads(part)) if part.strip() else []
        if found is None:
            return None
        calls += found
    return calls or None


def parse_calls(fmt: ToolFormat, text: str) -> tuple[str, list[ToolCall]]:
    """A finished reply as (content, calls); text that does not parse stays content."""
    stream = ToolCallStream(fmt)
    events = [*stream.feed(text), *stream.finish()]
    return (
        "".join(e for e in events if isinstance(e, str)),
        [e for e in events if isinstance(e, ToolCall)],
    )


OPEN, CLOSE = "<tool_call>", "</tool_call>"
# how a reply that is only calls starts, per family
_WHOLE_MARKS = {
    "hermes": ("```", "{"),
    "llama3": ("<|python_tag|>", "```", "{", "["),
    "mistral": ("[TOOL_CALLS]", "```", "{", "["),
}


def _partial_tail(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallStream:
    """Splits a reply, as it streams, into content text and whole calls.

    A reply that starts like a call (``{``, a code fence, the family's marker) is held to its
    end and parsed whole. Otherwise content passes at once, except, for hermes, what may be a
    ``<tool_call>`` and then its block up to ``</tool_call>``. ``prefix`` is reply text the
    model did not write (a forced call's start, put in the prompt): parsed, never shown
    unless the call fails to parse.
    """

    def __init__(self, fmt: ToolFormat, prefix: str = "", max_chars: int = 1 << 20) -> None:
        self.fmt = fmt
        self.max_chars = max_chars  # a call longer than this is given up and shown as text
        self.buf = ""
        self.inside = False  # hermes: in a <tool_call> block
        self.after_call = False  # hermes: a block just ended
        self.scanned = 0  # hermes: how much of the block was searched for its end
        self.whole: bool | None = None  # a reply held whole; None until its start is seen
        self.calls = 0
        self.feed(prefix)  # a call's start: nothing of it is content yet

    def feed(self, text: str) -> list[str | ToolCall]:
        self.buf += text
        return self._step(final=False)

    def finish(self) -> list[str | ToolCall]:
        return self._step(final=True)

    def _step(self, final: bool) -> list[str | ToolCall]:
        out: list[str | ToolCall] = []
        if self.whole is None:
            self.whole = self._starts_like_call(self.buf)
            if self.whole is None and not final:
                return out
        if self.whole:
            if not final and len(self.buf) <= self.max_chars:
                return out
            calls = parse_whole(self.fmt, self.buf) if final else None
            if calls is not None:
                self.buf = ""
                out.extend(self._take(calls))
                return out
            self.whole = False  # not only calls: read as text (and hermes blocks) after all
        if self.fmt == "hermes":
            self._hermes(out, final)
        else:
            out.append(self.buf)
            self.buf = ""
        return [e for e in out if e != ""]

    def _starts_like_call(self, text: str) -> bool | None:
        """Whether the reply's start looks like a call; None while too short to tell."""
        head = text.lstrip()
        if not head:
            return None
        marks = _WHOLE_MARKS[self.fmt]
        if any(head.startswith(m) for m in marks):
            return True
        if any(m.startswith(head) for m in marks):
            return None
        return False

    def _take(self, calls: list[ToolCall]) -> list[ToolCall]:
        room = MAX_CALLS - self.calls
        self.calls += min(room, len(calls))
        return calls[:room]

    def _hermes(self, out: list[str | ToolCall], final: bool) -> None:
        while True:
            if self.after_call and self.buf:  # the newline between calls is not content
                self.buf, self.after_call = self.buf.removeprefix("\n"), False
            if not self.inside:
                at = self.buf.find(OPEN)
                if at < 0:
                    keep = 0 if final else _partial_tail(self.buf, OPEN)
                    out.append(self.buf[: len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep :]
                    return
                out.append(self.buf[:at])
                self.buf, self.inside, self.scanned = self.buf[at + len(OPEN) :], True, 0
            end = self.buf.find(CLOSE, self.scanned)  # only where a new tag can be
            if end < 0 and not final and len(self.buf) <= self.max_chars:
                self.scanned = max(0, len(self.buf) - len(CLOSE) + 1)
                return
            body = self.buf if end < 0 else self.buf[:end]
            cut = _partial_tail(body, CLOSE) if end < 0 else 0  # "...}\n</tool" at the end
            calls = parse_hermes_block(body[: len(body) - cut])
            rest = "" if end < 0 else self.buf[end + len(CLOSE) :]
            if calls is None:  # junk: shown as the model wrote it
                out.append(OPEN + body + ("" if end < 0 else CLOSE))
            else:
                out.extend(self._take(calls))
                self.after_call = True
            self.buf, self.inside = rest, False
            if not self.buf:
                return


def calls_json(calls: Iterable[ToolCall]) -> list[dict[str, Any]]:
    return [c.to_dict() for c in calls]


def calls_from_json(doc: object) -> tuple[ToolCall, ...]:
    """Calls read back from ``calls_json`` (from the network: checked; ToolSpecError)."""
    if type(doc) is not list or len(doc) > MAX_CALLS:
        raise ToolSpecError(f"tool calls must be a list of at most {MAX_CALLS}")
    out = []
    for i, d in enumerate(doc):
        if type(d) is not dict or not set(d) <= {"name", "arguments", "id"}:
            raise ToolSpecError(f"tool_calls[{i}] must be an object with name and arguments")
        call_id = d.get("id")
        if call_id is not None and not (type(call_id) is str and 0 < len(call_id) <= 256):
            raise ToolSpecError(f"tool_calls[{i}].id must be a short string")
        name = check_name(d.get("name"), f"tool_calls[{i}].name")
        out.append(ToolCall(name, check_arguments(d.get("arguments"), f"tool_calls[{i}]"), call_id))
    return tuple(out)


def tool_messages_view(calls: Iterable[ToolCall]) -> list[dict[str, Any]]:
    """Calls as chat templates read them from a message's ``tool_calls``."""
    out = []
    for c in calls:
        view: dict[str, Any] = {
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        if c.id is not None:
            view["id"] = c.id
        out.append(view)
    return out
