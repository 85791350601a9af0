"""Activation precision on real weights: lmcli's int16 activations against int8 ones (llama.cpp's q8_0 scheme,
the one that would let AVX2 use vpmaddubsw), both against transformers on the same GGUF in float32.

The int8 variant is simulated, not a kernel: activation codes are rounded to [-127, 127] per group of 32 (d = amax
/ 127, roundf as llama.cpp's quantize_row_q8_0) and stored in the int16 codes the kernels read, so the integer
products are exactly what an int8 kernel would compute.

    python bench/act_precision.py [--tokens 1000]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

PROMPTS = ["What is the capital of France?", "Write a Python function that returns the square of a number.",
           "List three colors of the rainbow."]


def quantize_act_int8(x, xq, xd, xs):
    """kernels.quantize_act's contract with int8-range codes (llama.cpp's quantize_row_q8_0 rounding)."""
    T, n = x.shape
    g = x.reshape(T, n // 32, 32).astype(np.float32)
    d = np.abs(g).max(-1) / np.float32(127)
    inv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0).astype(np.float32)
    v = g * inv[..., None]
    q = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int16)
    xq[:] = q.reshape(T, n)
    xd[:] = d
    xs[:] = q.astype(np.int32).sum(-1)


def log_softmax(a):
    a = a - a.max(-1, keepdims=True)
    return a - np.log(np.exp(a).sum(-1, keepdims=True))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--dir", default="/tmp/lmcli-bench")
    a = ap.parse_args()

    import torch
    import transformers

    import lmcli
    from lmcli.registry import load_registry
    from lmcli.store import packaged_file
    from quant import kernels
    from quant.gguf_io import import_gguf

    gguf = packaged_file(load_registry()["smollm2"].packaged)
    lmc = Path(a.dir) / "smollm2-q4_1.lmc"
    if not lmc.exists():
        lmc.parent.mkdir(parents=True, exist_ok=True)
        import_gguf(gguf, lmc)
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32).eval()
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    ids = tok(text)["input_ids"][: a.tokens]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy().astype(np.float64)
    lr = log_softmax(ref)
    int16 = kernels.quantize_act
    try:
        for name, fn in (("int16", int16), ("int8", quantize_act_int8)):
            kernels.quantize_act = fn
            m = lmcli.load(str(lmc), n_ctx=len(ids) + 64)
            got = m.logits(ids).astype(np.float64)
            kl = (np.exp(lr) * (lr - log_softmax(got))).sum(-1)
            rel = np.abs(got - ref).max(-1) / np.abs(ref).max(-1)
            same = []  # tokens of greedy decoding equal to transformers', of 32
            for p in PROMPTS:
                cid = m.chat_ids([{"role": "user", "content": p}])
                with torch.no_grad():
                    out = model.generate(torch.tensor([cid]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
                r = out[0, len(cid):].tolist()
                g = list(m.generate(cid, max_tokens=32, temp=0.0, ignore_eos=True))[-1].tokens
                same.append(next((i for i, (x, y) in enumerate(zip(r, g)) if x != y), 32))
            top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
            print(json.dumps({"activations": name, "tokens": len(ids), "max_rel_err": float(rel.max()),
                              "median_rel_err": float(np.median(rel)), "mean_kl": float(kl.mean()),
                              "max_kl": float(kl.max()), "top1_agreement": top1, "greedy_tokens_equal_of_32": same}))
    finally:
        kernels.quantize_act = int16


if __name__ == "__main__":
    main()
