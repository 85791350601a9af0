"""Tool calling: each family's call format, checked against the family's own chat template (from llama.cpp's
models/templates): what the template writes for an assistant turn with tool_calls is what lmcli must parse back."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmcli.template import render_chat
from lmcli.tools import (HERMES, LLAMA3, StreamSplitter, ToolCallError, call_format, check_tools, for_template, parse,
                         prepare, system_prompt, takes_tools)

TEMPLATES = Path(__file__).parent / "data" / "templates"
EOS = "<EOS-MARK>"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
CALL = {"id": "call12345", "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 3})}}
FAMILIES = {
    "Qwen-Qwen2.5-7B-Instruct.jinja": "hermes",
    "Qwen-Qwen3-0.6B.jinja": "hermes",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja": "hermes",
    "meta-llama-Llama-3.1-8B-Instruct.jinja": "llama3",
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": "mistral",
    "Mistral-Small-3.2-24B-Instruct-2506.jinja": "mistral",
    "deepseek-ai-DeepSeek-V3.1.jinja": "deepseek",
    "Kimi-K2-Instruct.jinja": "kimi",
}
# Kimi K2's template keeps a queue of call ids by list.append/pop, which jinja's immutable sandbox refuses (as in
# transformers): its history with calls does not render here, so its reply format is checked from a written reply.
ROUND_TRIP = sorted(set(FAMILIES) - {"Kimi-K2-Instruct.jinja"})


def _assistant_turn(template: str) -> str:
    """The text the family's template writes for an assistant reply that calls get_weather(Paris, 3)."""
    user = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    msgs, tools = prepare(template, user, TOOLS)
    head = render_chat(template, msgs, eos_token=EOS, tools=tools)
    msgs, tools = prepare(template, user + [{"role": "assistant", "content": None, "tool_calls": [CALL]}], TOOLS)
    whole = render_chat(template, msgs, eos_token=EOS, tools=tools, add_generation_prompt=False)
    assert whole.startswith(head[: len(head) // 2])
    i = len(head) if whole.startswith(head) else len(head) // 2  # templates that close the header differently
    turn = whole[i:]
    return turn.split(EOS)[0]


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_the_family_template_call_parses_back(name):
    template = (TEMPLATES / name).read_text()
    fmt = call_format(template)
    assert fmt.name == FAMILIES[name]
    turn = _assistant_turn(template)
    if fmt is LLAMA3:  # the template writes the header of the turn again; the model starts after it
        turn = turn.split("<|end_header_id|>\n\n")[-1].split("<|eot_id|>")[0]
    for end in ("<|im_end|>", "</s>", "<|eot_id|>", "<|im_end|>"):
        turn = turn.split(end)[0]
    content, calls = parse(turn, fmt)
    assert len(calls) == 1, turn
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 3}
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    # streamed in small pieces, the same calls come out and no marker text leaks into the content
    sp = StreamSplitter(fmt)
    sent = "".join(sp.push(turn[k:k + 3]) for k in range(0, len(turn), 3))
    rest, calls2 = sp.finish()
    assert [json.loads(c["function"]["arguments"]) for c in calls2] == [{"city": "Paris", "days": 3}]
    assert (sent + rest).strip() == content.strip()
    assert not any(m in sent + rest for m in fmt.starts)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_template_shows_the_tools_to_the_model(name):
    template = (TEMPLATES / name).read_text()
    msgs, tools = prepare(template, [{"role": "user", "content": "hi"}], TOOLS)
    text = render_chat(template, msgs, tools=tools)
    assert "get_weather" in text and "Weather in a city" in text
    if tools is None:  # described by lmcli in a system message: in the family's own call form
        assert call_format(template).example in text


def test_several_calls_and_text_before_them():
    reply = ('Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
             '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>')
    content, calls = parse(reply, HERMES)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("a", {"x": 1}),
                                                                                                 ("b", {})]
    mistral = call_format("[TOOL_CALLS]")
    _, calls = parse('[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"y": "z"}}]',
                     mistral)
    assert [c["function"]["name"] for c in calls] == ["a", "b"]
    ds = call_format("<｜tool▁calls▁begin｜>")  # DeepSeek-V3/R1's form: function<sep>name, arguments in a json fence
    _, calls = parse('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n'
                     '{"city": "Oslo"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', ds)
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    kimi = call_format((TEMPLATES / "Kimi-K2-Instruct.jinja").read_text())  # the form its template writes
    _, calls = parse('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
                     '<|tool_call_argument_begin|>{"city": "Rome"}<|tool_call_end|><|tool_calls_section_end|>', kimi)
    assert calls[0]["function"]["name"] == "get_weather"


def test_text_that_is_not_a_call_stays_text():
    assert parse("no calls here", HERMES) == ("no calls here", [])
    assert parse("<tool_call>\n{not json}\n</tool_call>", HERMES) == ("<tool_call>\n{not json}\n</tool_call>", [])
    assert parse('Use {"name": "x"} like this', LLAMA3)[1] == []  # llama3 calls are the whole reply
    sp = StreamSplitter(LLAMA3)
    assert sp.push("Sure") == "Sure" and sp.push(' {"name": "x", "parameters": {}}') != ""
    sp = StreamSplitter(HERMES)
    assert sp.push("a <tool_") == "a " and sp.push("cal") == "" and sp.push("l? no") == "<tool_call? no"
    assert sp.finish() == ("", [])


def test_templates_without_tools_get_a_system_message():
    assert not takes_tools(None) and not takes_tools("{{ messages[0]['content'] }}")
    desc = system_prompt(check_tools(TOOLS))
    assert "<tool_call>" in desc and '"get_weather"' in desc
    assert call_format(None) is HERMES


@pytest.mark.parametrize("tools, why", [
    ({"a": 1}, "must be a list"),
    ([{"type": "function"}], "tools[0]"),
    ([{"type": "function", "function": {"name": "bad name"}}], "name"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "parameters"),
])
def test_bad_tools_are_refused(tools, why):
    with pytest.raises(ToolCallError, match=re.escape(why)):
        check_tools(tools)


def test_history_arguments_become_dicts_for_templates():
    msgs = for_template([{"role": "assistant", "content": None, "tool_calls": [CALL]},
                         {"role": "tool", "tool_call_id": "call12345", "content": "sunny"}])
    assert msgs[0]["content"] == "" and msgs[0]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris",
                                                                                               "days": 3}
    with pytest.raises(ToolCallError, match="not JSON"):
        for_template([{"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}])
