"""The one internal request type: the llm plugin and the HTTP adapters all build this."""

from __future__ import annotations

from dataclasses import dataclass, field

from .backend.sampling import SamplingOptions

DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


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

    def __post_init__(self) -> None:
        if not self.messages and self.prompt is None:
            raise ValueError("a request needs messages or a prompt")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages for the chat template, the system prompt first."""
        out = []
        if self.system:
            out.append({"role": "system", "content": self.system})
        if self.messages:
            out.extend({"role": m.role, "content": m.content} for m in self.messages)
        else:
            out.append({"role": "user", "content": self.prompt or ""})
        return out
