"""Block-FP8 checkpoints (issue 20): float8_e4m3fn weights with a float32 `<name>_scale_inv` per block
(DeepSeek-V3, Kimi K2) convert by dequantizing on the fly. References: torch's float8 dtypes for the byte tables,
transformers' own FP8 dequantization for the blocks, and a tiny DeepSeek-V3 with YaRN whose dequantized bf16 twin
transformers runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tiny_models  # noqa: E402
from quant.convert import convert_hf  # noqa: E402
from quant.errors import ConvertError  # noqa: E402
from test_architectures import TIGHT, _ref_logits, _rel, rounded_reference  # noqa: E402

BLOCK = (32, 48)  # not square and not dividing the tiny matrices: partial blocks at both edges
YARN = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0,
                            "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 1.0},
        "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """(bf16 twin dir, FP8 dir): a tiny deepseek_v3 with YaRN; both directories are named hf, so the containers'
    metadata (which records the directory name) is the same too."""
    root = tmp_path_factory.mktemp("fp8")
    twin = tiny_models.build("deepseek_v3", root / "twin" / "hf", dtype="bfloat16", overrides=YARN)
    return twin, tiny_models.fp8_twin(twin, root / "fp8" / "hf", BLOCK)


def _container(model_dir, qtype):
    out = model_dir.parent / f"m-{qtype}.lmc"
    summary = convert_hf(model_dir, out, qtype, overwrite=True) if not out.exists() else None
    return out, summary


def test_float8_byte_tables_equal_torch():
    from quant.safetensors_io import FLOAT8

    b = torch.arange(256, dtype=torch.uint8)
    for name, dtype in (("F8_E4M3", torch.float8_e4m3fn), ("F8_E8M0", torch.float8_e8m0fnu)):
        assert np.array_equal(FLOAT8[name], b.view(dtype).float().numpy(), equal_nan=True), name


def test_blocks_dequantize_as_transformers_does(tmp_path):
    """Any row range (chunks start inside blocks) times the right scales, against transformers' FP8 dequantizer."""
    from safetensors.torch import save_file
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    from quant.convert import _read_rows
    from quant.hf_tensors import Piece
    from quant.safetensors_io import TensorSource

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(100, 150, generator=g) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(4, 4, generator=g) + 0.5  # ceil(100 / 32), ceil(150 / 48)
    save_file({"w": w, "w_scale_inv": s}, str(tmp_path / "model.safetensors"))
    want = _dequantize_fp8_weight(w, s, list(BLOCK), torch.float32).numpy()
    with TensorSource(tmp_path) as src:
        p = Piece("w", 0, 100, 150, scale="w_scale_inv", block=BLOCK)
        for a, b in ((0, 100), (5, 77), (31, 33), (96, 100)):
            np.testing.assert_array_equal(_read_rows(src, p, a, b), want[a:b])


@pytest.mark.parametrize("qtype", ["q8_0", "f16"])
def test_fp8_checkpoint_gives_the_same_container_as_its_bf16_twin(twins, qtype):
    twin, fp8 = twins
    a, _ = _container(twin, qtype)
    b, summary = _container(fp8, qtype)
    assert b.read_bytes() == a.read_bytes()
    names = json.loads((fp8 / "model.safetensors.index.json").read_text())["weight_map"]
    mtp = [n for n in names if n.startswith("model.layers.3.")]  # num_hidden_layers is 3
    assert any(n.endswith("_scale_inv") for n in mtp) and summary["skipped"] == {"mtp_layers": [3],
                                                                                 "tensors": len(mtp)}


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_fp8_yarn_deepseek_matches_transformers_on_the_twin_past_the_original_context(twins, qtype):
    import lmcli

    twin, fp8 = twins
    m = lmcli.load(str(_container(fp8, qtype)[0]), n_ctx=256)
    ids = [int(t) for t in np.random.default_rng(3).integers(3, m.config.vocab_size, 230)]
    ref = _ref_logits(rounded_reference(twin, qtype), ids)
    got = m.logits(ids)
    assert _rel(got[200:], ref[200:]) < TIGHT and _rel(got, ref) < TIGHT
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))


def test_fp8_yarn_deepseek_greedy_16_tokens_equal_transformers(twins):
    import lmcli

    twin, fp8 = twins
    m = lmcli.load(str(_container(fp8, "f16")[0]), n_ctx=256)
    ids = [int(t) for t in np.random.default_rng(4).integers(3, m.config.vocab_size, 200)]
    with torch.no_grad():
        out = rounded_reference(twin, "f16").generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16,
                                                      do_sample=False)
    events = list(m.generate(ids, max_tokens=16, temp=0.0, ignore_eos=True))
    assert events[-1].tokens == out[0, len(ids):].tolist()


def _edit(fp8_dir, tmp_path, *, drop=None, change=None, config=None):
    """A copy of the FP8 checkpoint with one tensor dropped or replaced, or config.json keys changed."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "hf"
    shutil.copytree(fp8_dir, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = drop or (change and next(iter(change)))
    if name:
        f = d / index["weight_map"][name]
        t = load_file(f)
        t.pop(drop, None)
        t.update(change or {})
        save_file(t, str(f))
        if drop:
            del index["weight_map"][drop]
            (d / "model.safetensors.index.json").write_text(json.dumps(index))
    if config:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(config)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


W = "model.layers.1.self_attn.kv_b_proj.weight"


@pytest.mark.parametrize("edit,match", [
    ({"drop": W + "_scale_inv"}, "float8 without its .*_scale_inv"),
    ({"change": {W + "_scale_inv": torch.ones(2, 2)}}, r"needs \[8, 1\] scales"),
    ({"drop": W}, "holds the scales of .*kv_b_proj.weight, which the checkpoint does not hold"),
    ({"config": {"quantization_config": None}}, "no quantization_config"),
    ({"config": {"quantization_config": {"quant_method": "awq"}}}, "quant_method 'awq' is not supported"),
    ({"config": {"quantization_config": {"quant_method": "fp8", "weight_block_size": None}}},
     "per-tensor FP8 scales are not supported"),
])
def test_a_malformed_fp8_checkpoint_is_refused_before_anything_is_written(twins, tmp_path, edit, match):
    d = _edit(twins[1], tmp_path, **edit)
    with pytest.raises(ConvertError, match=match):
        convert_hf(d, tmp_path / "m.lmc", "q8_0")
    assert not (tmp_path / "m.lmc").exists()


def test_a_non_finite_fp8_block_is_refused(twins, tmp_path):
    from safetensors.torch import load_file

    index = json.loads((twins[1] / "model.safetensors.index.json").read_text())
    w = load_file(twins[1] / index["weight_map"][W])[W].clone()
    w.view(torch.uint8)[3, 5] = 0x7F  # float8_e4m3fn's NaN
    d = _edit(twins[1], tmp_path, change={W: w})
    with pytest.raises(ConvertError, match="non-finite"):
        convert_hf(d, tmp_path / "m.lmc", "q8_0")


def test_quantize_says_it_skipped_the_multi_token_prediction_layer(twins, tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lmcli.cli", "quantize", str(twins[1]), str(tmp_path / "m.lmc"),
                        "--type", "f16"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "skipped the multi-token-prediction layer 3" in r.stdout


def test_pull_converts_the_fp8_checkpoint_shard_by_shard_and_never_downloads_the_mtp_shard(twins, tmp_path):
    """lmcli pull from a local Hub: the same tensors as quantizing the bf16 twin; the shard that holds only the
    multi-token-prediction layer is never fetched (only its header, to plan)."""
    from hub_server import FakeHub
    from test_pull import assert_same_model, pull

    twin, fp8 = twins
    ref, _ = _container(twin, "q8_0")
    h = FakeHub().start()
    try:
        h.add_repo("org/tiny-fp8", fp8)
        r = pull(h, tmp_path / "home", "org/tiny-fp8", "--type", "q8_0")
        assert r.returncode == 0, r.stderr
        assert_same_model(tmp_path / "home" / "models" / "org" / "tiny-fp8" / "model.lmc", ref)
        fetched = lambda shard: [e for e in h.requests(shard) if e["range"] is None]  # noqa: E731 (not a header read)
        assert fetched("model-00001-of-00003.safetensors") and not fetched("model-00003-of-00003.safetensors")
    finally:
        h.stop()


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/clear_refs").exists(),
                    reason="needs Linux /proc peak-RSS reset")
def test_fp8_conversion_streams_with_peak_memory_far_below_the_model_size(twins, tmp_path):
    """Dequantizing block by block keeps the float32 temporaries to one chunk of rows: the resident set grows by
    far less than the checkpoint (whose float32 equivalent is 4x its float8 bytes)."""
    import subprocess
    import sys

    from test_convert import _PEAK_SCRIPT, ROOT

    big = tiny_models.build("deepseek_v3", tmp_path / "twin" / "hf", dtype="bfloat16", overrides=dict(
        hidden_size=512, num_hidden_layers=4, n_routed_experts=16, moe_intermediate_size=512, intermediate_size=1024,
        num_attention_heads=8, num_key_value_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, n_group=2, topk_group=1))
    fp8 = tiny_models.fp8_twin(big, tmp_path / "fp8" / "hf", (128, 128), mtp_layer=False)
    limit = 16 << 20
    r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(twins[1]), str(fp8), str(tmp_path / "b.lmc")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["input_bytes"] > 2 * limit  # float8 bytes: as float32, more than 8x the limit
    assert m["delta_bytes"] < limit, m
