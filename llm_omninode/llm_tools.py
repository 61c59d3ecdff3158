"""llm's conversation and tools API as the request's fields, for ``llm -m omni/... -T``.

llm (0.36) gives a prompt's whole chain as ``prompt.messages``: messages of parts (text, the
model's tool calls, tool results). They become the request's messages: an assistant's calls
ride on its message, each tool result is a ``tool`` message of its own.
"""

from __future__ import annotations

from typing import Any

from .backend.tool_calls import ToolCall, check_tools
from .request import Message


def request_messages(prompt: Any) -> tuple[str | None, tuple[Message, ...]]:
    """(system prompt, messages) of an ``llm.Prompt``."""
    from llm.parts import AttachmentPart, TextPart, ToolCallPart, ToolResultPart

    messages: list[Message] = []
    for message in prompt.messages:
        texts: list[str] = []
        calls: list[ToolCall] = []
        for part in message.parts:
            if isinstance(part, TextPart):
                texts.append(part.text)
            elif isinstance(part, ToolCallPart):
                calls.append(ToolCall(part.name, dict(part.arguments or {}), part.tool_call_id))
            elif isinstance(part, ToolResultPart):
                output = part.output if part.exception is None else f"Error: {part.exception}"
                messages.append(Message("tool", output, (), part.name, part.tool_call_id))
            elif isinstance(part, AttachmentPart):
                raise ValueError("omni models read text only (no attachments)")
            # reasoning parts: these models do not take their thoughts back
        if texts or calls or message.role in ("user", "system"):
            role = message.role if message.role in ("system", "user", "assistant") else "user"
            messages.append(Message(role, "".join(texts), tuple(calls)))
    system = None
    if prompt.system and not any(m.role == "system" for m in messages):
        system = prompt.system  # given again on a later turn: llm keeps it out of the chain
    return system, tuple(messages)


def request_tools(prompt: Any) -> tuple[dict[str, Any], ...]:
    """The prompt's function tools as tool specs (checked: ToolSpecError, a ValueError)."""
    out = []
    for tool in prompt.tools or ():
        spec: dict[str, Any] = {"name": tool.name}
        if tool.description:
            spec["description"] = tool.description
        spec["parameters"] = tool.input_schema or {"type": "object", "properties": {}}
        out.append({"type": "function", "function": spec})
    return check_tools(out)
