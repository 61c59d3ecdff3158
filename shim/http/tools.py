"""Tool calling in the HTTP bodies: Ollama's and OpenAI's ``tools``, ``tool_choice``, tool calls
in the history and tool results in, and the calls a reply made out, in each API's shape.

Parsing is pure and raises ``ToolSpecError`` naming the field (parse.py answers it with a 400);
the shapes are plain dicts.
Ollama gives a call's arguments as an object, OpenAI as a JSON string with an id per call.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from llm_omninode.backend.tool_calls import (
    ToolCall,
    ToolSpecError,
    check_arguments,
    check_name,
    check_tools,
)
from llm_omninode.request import Message

MAX_ID_CHARS = 256


def ollama_tool_fields(body: dict[str, Any]) -> dict[str, Any]:
    """Ollama's ``tools`` as GenerationRequest's fields."""
    return tool_fields(body)


def openai_tool_fields(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``tools`` and ``tool_choice`` as GenerationRequest's fields."""
    return tool_fields(body, openai=True)


def tool_fields(body: dict[str, Any], *, openai: bool = False) -> dict[str, Any]:
    """``tools`` and (OpenAI) ``tool_choice`` as GenerationRequest's fields."""
    tools = check_tools(body.get("tools"))
    choice, forced = "auto", None
    raw = body.get("tool_choice") if openai else None
    if type(raw) is str:
        choice = raw
    elif type(raw) is dict:
        fn = raw.get("function")
        if raw.get("type", "function") != "function" or type(fn) is not dict:
            raise ToolSpecError('tool_choice: {"type": "function", "function": {"name": ...}}')
        forced = check_name(fn.get("name"), "tool_choice.function.name")
    elif raw is not None:
        raise ToolSpecError('tool_choice must be "none", "auto", "required" or a function')
    if choice not in ("none", "auto", "required"):
        raise ToolSpecError('tool_choice must be "none", "auto", "required" or a function')
    if not tools and choice == "auto" and forced is None:
        return {}
    return {"tools": tools, "tool_choice": choice, "forced_tool": forced}


def _ref(m: dict[str, Any], key: str, where: str) -> str | None:
    value = m.get(key)
    if value is not None and not (type(value) is str and len(value) <= MAX_ID_CHARS):
        raise ToolSpecError(f"{where}.{key} must be a string of at most {MAX_ID_CHARS} characters")
    return value


def _calls(raw: object, where: str) -> tuple[ToolCall, ...]:
    if raw is None:
        return ()
    if type(raw) is not list or len(raw) > 64:
        raise ToolSpecError(f"{where} must be a list of at most 64 calls")
    out = []
    for j, call in enumerate(raw):
        at = f"{where}[{j}]"
        fn = call.get("function") if type(call) is dict else None
        if type(fn) is not dict:
            raise ToolSpecError(f"{at} must be an object with a function")
        name = check_name(fn.get("name"), f"{at}.function.name")
        args = check_arguments(fn.get("arguments"), f"{at}.function.arguments")
        out.append(ToolCall(name, args, _ref(call, "id", at)))
    return tuple(out)


def message(role: str, content: str, m: dict[str, Any], where: str) -> Message:
    """A chat message with its tool fields: an assistant's ``tool_calls``; a tool result's
    ``tool_name`` (Ollama; ``name`` too) or ``tool_call_id`` (OpenAI)."""
    calls = _calls(m.get("tool_calls"), f"{where}.tool_calls")
    if calls and role != "assistant":
        raise ToolSpecError(f"{where}.tool_calls: only an assistant message makes calls")
    name = call_id = None
    if role == "tool":
        name = _ref(m, "tool_name", where) or _ref(m, "name", where)
        call_id = _ref(m, "tool_call_id", where)
    return Message(role, content, calls, name, call_id)


def name_results(messages: tuple[Message, ...]) -> tuple[Message, ...]:
    """Tool results that give only a call id get the called function's name (some templates
    show it), from the assistant call with that id."""
    names = {c.id: c.name for m in messages for c in m.tool_calls if c.id is not None}
    out = []
    for m in messages:
        if m.role == "tool" and m.tool_name is None and m.tool_call_id in names:
            m = Message(m.role, m.content, (), names[m.tool_call_id], m.tool_call_id)
        out.append(m)
    return tuple(out)


# ---- out -------------------------------------------------------------------------------------
def ollama_calls(calls: tuple[ToolCall, ...], first: int = 0) -> list[dict[str, Any]]:
    """Ollama's ``message.tool_calls``: arguments as an object."""
    return [
        {"function": {"index": first + i, "name": c.name, "arguments": c.arguments}}
        for i, c in enumerate(calls)
    ]


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def openai_calls(
    calls: tuple[ToolCall, ...], first: int = 0, *, indexed: bool = False
) -> list[dict[str, Any]]:
    """OpenAI's ``tool_calls`` (with ``index`` in stream deltas): arguments as JSON text."""
    out = []
    for i, c in enumerate(calls):
        doc: dict[str, Any] = {
            "id": new_call_id(),
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)},
        }
        out.append({"index": first + i, **doc} if indexed else doc)
    return out
