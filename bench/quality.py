"""Quantization quality: perplexity, mean KL divergence from a base model and top-1 agreement, for lmcli
containers and GGUF files run by either engine, the same way for all (issue 17).

    python bench/quality.py --base BASE [--text FILE] [--ctx 512] [--max-tokens 8192] [--json] VARIANT ...

BASE and each VARIANT are a model path, optionally with @lmcli or @llama for the engine that runs it
(default: lmcli; a .gguf file runs on either, so the same file can be compared across engines). The text (default
this repo's README) is tokenized once with the base's tokenizer under lmcli, cut into chunks of --ctx tokens,
and every engine scores the same ids. As llama.cpp's perplexity tool does, only the second half of each chunk is
scored, so every scored token has at least ctx/2 tokens of context. All statistics are computed in float64:

  PPL       exp(mean negative log-likelihood of the text's next token)
  KL        mean over positions of sum_v p_base(v) (log p_base(v) - log p(v))
  top-1     share of positions whose most likely token equals the base's
  bits/w    the file's bytes * 8 / the base's parameter count (embeddings and norms included)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_spec(spec: str) -> tuple[str, str]:
    """'path@engine' -> (path, engine); engine lmcli (default) or llama."""
    path, _, engine = spec.rpartition("@") if spec.endswith(("@lmcli", "@llama")) else (spec, "", "lmcli")
    return path, engine


class LmcliScorer:
    def __init__(self, path: str, ctx: int):
        import lmcli

        self.model = lmcli.load(path, n_ctx=ctx)

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.model.logits(ids)


class LlamaScorer:
    def __init__(self, path: str, ctx: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=path, n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)


def scorer(spec: str, ctx: int):
    path, engine = parse_spec(spec)
    return (LlamaScorer if engine == "llama" else LmcliScorer)(path, ctx)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


class Tally:
    """Running sums of one variant's statistics over scored positions."""

    def __init__(self):
        self.n = 0
        self.nll = 0.0
        self.kl = 0.0
        self.top1 = 0

    def add(self, base_lp: np.ndarray, lp: np.ndarray, targets: np.ndarray) -> None:
        self.n += len(targets)
        self.nll -= float(lp[np.arange(len(targets)), targets].sum())
        self.kl += float((np.exp(base_lp) * (base_lp - lp)).sum())
        self.top1 += int((base_lp.argmax(-1) == lp.argmax(-1)).sum())

    def result(self) -> dict:
        return {"tokens": self.n, "ppl": float(np.exp(self.nll / self.n)), "mean_kl": self.kl / self.n,
                "top1": self.top1 / self.n}


def chunks(ids: list[int], ctx: int, max_tokens: int) -> list[list[int]]:
    ids = ids[:max_tokens]
    return [ids[i : i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)]


def evaluate(base, variants: dict, ids: list[int], ctx: int, max_tokens: int) -> dict:
    """{name: statistics} for the base (against itself) and each variant; scorers have .logits(ids)."""
    tallies = {name: Tally() for name in ["base", *variants]}
    for chunk in chunks(ids, ctx, max_tokens):
        first = ctx // 2
        targets = np.asarray(chunk[first + 1 :])
        base_lp = _log_softmax(base.logits(chunk)[first:-1])
        tallies["base"].add(base_lp, base_lp, targets)
        for name, sc in variants.items():
            tallies[name].add(base_lp, _log_softmax(sc.logits(chunk)[first:-1]), targets)
    return {name: t.result() for name, t in tallies.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--text", default=str(ROOT / "README.md"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("variants", nargs="*")
    a = ap.parse_args()
    import lmcli

    base_path, _ = parse_spec(a.base)
    base = scorer(a.base, a.ctx)
    tok_model = base.model if isinstance(base, LmcliScorer) else lmcli.load(base_path, n_ctx=a.ctx)  # loaded once
    ids = tok_model.tokenize(Path(a.text).read_text(encoding="utf-8"))
    if len(ids) < a.ctx:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than one chunk of --ctx {a.ctx}")
    from quant.schema import token_costs

    params = token_costs(tok_model.config, tok_model.transformer.container.tensor_sizes()).params_total
    variants = {spec: scorer(spec, a.ctx) for spec in a.variants}
    res = evaluate(base, variants, ids, a.ctx, a.max_tokens)
    for spec, r in res.items():
        path = parse_spec(a.base if spec == "base" else spec)[0]
        r["bits_per_weight"] = Path(path).stat().st_size * 8 / params
    if a.json:
        print(json.dumps(res))
        return
    print(f"{res['base']['tokens']} scored tokens of {Path(a.text).name}, chunks of {a.ctx}; base {a.base}")
    print("| variant | bits/weight | PPL | PPL change | mean KL | top-1 |\n|---|---|---|---|---|---|")
    b = res["base"]["ppl"]
    for spec, r in res.items():
        print(f"| {spec} | {r['bits_per_weight']:.2f} | {r['ppl']:.3f} | {r['ppl'] / b - 1:+.1%} | {r['mean_kl']:.4f} | {r['top1']:.1%} |")


if __name__ == "__main__":
    main()
