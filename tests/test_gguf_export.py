"""GGUF export: llama.cpp (llama-cpp-python) runs the exported file as the source's own reference runs it.

References: the packaged SmolLM2 GGUF itself (its tensor bytes read by gguf.GGUFReader, its logits from
llama.cpp), and transformers on tiny random models of every architecture (tests/tiny_models.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno

import numpy as np
import pytest
from gguf import GGUFReader

torch = pytest.importorskip("torch")
llama_cpp = pytest.importorskip("llama_cpp")

import tiny_models  # noqa: E402
from quant import gguf_export  # noqa: E402
from quant.container import ContainerWriter  # noqa: E402
from quant.convert import convert_hf  # noqa: E402
from quant.errors import GGUFError  # noqa: E402
from quant.formats import F32  # noqa: E402
from quant.gguf_export import export_gguf  # noqa: E402

# Stated tolerances, as max |llama.cpp - transformers| / max |transformers| over the logits of a position.
# F16 export: the same weights; llama.cpp rounds activations to F16 for F16 matmuls (measured max 1.9e-3,
# dots1; 4e-4 to 1.1e-3 elsewhere).
F16_TOL = 3e-3
# Q8_0 export against transformers' float32 weights: 8-bit rounding of weights and activations (measured
# medians 0.7-2.0%). In these tiny random MoE models the rounding flips a router's expert choice at a position
# now and then (dots1, deepseek_v3: 3 of 20 positions), a discrete jump, so the median position is held to
# the tolerance and greedy tokens to mostly agreeing; a wrong block layout would miss both by far.
Q8_TOL = 3e-2
Q8_GREEDY = 0.75

# llama.cpp's qwen2moe has no dense layers (every layer loads ffn_gate_inp and experts), so its tiny model
# is built with every layer sparse; the default tiny model (layer 0 dense) is refused, see below.
LLAMA_CPP_OVERRIDES = {"qwen2_moe": {"mlp_only_layers": []}}


@contextlib.contextmanager
def _llama_cpp_log():
    """Collect llama.cpp's log lines (verbose=False silences them, and a load failure is only logged)."""
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def llama_logits(path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits (len(ids), n_vocab) for the ids, one forward pass; a load failure shows llama.cpp's error."""
    with _llama_cpp_log() as log:
        try:
            model = llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=256, n_threads=2)
        except ValueError:
            errors = "".join(line for line in log if "error" in line or "fail" in line)
            pytest.fail(f"llama.cpp cannot load {path.name}: {errors or ''.join(log[-5:])}")
    try:
        model.eval(ids)
        return np.array(model.scores[: len(ids)], dtype=np.float32)
    finally:
        model.close()


# --- the real model: an imported GGUF goes back byte for byte -------------------------------------


@pytest.fixture(scope="module")
def smol_export(smol_container, tmp_path_factory):
    return export_gguf(smol_container, tmp_path_factory.mktemp("export") / "smol.gguf")


@pytest.fixture(scope="module")
def smol_readers(smol_gguf, smol_export):
    return GGUFReader(str(smol_gguf)), GGUFReader(str(smol_export))


def test_imported_gguf_exports_to_the_same_tensor_bytes(smol_readers):
    src, out = smol_readers
    assert [t.name for t in out.tensors] == [t.name for t in src.tensors]
    for a, b in zip(src.tensors, out.tensors):
        assert (b.tensor_type, list(b.shape)) == (a.tensor_type, list(a.shape)), a.name
        assert np.asarray(b.data).tobytes() == np.asarray(a.data).tobytes(), a.name


def test_imported_gguf_exports_to_the_same_model_and_tokenizer_metadata(smol_readers):
    src, out = smol_readers
    # Every llama.* and tokenizer.* key, with its GGUF value type; of general.*, what lmcli keeps.
    keys = [k for k in src.fields if k.startswith(("llama.", "tokenizer."))]
    keys += ["general.architecture", "general.name", "general.file_type", "general.quantization_version"]
    assert len(keys) > 20
    for k in keys:
        assert k in out.fields, k
        assert out.fields[k].types == src.fields[k].types, k
        assert out.fields[k].contents() == src.fields[k].contents(), k


def test_llama_cpp_gives_identical_logits_for_the_original_and_the_export(smol_gguf, smol_export):
    ids = [1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 378, 2, 1, 9690, 198]
    assert np.array_equal(llama_logits(smol_export, ids), llama_logits(smol_gguf, ids))


# --- tiny models of every architecture: HF -> container -> GGUF -> llama.cpp vs transformers ------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(arch) -> (model dir, transformers' float32 logits on ids()), each built once per module."""
    built = {}

    def get(arch):
        if arch not in built:
            d = tiny_models.build(arch, tmp_path_factory.mktemp(arch) / "hf", overrides=LLAMA_CPP_OVERRIDES.get(arch))
            with torch.no_grad():
                ref = tiny_models.reference_model(d)(torch.tensor([ids()])).logits[0].numpy()
            built[arch] = d, ref
        return built[arch]

    return get


def ids() -> list[int]:
    """20 token ids past the 3 special tokens, the sequence tests/test_architectures.py uses.

    Fixed, because a router whose k-th and (k+1)-th expert are a near tie (logit gap ~1e-3) flips under
    llama.cpp's F16 activation rounding, a discrete jump that is not an export error; this sequence has no
    such tie in these models (every position of every architecture is within F16_TOL).
    """
    return [int(t) for t in np.random.default_rng(1).integers(3, tiny_models.vocab_size(), 20)]


def exported(model_dir, qtype: str):
    lmc = model_dir.parent / f"{qtype}.lmc"
    convert_hf(model_dir, lmc, qtype, overwrite=True)
    return export_gguf(lmc, model_dir.parent / f"{qtype}.gguf", overwrite=True)


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_llama_cpp_runs_f16_export_like_transformers(arch, tiny):
    model_dir, ref = tiny(arch)
    got = llama_logits(exported(model_dir, "f16"), ids())
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= F16_TOL, f"{arch}: max deviation {err:.2e} of the logit scale"


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_llama_cpp_runs_q8_0_export_close_to_transformers(arch, tiny):
    model_dir, ref = tiny(arch)
    got = llama_logits(exported(model_dir, "q8_0"), ids())
    per_position = np.abs(got - ref).max(axis=1) / np.abs(ref).max()
    assert np.median(per_position) <= Q8_TOL, f"{arch}: per-position deviations {np.round(per_position, 3)}"
    assert (got.argmax(axis=1) == ref.argmax(axis=1)).mean() >= Q8_GREEDY


def test_exported_vocabulary_tokenizes_like_tokenizer_json(tiny):
    from tokenizers import Tokenizer

    model_dir, _ = tiny("llama")
    path = exported(model_dir, "f16")
    text = "<|im_start|>user\nHello the model, why 2024 tokens? (ok)<|im_end|>\n"
    want = Tokenizer.from_str(tiny_models.tokenizer_json()).encode(text, add_special_tokens=False).ids
    with _llama_cpp_log():
        vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        assert vocab.tokenize(text.encode(), add_bos=False, special=True) == want
    finally:
        vocab.close()


# --- refusals and atomicity -------------------------------------------------------------------


def test_export_refuses_a_config_the_llama_cpp_architecture_cannot_express(tmp_path):
    # The tiny qwen2_moe has a dense first layer (mlp_only_layers=[0]); llama.cpp's qwen2moe cannot hold one.
    model_dir = tiny_models.build("qwen2_moe", tmp_path / "hf")
    convert_hf(model_dir, tmp_path / "x.lmc", "f16")
    with pytest.raises(GGUFError, match="dense"):
        export_gguf(tmp_path / "x.lmc", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_unknown_architecture_is_named(tmp_path):
    with ContainerWriter(tmp_path / "m.lmc") as w:
        w.plan("token_embd.weight", F32, (4, 32))
        w.begin({"config": {"arch": "mamba"}, "tokenizer": {"model": "gpt2", "tokens": list("abcd")}})
        w.write("token_embd.weight", np.zeros((1, 32, 64), np.float32), np.zeros((0, 1, 1, 64), np.uint16))
        w.finish()
    with pytest.raises(GGUFError, match="mamba"):
        export_gguf(tmp_path / "m.lmc", tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.lmc"]


def test_export_refuses_to_overwrite(smol_container, smol_export, tmp_path):
    target = tmp_path / "keep.gguf"
    target.write_bytes(b"precious")
    with pytest.raises(GGUFError, match="overwrite"):
        export_gguf(smol_container, target)
    assert target.read_bytes() == b"precious"
    assert export_gguf(smol_container, target, overwrite=True) == target
    assert target.read_bytes() == smol_export.read_bytes()


def test_failed_export_leaves_no_file(smol_container, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = gguf_export.deinterleave

    def disk_full_after_a_few_tensors(*args):
        calls["n"] += 1
        if calls["n"] > 5:  # the temp file already holds header, index and some tensor data
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(gguf_export, "deinterleave", disk_full_after_a_few_tensors)
    with pytest.raises(GGUFError, match="No space left"):
        export_gguf(smol_container, tmp_path / "out.gguf")
    assert calls["n"] > 5
    assert list(tmp_path.iterdir()) == []


def test_exported_file_is_a_gguf_and_the_container_is_not(smol_container, smol_export):
    with open(smol_export, "rb") as f, open(smol_container, "rb") as g:
        assert (f.read(4), g.read(4)) == (b"GGUF", b"LMCL")
