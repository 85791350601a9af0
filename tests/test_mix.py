"""quantize --mix moe (issue 17): routed experts at the chosen 4-bit type, every matrix a token always reads
(attention, shared experts, dense FFN layers) at 8 bits. Checked against transformers: on the weights rounded as the
mix stores them (the engine runs the mix right), and on the float weights (the mix loses less than uniform q4_0)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tiny_models  # noqa: E402
from quant.container import Container  # noqa: E402
from quant.convert import convert_hf  # noqa: E402
from quant.formats import F32, Q4_0, Q8_0  # noqa: E402
from quant.quantize import dequantize_blocks, quantize_blocks  # noqa: E402

ARCHS = ["qwen2_moe", "deepseek_v3"]  # shared experts and a dense first layer; MLA with both too


@pytest.fixture(scope="module", params=ARCHS)
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    d = tiny_models.build(request.param, root / "hf")
    out = {}
    for mix in ("uniform", "moe"):
        out[mix] = root / f"{mix}.lmc"
        convert_hf(d, out[mix], "q4_0", mix=mix)
    return request.param, d, out


def _ids(n=40):
    return [int(t) for t in np.random.default_rng(3).integers(3, tiny_models.vocab_size(), n)]


def _ref_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl(base, z):
    lp, lq = _log_softmax(base), _log_softmax(np.asarray(z, np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def _lmcli_logits(path, ids):
    import lmcli

    m = lmcli.load(str(path), n_ctx=64)
    return m.logits(ids)


def test_the_moe_mix_keeps_experts_at_the_type_and_the_rest_at_8_bits(converted):
    arch, _, out = converted
    c = Container(out["moe"])
    seen = set()
    for name, t in c.tensors.items():
        if len(t.shape) == 1 or name.endswith("ffn_gate_inp.weight"):
            want = F32
        elif len(t.shape) == 3:
            want = Q4_0  # routed experts
        else:
            want = Q8_0  # attention, shared experts, dense FFN layers, embeddings, head
        assert t.fmt is want, f"{arch} {name}: {t.fmt.name}, expected {want.name}"
        seen.add(want.name)
    assert seen == {"f32", "q4_0", "q8_0"}
    assert c.metadata["quant"]["mix"] == "moe" and c.metadata["quant"]["policy"]["experts"] == "q4_0"
    uniform = Container(out["uniform"])
    assert {t.fmt.name for n, t in uniform.tensors.items() if ".attn_" in n and len(t.shape) == 2} == {"q4_0"}


def _round(p, fmt):
    a = p.detach().float().numpy()
    flat = a.reshape(-1, a.shape[-1])
    return torch.from_numpy(dequantize_blocks(quantize_blocks(flat, fmt), fmt, a.shape[-1]).reshape(a.shape))


def test_the_mix_runs_as_transformers_on_the_same_rounded_weights(converted):
    """transformers with each matrix rounded by the reference codec as the mix stores it (experts q4_0, the rest
    q8_0; routers, norms and biases float32) gives lmcli's logits within the tight tolerance of the architecture
    tests (only the int16 activations and summation order differ)."""
    arch, d, out = converted
    ref = tiny_models.reference_model(d)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim < 2 or name.endswith(("gate.weight", "shared_expert_gate.weight")) and p.shape[0] <= 8:
                continue
            # transformers keeps a layer's routed experts as 3-D parameters (or one 2-D matrix per expert)
            expert = ".experts." in name and "shared" not in name
            p.copy_(_round(p, Q4_0 if expert else Q8_0))
    ids = _ids()
    want = _ref_logits(ref, ids)
    got = _lmcli_logits(out["moe"], ids)
    assert np.abs(got - want).max() / np.abs(want).max() < 2e-3


def test_the_mix_loses_less_than_uniform_4_bit(converted):
    """Against the float32 model: the mix's mean KL divergence is below uniform q4_0's."""
    arch, d, out = converted
    ids = _ids()
    base = _ref_logits(tiny_models.reference_model(d), ids)
    kl = {mix: _kl(base, _lmcli_logits(out[mix], ids)) for mix in out}
    assert kl["moe"] < 0.8 * kl["uniform"], kl
    grow = out["moe"].stat().st_size / out["uniform"].stat().st_size
    assert grow < 2.0  # tiny models: attention is a third of the bytes here, a few percent in real MoEs


def test_the_moe_mix_of_a_dense_model_is_one_clear_error(tmp_path):
    d = tiny_models.build("llama", tmp_path / "hf")
    r = subprocess.run([sys.executable, "-m", "lmcli.cli", "quantize", str(d), str(tmp_path / "x.lmc"), "--mix",
                        "moe"], capture_output=True, text=True)
    assert r.returncode != 0 and "dense" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2 and not (tmp_path / "x.lmc").exists()
    r = subprocess.run([sys.executable, "-m", "lmcli.cli", "quantize", str(d), str(tmp_path / "x.lmc"), "--mix",
                        "half"], capture_output=True, text=True)
    assert r.returncode != 0 and "half" in r.stderr and "Traceback" not in r.stderr


def test_summary_json_reports_the_mix(converted, tmp_path):
    arch, d, _ = converted
    r = subprocess.run([sys.executable, "-m", "lmcli.cli", "quantize", str(d), str(tmp_path / "m.lmc"), "--mix",
                        "moe", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tensors"] > 0
