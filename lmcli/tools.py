"""Tool calling: each model family's call format as data, found from its chat template, and the parsing of a
generated text into content and OpenAI-style tool calls (whole, or as a stream).

A family's format is what its own chat template writes for an assistant message with tool_calls, so the same
markers are what the model was trained to produce:
  hermes    Qwen2.5/Qwen3, Hermes, SmolLM3:  <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>
  mistral   Mistral / Mixtral / Nemo:        [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
            newer Mistral (Small 3.2):       [TOOL_CALLS]name[ARGS]{...}
  llama3    Llama 3.1-3.3:                   {"name": ..., "parameters": {...}} (the whole reply), or after
                                             <|python_tag|>
  deepseek  DeepSeek-V3/R1/V3.1:             <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>[function<｜tool▁sep｜>]name
                                             (<｜tool▁sep｜>args | \n```json\nargs\n```)<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
  kimi      Kimi K2:                         <|tool_calls_section_begin|><|tool_call_begin|>functions.name:0
                                             <|tool_call_argument_begin|>{...}<|tool_call_end|>...
A template that does not take tools at all gets the tools described in a system message in the hermes form
(as llama.cpp's generic handler does), and the reply is parsed as hermes.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from .errors import UsageError
from .generate import held_back as stop_held_back


class ToolCallError(UsageError):
    """A request's tools or tool messages are malformed."""


@dataclass(frozen=True)
class CallFormat:
    name: str
    detect: tuple[str, ...]  # any of these in a chat template's source means the family writes calls this way
    starts: tuple[str, ...]  # text that begins the calls in a reply
    example: str  # one call to f(x=1) in this form (told to the model when its template does not render tools)
    at_start_only: bool = False  # the calls are the whole reply (a marker later on is ordinary text)


HERMES = CallFormat("hermes", ("<tool_call>",), ("<tool_call>",),
                    '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')
MISTRAL = CallFormat("mistral", ("[TOOL_CALLS]",), ("[TOOL_CALLS]",), '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}]')
LLAMA3 = CallFormat("llama3", ('"parameters": ', "<|python_tag|>"), ("<|python_tag|>", '{"name"'),
                    '{"name": "f", "parameters": {"x": 1}}', True)
DEEPSEEK = CallFormat("deepseek", ("<｜tool▁calls▁begin｜>",), ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>"),
                      '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>{"x": 1}<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
KIMI = CallFormat("kimi", ("<|tool_calls_section_begin|>",), ("<|tool_calls_section_begin|>", "<|tool_call_begin|>"),
                  '<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{"x": 1}'
                  '<|tool_call_end|><|tool_calls_section_end|>')
FORMATS = (KIMI, DEEPSEEK, MISTRAL, HERMES, LLAMA3)  # the more specific markers first


def call_format(template: str | None) -> CallFormat:
    """The call format a chat template's family uses; hermes for a template that names none."""
    for fmt in FORMATS:
        if template and any(d in template for d in fmt.detect):
            return fmt
    return HERMES


def takes_tools(template: str | None) -> bool:
    """Whether a chat template renders the `tools` it is given (else lmcli describes them in a system message)."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def check_tools(tools) -> list[dict]:
    """OpenAI `tools` ([{type: function, function: {name, description?, parameters?}}]) checked; ToolCallError."""
    if not isinstance(tools, list):
        raise ToolCallError("'tools' must be a list")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ToolCallError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise ToolCallError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolCallError(f"tools[{i}].function.parameters must be a JSON schema object")
        desc = fn.get("description", "")
        if not isinstance(desc, str):
            raise ToolCallError(f"tools[{i}].function.description must be a string")
        out.append({"type": "function", "function": {"name": name, "description": desc, "parameters": params}})
    return out


def system_prompt(tools: list[dict], fmt: CallFormat = HERMES) -> str:
    """The tool description for a template that does not render tools itself, in the family's call form."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + listed +
            "\n</tools>\n\nTo call a function, reply in exactly this form (here calling f with x=1):\n" + fmt.example)


def prepare(template: str | None, messages: list[dict], tools) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) to render a conversation that may call `tools` with this chat template: tools checked,
    call arguments as templates expect them, and the tools described in the system message when the template
    does not render `tools` itself (then None is returned for the template's tools)."""
    if not tools:
        return messages, None
    tools, messages = check_tools(tools), for_template(messages)
    if takes_tools(template):
        return messages, tools
    desc = system_prompt(tools, call_format(template))
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + desc}, *messages[1:]], None
    return [{"role": "system", "content": desc}, *messages], None


def for_template(messages: list[dict]) -> list[dict]:
    """Messages as chat templates expect them: an assistant turn's tool-call arguments as a dict (OpenAI sends a
    JSON string; templates apply `tojson`), and null content as empty text."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and calls:
            if not isinstance(calls, list):
                raise ToolCallError("an assistant message's tool_calls must be a list")
            m["tool_calls"] = [_call_for_template(c) for c in calls]
            if m.get("content") is None:
                m["content"] = ""
        elif m.get("role") == "tool" and m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out


def _call_for_template(c) -> dict:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ToolCallError("each tool call must be {'type': 'function', 'function': {'name': ..., 'arguments': ...}}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            raise ToolCallError(f"tool call {fn['name']!r} has arguments that are not JSON") from None
    return {**c, "type": "function", "function": {"name": fn["name"], "arguments": args},
            "name": fn["name"], "arguments": args}  # flat copies: some templates read tool_call.name directly


def find_start(text: str, fmt: CallFormat) -> int:
    """Index in text where the calls begin, or -1."""
    if fmt.at_start_only:
        s = text.lstrip()
        return len(text) - len(s) if s.startswith(fmt.starts) else -1
    hits = [i for i in (text.find(m) for m in fmt.starts) if i >= 0]
    return min(hits) if hits else -1


def held_back(text: str, fmt: CallFormat) -> int:
    """Length of text's suffix that may be the beginning of a call marker (not yet safe to stream as content)."""
    if fmt.at_start_only:
        s = text.lstrip()
        return len(text) if any(m.startswith(s) or s.startswith(m) for m in fmt.starts) else 0
    return stop_held_back(text, fmt.starts)  # the rule stop strings follow, with the markers as the stops


def parse(text: str, fmt: CallFormat) -> tuple[str, list[dict]]:
    """(content, tool_calls) of a whole reply. Text that begins like a call but does not parse stays content."""
    i = find_start(text, fmt)
    if i < 0:
        return text, []
    try:
        calls = _PARSERS[fmt.name](text[i:])
    except (ValueError, KeyError, TypeError, AttributeError):
        return text, []
    if not calls:
        return text, []
    return text[:i].rstrip(), [_openai_call(name, args) for name, args in calls]


def _openai_call(name: str, args) -> dict:
    if not isinstance(name, str) or not name:
        raise ValueError("no function name")
    if isinstance(args, str):
        args = json.loads(args)
    if not isinstance(args, dict):
        raise ValueError("arguments are not an object")
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


_DECODER = json.JSONDecoder()


def _json_at(s: str, i: int):
    """(value, end) of the JSON value starting at or after index i (whitespace skipped)."""
    while i < len(s) and s[i].isspace():
        i += 1
    return _DECODER.raw_decode(s, i)


def _hermes(s: str) -> list:
    calls = []
    for m in re.finditer(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", s, re.S):
        obj = json.loads(m.group(1))
        calls.append((obj["name"], obj.get("arguments", obj.get("parameters", {}))))
    return calls


def _mistral(s: str) -> list:
    body = s[len("[TOOL_CALLS]"):]
    if body.lstrip().startswith("["):
        arr, _ = _json_at(body, 0)
        return [(c["name"], c.get("arguments", {})) for c in arr]
    calls = []
    for part in body.split("[TOOL_CALLS]"):  # newer form: name[CALL_ID]id[ARGS]{...}, the id optional
        head, sep, rest = part.partition("[ARGS]")
        if not sep:
            raise ValueError("no [ARGS]")
        args, _ = _json_at(rest, 0)
        calls.append((head.split("[CALL_ID]")[0].strip(), args))
    return calls


def _llama3(s: str) -> list:
    s = s.strip()
    if s.startswith("<|python_tag|>"):
        s = s[len("<|python_tag|>"):]
    calls, i = [], 0
    while i < len(s):
        obj, i = _json_at(s, i)
        calls.append((obj["name"], obj.get("parameters", obj.get("arguments", {}))))
        while i < len(s) and s[i] in " \n\t;":
            i += 1
    return calls


def _deepseek(s: str) -> list:
    calls = []
    for m in re.finditer(r"<｜tool▁call▁begin｜>(.*?)<｜tool▁call▁end｜>", s, re.S):
        head, sep, rest = m.group(1).partition("<｜tool▁sep｜>")
        if not sep:
            raise ValueError("no tool separator")
        if head.strip() == "function":  # DeepSeek-V3/R1: function<sep>name\n```json\n{...}\n```
            name, _, body = rest.partition("\n")
            body = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", body)
            calls.append((name.strip(), json.loads(body)))
        else:  # V3.1: name<sep>{...}
            calls.append((head.strip(), json.loads(rest)))
    return calls


def _kimi(s: str) -> list:
    calls = []
    for m in re.finditer(r"<\|tool_call_begin\|>\s*(.*?)\s*<\|tool_call_argument_begin\|>(.*?)<\|tool_call_end\|>",
                         s, re.S):
        ident = m.group(1)  # functions.NAME:INDEX
        name = ident.split(".", 1)[-1].rsplit(":", 1)[0]
        calls.append((name, json.loads(m.group(2))))
    return calls


_PARSERS = {"hermes": _hermes, "mistral": _mistral, "llama3": _llama3, "deepseek": _deepseek, "kimi": _kimi}


class StreamSplitter:
    """Streams a reply's content while holding back whatever may be tool calls; finish() parses them.

    push(piece) -> content safe to send now; finish() -> (remaining content, tool_calls).
    """

    def __init__(self, fmt: CallFormat):
        self.fmt = fmt
        self._pending = ""  # text not yet sent
        self._sent = ""  # content already sent
        self._in_calls = False

    def push(self, piece: str) -> str:
        self._pending += piece
        if self._in_calls:
            return ""
        if self.fmt.at_start_only and self._sent:
            out, self._pending = self._pending, ""  # the reply began as text: no call can follow
            self._sent += out
            return out
        i = find_start(self._pending, self.fmt)
        if i >= 0:
            self._in_calls = True
            out, self._pending = self._pending[:i], self._pending[i:]
        else:
            keep = held_back(self._pending, self.fmt)
            out, self._pending = self._pending[: len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        self._sent += out
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content not sent yet, tool calls). Calls that do not parse are returned as content."""
        content, calls = parse(self._pending, self.fmt)
        if calls:
            return content if content.strip() else "", calls
        return self._pending, []


def call_from_json(text: str) -> dict | None:
    """A tool call from a whole answer that is one JSON object {name, arguments} (tool_choice required or named,
    where decoding was constrained to that form); None if it is not one."""
    try:
        obj = json.loads(text)
        return _openai_call(obj["name"], obj["arguments"])
    except (ValueError, KeyError, TypeError):
        return None
