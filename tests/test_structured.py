"""Structured output (issue 21): JSON schemas by constrained decoding, in the library, `run --json-schema`, the
OpenAI API (response_format) and the Ollama API (format). Reference: the `jsonschema` package validates every
output; sampling is at temperature > 0, so only the grammar keeps the documents valid."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import openai
import pytest

import json_schemas
import tiny_models
from test_server import running

N_SCHEMAS = 50


def _valid(text: str, schema: dict) -> None:
    jsonschema.validate(json.loads(text), schema)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A tiny random Qwen2-MoE (tiny_models) converted to an f16 container."""
    import lmcli
    from quant.convert import convert_hf

    d = tmp_path_factory.mktemp("moe")
    convert_hf(tiny_models.build("qwen2_moe", d / "hf"), d / "m.lmc", "f16")
    return lmcli.load(str(d / "m.lmc"), n_ctx=256)


@pytest.fixture(scope="module")
def smol(lmcli_home):
    """smollm2 served with a 1024-token context; (base URL, openai client)."""
    from lmcli.server import create_app

    with running(create_app("smollm2", n_ctx=1024, log=lambda line: None)) as url:
        yield url, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)


def test_a_random_moe_model_writes_only_valid_documents_for_50_schemas(tiny_moe):
    for i in range(N_SCHEMAS):
        schema = json_schemas.schema(i)
        evs = list(tiny_moe.generate([5, 6, 7], max_tokens=250, json_schema=schema, temp=1.0, seed=i))
        text = "".join(e.text for e in evs)
        assert evs[-1].finish_reason == "stop", (i, text)
        _valid(text, schema)


def test_without_a_schema_the_random_model_does_not_write_json(tiny_moe):
    """The control for the test above: the documents come from the grammar, not from the model."""
    evs = list(tiny_moe.generate([5, 6, 7], max_tokens=30, temp=1.0, seed=0))
    with pytest.raises(ValueError):
        json.loads("".join(e.text for e in evs))


def test_openai_json_schema_answers_of_smollm2_are_all_valid(smol):
    _, client = smol
    for i in range(N_SCHEMAS):
        schema = json_schemas.schema(1000 + i)
        kw = dict(model="smollm2", temperature=0.9, seed=i, max_tokens=300,
                  messages=[{"role": "user", "content": f"Fill in this record #{i} as JSON."}],
                  response_format={"type": "json_schema", "json_schema": {"name": f"r{i}", "schema": schema}})
        if i % 5 == 4:  # some streamed: the joined deltas are the document
            chunks = list(client.chat.completions.create(stream=True, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = chunks[-1].choices[0].finish_reason
        else:
            r = client.chat.completions.create(**kw)
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert finish == "stop", (i, text)
        _valid(text, schema)


def test_json_object_mode_answers_an_object(smol):
    _, client = smol
    for seed in range(3):  # any object: the model may count on in an array forever at 1.0, so 0.6 here
        r = client.chat.completions.create(model="smollm2", temperature=0.6, seed=seed, max_tokens=400,
                                           messages=[{"role": "user", "content": "A city as JSON."}],
                                           response_format={"type": "json_object"})
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_a_schema_that_cannot_be_compiled_is_400_before_any_generation(smol):
    _, client = smol
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": 5}}})
    assert e.value.body["param"] == "response_format" and "type" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}],
                                       response_format={"type": "xml"})


def test_ollama_format_takes_a_schema_or_json(smol):
    import ollama

    url, _ = smol
    client = ollama.Client(host=url, timeout=300)
    for i in range(5):
        schema = json_schemas.schema(2000 + i)
        r = client.chat(model="smollm2", messages=[{"role": "user", "content": "A record as JSON."}], format=schema,
                        options={"temperature": 0.9, "seed": i, "num_predict": 300})
        assert r.done_reason == "stop"
        _valid(r.message.content, schema)
    g = client.generate(model="smollm2", prompt="A person as JSON.", format="json", stream=False,
                        options={"temperature": 0.6, "seed": 0, "num_predict": 400})
    assert g.done_reason == "stop" and isinstance(json.loads(g.response), dict)
    with pytest.raises(ollama.ResponseError):
        client.chat(model="smollm2", messages=[{"role": "user", "content": "x"}], format={"type": 5})


def _cli(*args, home):
    env = dict(os.environ, LMCLI_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "lmcli.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_run_json_schema_prints_a_valid_document(lmcli_home, tmp_path):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer", "minimum": 0}},
              "required": ["city", "population"], "additionalProperties": False}
    f = tmp_path / "s.json"
    f.write_text(json.dumps(schema))
    r = _cli("run", "smollm2", "The capital of France?", "--json-schema", str(f), "--temp", "0.8", "-s", "3",
             "-c", "512", "-n", "200", home=lmcli_home)
    assert r.returncode == 0, r.stderr
    _valid(r.stdout, schema)


@pytest.mark.parametrize("content", ['{"type": 5}', "{not json", None])
def test_run_refuses_a_bad_schema_file_in_one_line(lmcli_home, tmp_path, content):
    f = tmp_path / "s.json"
    if content is not None:
        f.write_text(content)
    r = _cli("run", "smollm2", "x", "--json-schema", str(f), home=lmcli_home)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: --json-schema"), r.stderr
