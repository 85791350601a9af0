"""Each router variant against transformers' own router module on the same weights and hidden states."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from transformers import AutoConfig  # noqa: E402

from lmcli.engine.moe import RouterSpec, route  # noqa: E402

HIDDEN, T = 64, 40


def _run(module, n_expert, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.weight.copy_(torch.randn(n_expert, HIDDEN, generator=g))
        x = torch.randn(T, HIDDEN, generator=g)
        _, w, idx = module(x)
        logits = (x @ module.weight.T).float().numpy()
    return logits, w.float().numpy(), idx.numpy()


def _same_routing(ids, w, ref_ids, ref_w):
    # compare as sets per token (some references return top-k unsorted)
    o1, o2 = np.argsort(ids, axis=-1), np.argsort(ref_ids, axis=-1)
    assert np.array_equal(np.take_along_axis(ids, o1, -1), np.take_along_axis(ref_ids, o2, -1))
    np.testing.assert_allclose(np.take_along_axis(w, o1, -1), np.take_along_axis(ref_w, o2, -1), rtol=1e-5, atol=1e-6)


def test_mixtral_softmax_then_topk_renormalised():
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    cfg = AutoConfig.for_model("mixtral", hidden_size=HIDDEN, num_local_experts=8, num_experts_per_tok=2)
    logits, w, idx = _run(MixtralTopKRouter(cfg), 8, 0)
    ids, ws = route(logits, RouterSpec("softmax", 2, norm_topk_prob=True))
    _same_routing(ids, ws, idx, w)


@pytest.mark.parametrize("norm", [True, False])
def test_qwen2_moe_topk_of_softmax_with_and_without_renormalisation(norm):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    cfg = AutoConfig.for_model("qwen2_moe", hidden_size=HIDDEN, num_experts=8, num_experts_per_tok=3,
                               norm_topk_prob=norm)
    logits, w, idx = _run(Qwen2MoeTopKRouter(cfg), 8, 1)
    ids, ws = route(logits, RouterSpec("softmax", 3, norm_topk_prob=norm))
    _same_routing(ids, ws, idx, w)


def test_olmoe_router():
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

    cfg = AutoConfig.for_model("olmoe", hidden_size=HIDDEN, num_experts=8, num_experts_per_tok=2)
    logits, w, idx = _run(OlmoeTopKRouter(cfg), 8, 2)
    ids, ws = route(logits, RouterSpec("softmax", 2, norm_topk_prob=cfg.norm_topk_prob))
    _same_routing(ids, ws, idx, w)


def test_granite_softmax_over_topk_logits_equals_renormalised_softmax():
    from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeTopKRouter

    cfg = AutoConfig.for_model("granitemoe", hidden_size=HIDDEN, num_local_experts=8, num_experts_per_tok=2)
    logits, w, idx = _run(GraniteMoeTopKRouter(cfg), 8, 3)
    ids, ws = route(logits, RouterSpec("softmax", 2, norm_topk_prob=True))
    _same_routing(ids, ws, idx, w)


@pytest.mark.parametrize("arch", ["deepseek_v3", "dots1"])
@pytest.mark.parametrize("norm", [True, False])
def test_sigmoid_group_limited_router_with_correction_bias(arch, norm):
    if arch == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as R
    else:
        from transformers.models.dots1.modeling_dots1 import Dots1TopkRouter as R
    cfg = AutoConfig.for_model(arch, hidden_size=HIDDEN, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                               topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=norm)
    m = R(cfg)
    bias = torch.randn(16, generator=torch.Generator().manual_seed(9)) * 0.5
    m.e_score_correction_bias.copy_(bias)
    logits, w, idx = _run(m, 16, 4)
    spec = RouterSpec("sigmoid", 4, norm_topk_prob=norm, scaling=2.5, n_group=4, topk_group=2)
    ids, ws = route(logits, spec, bias.numpy())
    _same_routing(ids, ws, idx, w)
    # the bias moves selection only: weights are the uncorrected sigmoid scores (times the scale)
    s = 1 / (1 + np.exp(-logits))
    raw = np.take_along_axis(s, ids, -1)
    expect = raw / raw.sum(-1, keepdims=True) * 2.5 if norm else raw * 2.5
    np.testing.assert_allclose(ws, expect, rtol=1e-5)
