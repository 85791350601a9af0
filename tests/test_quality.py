"""bench/quality.py: perplexity, KL divergence and top-1 agreement as torch computes them on the same logits."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402


class TorchScorer:
    """The transformers model of a tiny checkpoint: the base, in float32."""

    def __init__(self, model_dir):
        self.model = tiny_models.reference_model(model_dir)

    def logits(self, ids):
        with torch.no_grad():
            return self.model(torch.tensor([ids])).logits[0].float().numpy()


def _expected(base_logits, var_logits, ids, ctx):
    """The statistics over the second half of each chunk, written with torch in float64."""
    nll, kl, top1, n = 0.0, 0.0, 0, 0
    for b, v, chunk in zip(base_logits, var_logits, quality.chunks(ids, ctx, len(ids))):
        h = ctx // 2
        bl = torch.log_softmax(torch.tensor(b[h:-1], dtype=torch.float64), -1)
        vl = torch.log_softmax(torch.tensor(v[h:-1], dtype=torch.float64), -1)
        tgt = torch.tensor(chunk[h + 1:])
        nll += float(torch.nn.functional.nll_loss(vl, tgt, reduction="sum"))
        kl += float(torch.nn.functional.kl_div(vl, bl, log_target=True, reduction="sum"))
        top1 += int((bl.argmax(-1) == vl.argmax(-1)).sum())
        n += len(tgt)
    return {"tokens": n, "ppl": float(np.exp(nll / n)), "mean_kl": kl / n, "top1": top1 / n}


@pytest.mark.parametrize("qtype", ["f16", "q4_0"])
def test_statistics_match_torch_on_the_same_logits(tmp_path, qtype):
    import lmcli
    from quant.convert import convert_hf

    d = tiny_models.build("llama", tmp_path / "hf")
    out = tmp_path / f"m-{qtype}.lmc"
    convert_hf(d, out, qtype)
    base, var = TorchScorer(d), quality.LmcliScorer(str(out), 64)
    ids = [int(t) for t in np.random.default_rng(3).integers(3, lmcli.load(str(out)).config.vocab_size, 200)]
    ctx = 64
    res = quality.evaluate(base, {"v": var}, ids, ctx, len(ids))
    cs = quality.chunks(ids, ctx, len(ids))
    assert len(cs) == 3 and res["v"]["tokens"] == 3 * (ctx - ctx // 2 - 1)
    exp = _expected([base.logits(c) for c in cs], [var.logits(c) for c in cs], ids, ctx)
    assert res["v"]["tokens"] == exp["tokens"] and res["v"]["top1"] == exp["top1"]
    assert res["v"]["ppl"] == pytest.approx(exp["ppl"], rel=1e-9)
    assert res["v"]["mean_kl"] == pytest.approx(exp["mean_kl"], rel=1e-6, abs=1e-12)
    assert res["base"]["mean_kl"] == 0 and res["base"]["top1"] == 1.0
    if qtype == "f16":  # lmcli's f16 model is the transformers model
        assert res["v"]["mean_kl"] < 1e-6 and res["v"]["top1"] == 1.0
    else:  # 4-bit weights lose something, measurably
        assert res["v"]["mean_kl"] > res["base"]["mean_kl"]


def test_specs_name_the_engine():
    assert quality.parse_spec("a/b.gguf@llama") == ("a/b.gguf", "llama")
    assert quality.parse_spec("a/b.gguf@lmcli") == ("a/b.gguf", "lmcli")
    assert quality.parse_spec("a/b@c.lmc") == ("a/b@c.lmc", "lmcli")
