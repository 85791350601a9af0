"""tiktoken-style tokenizers (Kimi K2, Moonlight: tiktoken.model plus a Python class lmcli never runs) read as
data: token ids equal the `tiktoken` library's on varied text, the ranks file is validated, and a tiny deepseek_v3
checkpoint with such a tokenizer quantizes and runs from the CLI like transformers."""

from __future__ import annotations

import base64
import functools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken  # the test extras install it: the independent reference
import tiny_models

from quant.errors import ConvertError
from quant.hf_tokenizer import read_chat_template, read_tokenizer

from lmcli.tokenizer import Tokenizer

# pat_str of moonshotai/Kimi-K2-Instruct's tokenization_kimi.py (the same in Moonlight's tokenization_moonshot.py),
# written out here as that file has it: the reference, independent of lmcli's own copy of the data.
KIMI_PAT_PARTS = [
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
]
N_RESERVED = 256
# Kimi K2's named special tokens, by offset from the first special id (its tokenizer_config.json's
# added_tokens_decoder); the other reserved ids are "<|reserved_token_{id}|>".
NAMED = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>", 6: "<|start_header_id|>",
         7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>", 17: "<|im_middle|>", 254: "[UNK]", 255: "[PAD]"}
# A chat template in Kimi K2's format (role markers, <|im_middle|>, a default system turn).
KIMI_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}<|im_user|>user<|im_middle|>"
    "{%- elif message['role'] == 'assistant' -%}<|im_assistant|>assistant<|im_middle|>"
    "{%- else -%}<|im_system|>{{ message['role'] }}<|im_middle|>{%- endif -%}"
    "{{ message['content'] }}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)

_HAN = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 400))
_SAMPLES = [
    # code
    'def fib(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'
    "    return fib(n - 1) + fib(n - 2)\n\n\nclass Cache(dict):\n\tdef __missing__(self, key):\n\t\treturn None\n",
    "for (int i = 0; i < 1024; ++i) { sum += a[i] * b[i]; }  // dot product\n#include <stdio.h>\r\n",
    '{"name": "lmcli", "version": "0.1.0", "deps": ["numpy>=1.26", "tokenizers"], "ok": true}\n',
    # CJK, kana, Hangul
    "人工智能是计算机科学的一个分支，它企图了解智能的实质。我们今天去北京吗？",
    "日本語のテキストとカタカナ、ひらがな。東京タワーは333メートルです。",
    "한국어 문장도 섞어 봅니다. 서울은 대한민국의 수도입니다.",
    # other scripts, marks, case
    "Größe café naïve résumé Ünïcödé ÀÉÎÕÜ ǅungla ʰaspirated ªordinal e\u0301 n\u0303",
    "Привет, мир! Ελληνικά γράμματα. שלום עולם. مرحبا بالعالم. हिन्दी पाठ।",
    "They're here; it's OK, we'll see. I'M SURE YOU'VE SEEN IT'D WORK.",
    # emoji: ZWJ sequences, skin tones, flags, keycaps
    "😀🎉 👍🏽 👩‍👩‍👧‍👦 🇫🇷🇯🇵 1️⃣ ❤️‍🔥 🏳️‍🌈 emoji😀text",
    # numbers
    "3.14159 2,718 1234567890 -42 +7e-10 0x1F 1_000_000 ١٢٣ ４５６ ½ Ⅻ",
    # whitespace runs
    "a  b   c    d\t\te\n\n\nf \n \n g\r\n\r\nh          \n\u00a0\u3000\u2003end   ",
    # special tokens inside text, and things that look like them
    "[BOS]<|im_user|>user<|im_middle|>hi<|im_end|><|im_assistant|>assistant<|im_middle|>ok[EOS]",
    "<|im_end |> <|reserved_token_x|> [BOS [EOS] <|im_middle|><|im_middle|>",
]


def _reserved_name(i: int) -> str:
    return f"<|reserved_token_{i}|>"


def _corpus(rng: random.Random) -> list[str]:
    lines = []
    for path in sorted(Path(json.__file__).parent.glob("*.py")):
        lines += path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines += ["".join(rng.choice(_HAN) for _ in range(rng.randint(1, 6))) + rng.choice("，。 \n") for _ in range(3000)]
    lines += _SAMPLES * 20
    return lines


@functools.lru_cache(maxsize=1)
def _ranks_text() -> str:
    """A Kimi-style ranks file: byte-level BPE trained on code, CJK and mixed text with Kimi's split pattern, every
    byte a token, written as tiktoken writes it (base64 token, rank)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("|".join(KIMI_PAT_PARTS)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=1500, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(random.Random(0)), trainer)
    # GPT-2's byte alphabet back to bytes
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {chr(b): b for b in kept}
    chars.update((chr(256 + n), b) for n, b in enumerate(b for b in range(256) if b not in kept))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return "".join(base64.b64encode(bytes(chars[c] for c in piece)).decode() + f" {i}\n" for piece, i in vocab)


def _tokenizer_config(n_ranks: int, module: str = "tokenization_kimi") -> dict:
    added = {str(n_ranks + k): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                "single_word": False, "special": True} for k, t in NAMED.items()}
    return {"added_tokens_decoder": added, "auto_map": {"AutoTokenizer": [f"{module}.TikTokenTokenizer", None]},
            "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
            "tokenizer_class": "TikTokenTokenizer", "model_max_length": 1048576, "chat_template": KIMI_TEMPLATE}


def _module_source() -> str:
    """A stand-in for the repo's tokenizer class: lmcli only reads its text, so it need not be importable."""
    parts = "".join(f'            r"""{p}""",\n' for p in KIMI_PAT_PARTS)
    return ("class TikTokenTokenizer(PreTrainedTokenizer):\n    num_reserved_special_tokens = 256\n\n"
            f'    pat_str = "|".join(\n        [\n{parts}        ]\n    )\n')


def write_kimi_tokenizer(d: Path, module: str = "tokenization_kimi") -> int:
    """tiktoken.model, tokenizer_config.json and the class's source, as a Kimi repo ships them; returns the id count."""
    d.mkdir(parents=True, exist_ok=True)
    text = _ranks_text()
    (d / "tiktoken.model").write_text(text)
    n = text.count("\n")
    (d / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(n, module), indent=2), encoding="utf-8")
    (d / f"{module}.py").write_text(_module_source(), encoding="utf-8")
    return n + N_RESERVED


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("kimi")
    write_kimi_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def reference(kimi_dir):
    """tiktoken's Encoding built as tokenization_kimi.py builds it, from tiktoken's own reader of the ranks file."""
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(kimi_dir / "tiktoken.model"))
    n = len(ranks)
    special = {NAMED.get(i - n, _reserved_name(i)): i for i in range(n, n + N_RESERVED)}
    return tiktoken.Encoding(name="kimi-test", pat_str="|".join(KIMI_PAT_PARTS), mergeable_ranks=ranks,
                             special_tokens=special)


@pytest.fixture(scope="module")
def lmcli_tok(kimi_dir, reference):
    meta = read_tokenizer(kimi_dir, {}, reference.n_vocab)
    return Tokenizer.from_metadata(json.loads(json.dumps(meta)))  # as the container's JSON header holds it


_PLAIN = (list("abcXYZ 0123456789\n\t\r  ,.;:'\"!?()[]{}<>=+-*/\\|_#@$%^&~`") + list(_HAN[:40])
          + list("😀🎉👍🏽🇫🇷한국日本ー。，、\u00a0\u3000١٢")
          + ["'s", "'LL", "'re", " the", "    ", "\r\n", "[BOS]", "<|im_end|>", "1234567", "<|im_middle|>"])
_ACCENTED = list("éüßñçøåЖжλΩ\u0301ǅʰªहि")  # letters beyond ASCII, combining marks, modifier and titlecase letters


def _random_texts(n: int, seed: int, alphabet: list[str] = _PLAIN + _ACCENTED) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(n)]


def test_ids_equal_tiktoken_on_varied_text(lmcli_tok, reference):
    text = "".join(_SAMPLES)
    assert len(text) > 1000
    for sample in [*_SAMPLES, text, text * 3]:
        assert lmcli_tok.encode(sample, add_bos=False) == reference.encode(sample, allowed_special="all"), sample


def test_ids_equal_tiktoken_on_thousands_of_random_strings(lmcli_tok, reference):
    texts = _random_texts(2000, seed=1)
    assert sum(map(len, texts)) > 50_000
    for text in texts:
        assert lmcli_tok.encode(text, add_bos=False) == reference.encode(text, allowed_special="all"), text


def test_decode_equals_tiktoken_and_round_trips(lmcli_tok, reference):
    for text in [*_SAMPLES, *_random_texts(300, seed=2)]:
        ids = reference.encode(text, allowed_special="all")
        assert lmcli_tok.decode(ids) == reference.decode(ids) == text
    # a lone byte of a multi-byte character decodes as tiktoken's replacement character
    ids = [reference.encode_single_token(bytes([0xE4]))]
    assert lmcli_tok.decode(ids) == reference.decode(ids) == "\ufffd"


def test_streamed_text_equals_the_whole_decode(lmcli_tok, reference):
    text = "".join(_SAMPLES)
    ids = reference.encode(text, allowed_special="all")
    stream = lmcli_tok.stream()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text


def test_special_tokens_keep_kimi_ids_and_names(lmcli_tok, reference):
    n = reference.n_vocab - N_RESERVED
    assert lmcli_tok.vocab_size == reference.n_vocab
    assert lmcli_tok.bos_id == n and lmcli_tok.add_bos is False  # Kimi's class prepends no BOS
    assert {n + 1, n + 2} <= lmcli_tok.eos_ids  # [EOS] (tokenizer_config) and <|im_end|> (end of a turn)
    for i in (n, n + 2, n + 17, n + 5, n + 255):
        assert lmcli_tok.is_special(i)
        assert lmcli_tok.token_text(i) == reference.decode_single_token_bytes(i).decode()
    assert lmcli_tok.decode([n + 3, n + 17], skip_special=True) == ""


def test_moonlight_module_is_the_same_family(tmp_path, reference):
    write_kimi_tokenizer(tmp_path, module="tokenization_moonshot")
    tok = Tokenizer.from_metadata(read_tokenizer(tmp_path, {}, reference.n_vocab))
    text = "".join(_SAMPLES)
    assert tok.encode(text) == reference.encode(text, allowed_special="all")


def _lines(d: Path) -> list[str]:
    return (d / "tiktoken.model").read_text().splitlines()


def _set_lines(d: Path, lines: list[str]) -> None:
    (d / "tiktoken.model").write_text("\n".join(lines) + "\n")


def _without_byte_ff(line: str) -> str:
    """The line of the one-byte token 0xff, holding instead a token that no text forms, at the same rank."""
    token, rank = line.split()
    other = base64.b64encode(bytes([0xFF, 0xFE, 0xFD])).decode()
    return f"{other} {rank}" if base64.b64decode(token) == bytes([0xFF]) else line


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(changes)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))


BAD_INPUTS = {
    "not base64": (lambda d: _set_lines(d, ["!!!! 0", *_lines(d)[1:]]), "line 1: the token is not valid base64"),
    "no rank": (lambda d: _set_lines(d, [_lines(d)[0].split()[0], *_lines(d)[1:]]), "line 1 is not '<base64"),
    "repeated rank": (lambda d: _set_lines(d, [*_lines(d)[:-1], _lines(d)[-1].split()[0] + " 7"]),
                      "rank 7 repeats line 8's"),
    "repeated token": (lambda d: _set_lines(d, [*_lines(d), _lines(d)[65].split()[0] + f" {len(_lines(d))}"]),
                       "repeats line 66's"),
    "missing rank": (lambda d: _set_lines(d, _lines(d)[:300] + _lines(d)[301:]),
                     "1499 tokens need ranks 0..1498, each once"),
    "rank beyond": (lambda d: _set_lines(d, [*_lines(d)[:-1], _lines(d)[-1].split()[0] + " 999999"]),
                    "rank 999999 is out of range"),
    "missing byte": (lambda d: _set_lines(d, [_without_byte_ff(ln) for ln in _lines(d)]), "byte 0xff is not a token"),
    "unknown family": (lambda d: _edit_config(d, auto_map={"AutoTokenizer": ["tokenization_other.Tok", None]}),
                       "auto_map names 'tokenization_other'"),
    "no family": (lambda d: _edit_config(d, auto_map=None), "auto_map names no tokenizer module"),
    "changed pattern": (lambda d: (d / "tokenization_kimi.py").write_text(_module_source().replace("{1,3}", "+")),
                        "tokenization_kimi.py differs from the known kimi tokenizer"),
    "special text is a token": (lambda d: _set_lines(d, [*_lines(d)[:-1], base64.b64encode(b"[EOS]").decode()
                                                        + " " + _lines(d)[-1].split()[1]]),
                                "'[EOS]' is also an ordinary token"),
    "special id in the ranks": (lambda d: _edit_config(d, added_tokens_decoder={"5": {"content": "<x>"}}),
                                "added token '5' is not a special id"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_ranks_or_config_is_one_clear_error(tmp_path, case):
    write_kimi_tokenizer(tmp_path)
    corrupt, message = BAD_INPUTS[case]
    corrupt(tmp_path)
    with pytest.raises(ConvertError) as e:
        read_tokenizer(tmp_path, {}, 10**6)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def kimi_model(tmp_path_factory):
    """A tiny random deepseek_v3 checkpoint whose tokenizer is Kimi's layout (no tokenizer.json)."""
    d = tmp_path_factory.mktemp("kimi-ds3")
    n = len(_ranks_text().splitlines())
    ids = dict(vocab_size=n + N_RESERVED, bos_token_id=n, eos_token_id=n + 1, pad_token_id=n + 255)
    tiny_models.build("deepseek_v3", d, overrides=ids)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).unlink()
    write_kimi_tokenizer(d)
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": n, "eos_token_id": [n + 1, n + 2]}))
    return d


def test_the_chat_template_is_kept(kimi_model):
    assert read_chat_template(kimi_model) == KIMI_TEMPLATE


def test_quantize_then_run_a_kimi_tokenizer_model_from_the_cli(kimi_model, reference, tmp_path):
    """The container carries the tokenizer and template; `run` answers as transformers' greedy decoding of the
    prompt that jinja2 renders and tiktoken encodes."""
    import jinja2
    import torch

    out = tmp_path / "kimi.lmc"
    cli = [sys.executable, "-m", "lmcli.cli"]
    r = subprocess.run([*cli, "quantize", str(kimi_model), str(out), "--type", "f16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    question = "你好! What is 2+2?"
    r = subprocess.run([*cli, "run", str(out), question, "--temp", "0", "-n", "8", "--ignore-eos", "--json"],
                       capture_output=True, text=True, env={**os.environ, "LMCLI_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)

    prompt = jinja2.Environment().from_string(KIMI_TEMPLATE).render(
        messages=[{"role": "user", "content": question}], add_generation_prompt=True)
    ids = reference.encode(prompt, allowed_special="all")
    model = tiny_models.reference_model(kimi_model)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got["tokens"] == ids[-8:]
    assert got["text"] == reference.decode(ids[-8:])
    assert got["prompt_tokens"] == len(ids) - 8


def test_a_corrupt_ranks_file_fails_quantize_with_one_line(kimi_model, tmp_path):
    import shutil

    d = tmp_path / "bad"
    shutil.copytree(kimi_model, d)
    _set_lines(d, ["@@@ 0", *_lines(d)[1:]])
    r = subprocess.run([sys.executable, "-m", "lmcli.cli", "quantize", str(d), str(tmp_path / "o.lmc")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") <= 2 and "tiktoken.model line 1: the token is not valid base64" in r.stderr
    assert not (tmp_path / "o.lmc").exists()


def test_pull_fetches_the_ranks_file_and_the_class_source_as_text_and_converts_like_quantize(kimi_model, tmp_path):
    """pull downloads tiktoken.model and the tokenizer class's source (read, never run), not the modeling code, and
    the container's tokenizer is the one `quantize` writes from the same directory."""
    from hub_server import FakeHub

    from quant.container import Container
    from quant.convert import convert_hf

    hub = FakeHub().start()
    try:
        files = {p.name: p.read_bytes() for p in kimi_model.iterdir()}
        hub.add_repo("org/kimi-tiny", {**files, "modeling_deepseek.py": b"raise SystemExit\n"})
        home = tmp_path / "home"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LMCLI_"))}
        env.update(LMCLI_HOME=str(home), HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"),
                   HF_HUB_DISABLE_TELEMETRY="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        r = subprocess.run([sys.executable, "-m", "lmcli.cli", "pull", "org/kimi-tiny", "--type", "f16"], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        requested = {e["file"] for e in hub.log if e["file"]}
    finally:
        hub.stop()
    assert {"tiktoken.model", "tokenization_kimi.py", "tokenizer_config.json"} <= requested
    assert "modeling_deepseek.py" not in requested
    convert_hf(kimi_model, tmp_path / "local.lmc", "f16")
    pulled = Container(home / "models" / "org" / "kimi-tiny" / "model.lmc")
    assert pulled.metadata["tokenizer"] == Container(tmp_path / "local.lmc").metadata["tokenizer"]
    assert pulled.metadata["chat_template"] == KIMI_TEMPLATE


def test_export_names_llama_cpps_kimi_pre_tokenizer_and_it_tokenizes_like_tiktoken(kimi_model, reference, tmp_path):
    """The exported GGUF's vocabulary, read by llama.cpp (its kimi-k2 pre-tokenizer), gives tiktoken's ids on code,
    English, CJK, emoji, numbers, whitespace and special tokens. llama.cpp's kimi-k2 splitter (unicode.cpp, not the
    regex) departs from tiktoken on accented letters after a space and on combining marks (" é", "हि"), so
    the texts with those are left to the lmcli-vs-tiktoken tests above."""
    import gguf
    import llama_cpp

    from quant.convert import convert_hf
    from quant.gguf_export import export_gguf

    convert_hf(kimi_model, tmp_path / "k.lmc", "f16")
    path = export_gguf(tmp_path / "k.lmc", tmp_path / "k.gguf")
    field = gguf.GGUFReader(path).fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == "kimi-k2"
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    plain = [t for t in _SAMPLES if not any(ch in t for ch in "éह")]
    assert len(plain) == len(_SAMPLES) - 2
    for text in [*plain, *_random_texts(300, seed=3, alphabet=_PLAIN)]:
        want = reference.encode(text, allowed_special="all")
        assert vocab.tokenize(text.encode(), add_bos=False, special=True) == want, text
