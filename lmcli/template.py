"""Rendering a conversation into a prompt with a model's Jinja chat template, in a sandbox."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmcli.errors import TemplateError

ROLES = ("system", "user", "assistant", "tool")

# Used when a model has no template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _Raised(jinja2.TemplateError):
    """The template called raise_exception()."""


def render_chat(
    template: str | None,
    messages: list[dict],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for `messages`, as the template (ChatML when None) lays it out.

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
    try:
        return compiled.render(
            messages=chat,
            tools=None,
            documents=None,
            add_generation_prompt=bool(add_generation_prompt),
            bos_token=str(bos_token),
            eos_token=str(eos_token),
        )
    except _Raised as exc:
        raise TemplateError(f"chat template refused the conversation: {exc.message}") from None
    except SecurityError as exc:
        raise TemplateError(
            f"chat template tried an unsafe operation and was stopped: {exc}",
            hint="the model file's chat template may be malicious; pass a template of your own",
        ) from None
    except Exception as exc:  # the template is code from a model file; any failure is its error
        raise TemplateError(f"chat template failed: {_describe(exc)}") from None


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
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace cannot hold the underscore-prefixed attribute {name!r}")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, failing at any unsafe attribute access rather than rendering it as
    an empty Undefined, so a template that probes for an escape is reported, not half-rendered."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe")


def _environment() -> ImmutableSandboxedEnvironment:
    """The sandbox transformers renders chat templates in: same whitespace handling and helpers."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env
