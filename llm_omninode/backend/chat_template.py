"""Chat templates: the GGUF's ``tokenizer.chat_template`` (Jinja) rendered like Hugging Face does.

The template comes from a model file, i.e. from whoever published it (or, in a cluster, from a
peer's manifest), so it is untrusted code. It runs in Jinja's ``ImmutableSandboxedEnvironment``
(no access to attributes starting with ``_``, to function internals, or to mutating methods),
plus limits that stop "template bombs": the rendered text is capped at ``MAX_OUTPUT`` characters,
every string/list an operator or call builds is capped at the same size, integer powers are
bounded, ``range`` is bounded, and rendering is abandoned after ``timeout`` seconds (checked at
each loop step, call, attribute lookup and operator). Any failure becomes ``ChatTemplateError``.

Rendering environment (as ``transformers``' ``apply_chat_template``): ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, ``{% generation %}`` blocks accepted (rendered
as their body), the ``tojson`` filter with ``ensure_ascii=False``, ``raise_exception(msg)`` and
``strftime_now(fmt)``; variables ``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token`` and any extra keyword given to :meth:`ChatTemplate.render` (e.g. ``tools``).

Without a template in the file the fallback is ChatML (what llama.cpp falls back to) when the
vocabulary has ``<|im_start|>``/``<|im_end|>`` or no tokenizer is known, else a plain
transcript (``"role: content"`` paragraphs, then ``"assistant:"``) that a base model can follow.

``prompt_ids`` turns a request into the prompt's token ids: templated (unless raw), tokenized.
"""

from __future__ import annotations

import contextvars
import json
import math
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

MAX_OUTPUT = 1 << 20  # characters of rendered prompt (and of any value built while rendering)
MAX_RANGE = 10_000  # items one range() may produce
MAX_POW_BITS = 4096  # size of an integer ** result
DEFAULT_TIMEOUT = 5.0  # seconds

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)

# format widths/precisions in a %-format or str.format spec, e.g. "%999999d", "{:>999999}"
_FORMAT_NUMBER = re.compile(r"\d{7,}|\*")


class ChatTemplateError(ValueError):
    """The chat template is invalid, unsafe, too costly, or raised an error itself."""


class _Limits:
    """Per-render budget: a deadline checked from the sandbox hooks."""

    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateError("chat template took too long to render")


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > MAX_OUTPUT:
        raise ChatTemplateError(f"chat template built a value larger than {MAX_OUTPUT}")
    return value


def _check_args(args: tuple, kwargs: Mapping[str, Any]) -> None:
    """Refuse calls whose numbers could only be meant to blow up memory (widths, counts)."""
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_OUTPUT:
            raise ChatTemplateError("chat template called a function with an oversized number")


class _GenerationExtension(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


class _CodeGenerator(CodeGenerator):
    # route `a ~ b` through a size check (it otherwise compiles to a plain str join)
    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Any) -> None:
        self.write("environment.omni_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


# the budget of the render in progress (a context variable: renders may run in threads)
_LIMITS: contextvars.ContextVar[_Limits | None] = contextvars.ContextVar("omni_chat_limits")


class _Environment(ImmutableSandboxedEnvironment):
    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def _tick(self) -> None:
        limits = _LIMITS.get(None)
        if limits is not None:
            limits.tick()

    def omni_concat(self, values: tuple) -> str:
        self._tick()
        return _check_size("".join(map(str, values)))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self._tick()
        if operator == "*":
            for seq, k in ((left, right), (right, left)):
                repeats = isinstance(seq, (str, list, tuple)) and isinstance(k, int)
                if repeats and len(seq) * max(k, 0) > MAX_OUTPUT:
                    raise ChatTemplateError("chat template repeats a value too many times")
            both_int = isinstance(left, int) and isinstance(right, int)
            if both_int and left.bit_length() + right.bit_length() > MAX_POW_BITS:
                raise ChatTemplateError("chat template computes a number too large")
        elif operator == "**":
            if isinstance(left, (int, float)) and isinstance(right, (int, float)):
                base = abs(float(left))
                if base > 1 and abs(right) * math.log2(base) > MAX_POW_BITS:
                    raise ChatTemplateError("chat template computes a number too large")
        elif operator == "%" and isinstance(left, str) and _FORMAT_NUMBER.search(left):
            raise ChatTemplateError("chat template uses an oversized format width")
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        __self._tick()
        _check_args(args, kwargs)
        name = getattr(__obj, "__name__", "")
        if name == "replace" and isinstance(getattr(__obj, "__self__", None), str):
            s = __obj.__self__
            new = args[1] if len(args) >= 2 else None
            if isinstance(new, str) and (len(s) + 1) * len(new) > MAX_OUTPUT:
                raise ChatTemplateError("chat template replace() result would be too large")
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        self._tick()
        if isinstance(attribute, str) and attribute.startswith("_"):
            # jinja would answer "undefined" for some of these; refuse any probing loudly
            self.unsafe_undefined(obj, attribute)
        if (
            isinstance(obj, str)
            and attribute in ("format", "format_map")
            and _FORMAT_NUMBER.search(obj)
        ):
            raise ChatTemplateError("chat template uses an oversized format width")
        return super().getattr(obj, attribute)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # jinja returns an Undefined that only fails when used; printing it gives "" and hides
        # the attempt. Fail at once instead.
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def getitem(self, obj: Any, argument: Any) -> Any:
        self._tick()
        if isinstance(argument, str) and argument.startswith("_") and not isinstance(obj, Mapping):
            self.unsafe_undefined(obj, argument)
        return super().getitem(obj, argument)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template error: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    if indent is not None and (not isinstance(indent, int) or abs(indent) > 64):
        raise ChatTemplateError("tojson indent too large")
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _safe_filter(f: Any) -> Any:
    # pass_context/pass_eval_context/pass_environment filters get that object first
    skip = 0 if getattr(f, "jinja_pass_arg", None) is None else 1

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        value, rest = (args[skip], args[skip + 1 :]) if len(args) > skip else (None, ())
        _check_args(rest, kwargs)
        if f is _FILTER_FORMAT and _FORMAT_NUMBER.search(str(value)):
            raise ChatTemplateError("chat template uses an oversized format width")
        # "".replace("", x) style growth: up to (len + 1) copies of the replacement
        grows = f is _FILTER_REPLACE and len(rest) >= 2 and isinstance(rest[1], str)
        if grows and (len(str(value)) + 1) * len(rest[1]) > MAX_OUTPUT:
            raise ChatTemplateError("chat template replace result would be too large")
        return _check_size(f(*args, **kwargs))

    for marker in ("jinja_pass_arg",):  # keep jinja's pass_* marker on the wrapper
        if hasattr(f, marker):
            setattr(wrapped, marker, getattr(f, marker))
    return wrapped


_FILTER_FORMAT = jinja2.filters.FILTERS["format"]
_FILTER_REPLACE = jinja2.filters.FILTERS["replace"]


class _BoundedRange:
    """range() for templates: at most MAX_RANGE items, each step checks the deadline."""

    def __init__(self, env: _Environment) -> None:
        self.env = env

    def __call__(self, *args: int) -> Any:
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise ChatTemplateError(f"chat template range() of {len(r)} items (max {MAX_RANGE})")
        return self._iterate(r)

    def _iterate(self, r: range) -> Any:
        # a list keeps |length, indexing and reuse working; the tick bounds silent nested loops
        env = self.env

        class _Ticking(list):
            def __iter__(self_inner):  # noqa: N805
                for item in list.__iter__(self_inner):
                    env._tick()
                    yield item

        return _Ticking(r)


def _make_environment() -> _Environment:
    env = _Environment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationExtension],
    )
    env.filters = {name: _safe_filter(f) for name, f in env.filters.items()}
    env.filters["tojson"] = _safe_filter(_tojson)
    env.globals.pop("lipsum", None)  # generates arbitrary amounts of text
    env.globals["range"] = _BoundedRange(env)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template. ``source=None`` means the ChatML fallback."""

    def __init__(
        self,
        source: str | None,
        *,
        bos_token: str = "",
        eos_token: str = "",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if source is not None and not isinstance(source, str):
            raise ChatTemplateError("chat template must be a string")
        self.is_fallback = source is None
        self.source = CHATML_TEMPLATE if source is None else source
        if len(self.source) > MAX_OUTPUT:
            raise ChatTemplateError("chat template source is too large")
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.timeout = timeout
        self._env = _make_environment()
        try:
            self._template = self._env.from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template syntax error (line {e.lineno}): {e}") from e
        except (jinja2.TemplateError, RecursionError, MemoryError) as e:
            raise ChatTemplateError(f"chat template cannot be compiled: {e}") from e

    @classmethod
    def from_metadata(
        cls, metadata: Mapping[str, Any], tokenizer: Tokenizer | None = None
    ) -> ChatTemplate:
        """The template of a GGUF file, with its BOS/EOS texts; the fallback when it has none."""
        source = metadata.get("tokenizer.chat_template")
        if source is not None and not isinstance(source, str):
            raise ChatTemplateError("tokenizer.chat_template is not a string")

        def token_text(id_key: str, attr: str) -> str:
            tid = getattr(tokenizer, attr, None) if tokenizer is not None else None
            if tid is None:
                tid = metadata.get("tokenizer.ggml." + id_key)
            tokens = metadata.get("tokenizer.ggml.tokens")
            if (
                isinstance(tid, int)
                and isinstance(tokens, (list, tuple))
                and 0 <= tid < len(tokens)
            ):
                t = tokens[tid]
                return t if isinstance(t, str) else ""
            return ""

        bos = token_text("bos_token_id", "bos_id")
        eos = token_text("eos_token_id", "eos_id")
        if source is None:
            tokens = metadata.get("tokenizer.ggml.tokens")
            if tokenizer is not None or isinstance(tokens, (list, tuple)):
                vocab = set(tokens) if isinstance(tokens, (list, tuple)) else set()
                if not {"<|im_start|>", "<|im_end|>"} <= vocab:
                    t = cls(PLAIN_TEMPLATE, bos_token=bos, eos_token=eos)
                    t.is_fallback = True
                    return t
        return cls(source, bos_token=bos, eos_token=eos)

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """The prompt text for ``messages`` (each a dict with at least role and content)."""
        if not isinstance(messages, list):
            raise ChatTemplateError("messages must be a list of {'role', 'content'} dicts")
        variables = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **extra,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
        }
        limits = _Limits(self.timeout)
        token = _LIMITS.set(limits)
        parts: list[str] = []
        size = 0
        try:
            for chunk in self._template.generate(**variables):
                size += len(chunk)
                if size > MAX_OUTPUT:
                    raise ChatTemplateError(f"chat template output exceeds {MAX_OUTPUT} characters")
                parts.append(chunk)
                limits.tick()
        except ChatTemplateError:
            raise
        except SecurityError as e:
            raise ChatTemplateError(f"chat template tried something unsafe: {e}") from e
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e
        except RecursionError as e:
            raise ChatTemplateError("chat template recursed too deeply") from e
        except MemoryError as e:
            raise ChatTemplateError("chat template ran out of memory") from e
        except Exception as e:  # TypeError, KeyError, ... from template code
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
        finally:
            _LIMITS.reset(token)
        return "".join(parts)


class Prompt(Protocol):
    """What ``prompt_ids`` reads of a request (llm_omninode/request.py's GenerationRequest)."""

    @property
    def raw(self) -> bool: ...  # the prompt as it is, no template

    @property
    def prompt(self) -> str | None: ...

    @property
    def prompt_tokens(self) -> tuple[int, ...] | None: ...  # a prompt of token ids

    @property
    def context(self) -> tuple[int, ...]: ...  # ids an earlier answer returned (Ollama's)

    def chat_messages(self) -> list[dict[str, str]]: ...


def prompt_ids(tokenizer: Tokenizer, template: ChatTemplate, request: Prompt) -> list[int]:
    """Template (unless raw) and tokenize; special tokens in the template are parsed. A
    prompt of token ids is taken as it is; ``context`` ids (an earlier answer's, Ollama's
    /api/generate) go first, and the text after them gets no second BOS. ValueError for an
    id outside the vocabulary."""
    if request.prompt_tokens is not None:
        ids = list(request.prompt_tokens)
    else:
        if request.raw:
            text = request.prompt or ""
        else:
            text = template.render(request.chat_messages(), add_generation_prompt=True)
        bos = tokenizer.bos_id
        # a template that writes the BOS text itself must not get a second one
        bos_text = tokenizer.token_bytes(bos).decode("utf-8", "replace") if bos else ""
        add_special = not (bos_text and text.startswith(bos_text)) and not request.context
        ids = tokenizer.encode(text, add_special=add_special, parse_special=True)
    ids = [*request.context, *ids]
    vocab = tokenizer.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise ValueError(f"a token id is outside the vocabulary [0, {vocab})")
    return ids
