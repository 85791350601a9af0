"""Tool calling through the server (issue 21): the OpenAI and Ollama clients send tools; the model's own template
shows them; calls come back as tool_calls whose arguments the tool's JSON schema accepts (jsonschema checks)."""

from __future__ import annotations

import json

import jsonschema
import ollama
import openai
import pytest

from test_server import running
from test_tools import TEMPLATES

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Time in a zone", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


@pytest.fixture(scope="module")
def smol(lmcli_home):
    from lmcli.server import create_app

    with running(create_app("smollm2", n_ctx=1024, log=lambda line: None)) as url:
        yield url, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)


def _check(call, names):
    assert call.type == "function" and call.function.name in names and call.id
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_and_named_tool_choice_give_valid_calls(smol):
    _, client = smol
    msgs = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]
    for i in range(6):
        r = client.chat.completions.create(model="smollm2", messages=msgs, tools=TOOLS, tool_choice="required",
                                           temperature=1.0, seed=i, max_tokens=120)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None, ch
        (call,) = ch.message.tool_calls
        _check(call, SCHEMAS)
    r = client.chat.completions.create(model="smollm2", messages=msgs, tools=TOOLS, temperature=1.0, seed=1,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       max_tokens=120)
    (call,) = r.choices[0].message.tool_calls
    _check(call, ["get_time"])
    # streamed: the call arrives as a tool_calls delta, then finish_reason tool_calls
    chunks = list(client.chat.completions.create(model="smollm2", messages=msgs, tools=TOOLS, stream=True,
                                                 tool_choice="required", temperature=0.7, seed=3, max_tokens=120))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
    _check(deltas[0], SCHEMAS)


def test_a_conversation_with_a_call_and_its_result_continues(smol):
    """The history carries the assistant's call (arguments as a JSON string) and the tool's answer."""
    _, client = smol
    msgs = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "snow"}'}]
    r = client.chat.completions.create(model="smollm2", messages=msgs, tools=TOOLS, temperature=0, max_tokens=20)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError, match="not JSON"):
        bad = [msgs[0], {**msgs[1], "tool_calls": [{"id": "c", "type": "function",
                                                    "function": {"name": "get_weather", "arguments": "{oops"}}]}]
        client.chat.completions.create(model="smollm2", messages=bad, tools=TOOLS, max_tokens=5)


@pytest.mark.parametrize("choice, why", [
    ({"type": "function", "function": {"name": "nope"}}, "not among the tools"),
    ("sometimes", "tool_choice must be"),
])
def test_bad_tool_choices_are_400s(smol, choice, why):
    _, client = smol
    with pytest.raises(openai.BadRequestError, match=why):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                       tool_choice=choice, max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "bad name"}}], max_tokens=5)


def test_the_ollama_client_gets_tool_calls(smol):
    url, _ = smol
    c = ollama.Client(host=url)
    r = c.chat(model="smollm2", messages=[{"role": "user", "content": "Time in CET?"}], tools=TOOLS,
               options={"temperature": 0.5, "seed": 2, "num_predict": 100}, format=None)
    # Ollama has no tool_choice: auto, so a 135M model may or may not call; whatever it calls is well formed
    for call in r.message.tool_calls or []:
        jsonschema.validate(dict(call.function.arguments), SCHEMAS[call.function.name])
    assert r.done


def test_auto_calls_in_the_family_format_are_parsed_from_the_stream():
    """tool_choice auto: text in the family's call form (Qwen's here) becomes tool_calls, held back from content."""
    from lmcli.server import GenRequest, _CallSplit

    class Model:  # what _CallSplit reads of a model: its chat template
        chat_template = (TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()

    req = GenRequest(kind="chat", model=None, messages=[], prompt=None, max_tokens=None, stop=[], sampling={},
                     stream=True, include_usage=False, ignore_eos=False, tools=TOOLS)
    split = _CallSplit(Model(), req)
    reply = 'Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    sent = "".join(split.push(reply[i:i + 4]) for i in range(0, len(reply), 4))
    rest, calls = split.finish()
    assert (sent + rest).strip() == "Checking." and "<tool_call>" not in sent + rest
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_time", {"zone": "UTC"})]
