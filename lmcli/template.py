"""Rendering a conversation into a prompt with a model's Jinja chat template, in a sandbox."""

from __future__ import annotations

import contextvars
import json
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from lmcli.errors import TemplateError

ROLES = ("system", "user", "assistant", "tool")

# Used when a model has no template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# A template is code from a model file: it renders within a time and a size budget (a nested loop of ranges
# could run for hours, a repeated string fill memory), checked at every loop step, call, lookup and operator.
TIME_BUDGET_S = 2.0
MIN_OUTPUT_CHARS = 1 << 20  # the prompt may be this long, or 4x the conversation's text if that is more
_BUDGET: contextvars.ContextVar[tuple[float, int]] = contextvars.ContextVar("template_budget",
                                                                            default=(float("inf"), 1 << 62))


class _Raised(jinja2.TemplateError):
    """The template called raise_exception()."""


class _OverBudget(jinja2.TemplateError):
    """The template ran too long or built too much text."""


def _tick() -> None:
    if time.monotonic() > _BUDGET.get()[0]:
        raise _OverBudget(f"it ran longer than {TIME_BUDGET_S:g} s")


def _sized(value: Any) -> Any:
    """value, unless it is text or a list longer than the output budget."""
    if isinstance(value, (str, list, tuple)) and len(value) > _BUDGET.get()[1]:
        raise _OverBudget(f"it built a value of {len(value)} items, more than the {_BUDGET.get()[1]} allowed")
    return value


class _Range:
    """range() for templates: Jinja's safe_range, with the budget checked at every step of a loop over it."""

    def __init__(self, *args: int):
        self._r = safe_range(*args)

    def __iter__(self):
        for i in self._r:
            _tick()
            yield i

    def __len__(self) -> int:
        return len(self._r)

    def __getitem__(self, i):
        return self._r[i]

    def __reversed__(self):
        for i in reversed(self._r):
            _tick()
            yield i


def render_chat(
    template: str | None,
    messages: list[dict],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
) -> str:
    """The prompt text for `messages` (and the OpenAI-style `tools` they may call), as the template (ChatML when
    None) lays it out.

    Any error in the template, including an attempt to escape the sandbox, raises TemplateError.
    """
    chat = _checked_messages(messages)
    if template is None:
        template = CHATML_TEMPLATE
    if not isinstance(template, str):
        raise TemplateError(f"chat template must be text, not {type(template).__name__}")
    try:
        compiled = _environment().from_string(template)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"chat template has a syntax error on line {exc.lineno}: {exc.message}") from None
    except Exception as exc:
        raise TemplateError(f"chat template cannot be compiled: {_describe(exc)}") from None
    limit = max(MIN_OUTPUT_CHARS, 4 * (sum(len(m["content"]) for m in chat) + len(json.dumps(tools or []))))
    token = _BUDGET.set((time.monotonic() + TIME_BUDGET_S, limit))
    try:
        parts, n = [], 0
        for part in compiled.generate(
            messages=chat,
            tools=_plain(tools, "tools") if tools else None,
            documents=None,
            add_generation_prompt=bool(add_generation_prompt),
            bos_token=str(bos_token),
            eos_token=str(eos_token),
        ):
            n += len(part)
            if n > limit:
                raise _OverBudget(f"its output passed {limit} characters")
            _tick()
            parts.append(part)
        return "".join(parts)
    except _OverBudget as exc:
        raise TemplateError(f"chat template stopped: {exc.message}",
                            hint="the model file's chat template may be malicious; pass a template of your own") \
            from None
    except _Raised as exc:
        raise TemplateError(f"chat template refused the conversation: {exc.message}") from None
    except SecurityError as exc:
        raise TemplateError(
            f"chat template tried an unsafe operation and was stopped: {exc}",
            hint="the model file's chat template may be malicious; pass a template of your own",
        ) from None
    except RecursionError:
        raise TemplateError("chat template failed: it recursed too deeply") from None
    except Exception as exc:  # the template is code from a model file; any failure is its error
        raise TemplateError(f"chat template failed: {_describe(exc)}") from None
    finally:
        _BUDGET.reset(token)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _checked_messages(messages: Any) -> list[dict[str, Any]]:
    """A fresh copy of `messages` holding only plain JSON values, or TemplateError."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TemplateError(f"messages must be a list of dicts, not {type(messages).__name__}")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TemplateError(f"message {i} must be a dict with 'role' and 'content', not {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise TemplateError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise TemplateError(f"message {i} ({role}) must have string content, not {type(content).__name__}")
        chat.append({str(key): _plain(value, f"message {i} field {key!r}") for key, value in message.items()})
    return chat


def _plain(value: Any, where: str) -> Any:
    """`value` rebuilt from exact JSON types, so the template sees no methods of caller objects."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    raise TemplateError(f"{where} holds a {type(value).__name__}, which a chat template cannot use")


def _raise_exception(message: str) -> None:
    raise _Raised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Dict:
    """`dict` for templates, without the class object itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """`namespace` for templates, refusing underscore-prefixed attribute names."""

    def __init__(*args: Any, **kwargs: Any):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, _sized(value))

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace cannot hold the underscore-prefixed attribute {name!r}")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, failing at any unsafe attribute access rather than rendering it as
    an empty Undefined, so a template that probes for an escape is reported, not half-rendered."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _tick()
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float)) \
                and abs(right) * max(abs(int(left)).bit_length(), 1) > 1 << 16:  # a result of over 65536 bits
            raise _OverBudget(f"it raised {left} to the power {right}")
        if operator == "*":  # "x" * n: the size is known before the string is built
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _BUDGET.get()[1]:
                raise _OverBudget(f"it repeated a value {n} times, more than the {_BUDGET.get()[1]} items allowed")
        return _sized(super().call_binop(context, operator, left, right))


def _environment() -> ImmutableSandboxedEnvironment:
    """The sandbox transformers renders chat templates in: same whitespace handling and helpers."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    env.globals["range"] = _Range
    return env
