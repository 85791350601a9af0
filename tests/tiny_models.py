"""Tiny random transformers models of every supported architecture, saved as Hugging Face directories.

`build(arch, out_dir)` writes config.json, model.safetensors (or shards), generation_config.json, a trained
byte-level BPE tokenizer.json and a tokenizer_config.json with a ChatML template. Dimensions are small
(hidden 64, 4 heads, 2 KV heads, 4-8 experts, top-2) and every matrix row length is a multiple of 32.
Weights are drawn with std 1/sqrt(fan_in) (routers and lm_head larger; norm weights 1 +- 0.1, biases and
e_score_correction_bias +- 0.1) rather than transformers' 0.02, so activations keep unit scale through the layers,
routing is decisive and greedy tokens win by clear margins.
"""

from __future__ import annotations

import functools
import json
import math
import random
from pathlib import Path

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "dots1",
         "deepseek_v3"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
BOS_ID, EOS_ID = 0, 2
VOCAB_TARGET = 384
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
               max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
               rope_parameters={"rope_type": "default", "rope_theta": 50000.0})

# Per-architecture config.json keys (their own names), on top of _COMMON.
CONFIGS: dict[str, dict] = {
    "llama": dict(head_dim=16, tie_word_embeddings=True),
    "mistral": dict(head_dim=16),
    "qwen2": dict(),  # q/k/v biases
    "qwen3": dict(head_dim=32),  # head_dim != hidden / heads; per-head QK-norm
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),  # expert FFN = intermediate_size
    "qwen2_moe": dict(num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, norm_topk_prob=False, mlp_only_layers=[0]),
    "qwen3_moe": dict(head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32, norm_topk_prob=False),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, embedding_multiplier=2.0,
                       residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=3.0),
    "dots1": dict(num_hidden_layers=3, head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                  n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                  norm_topk_prob=True),
    # MLA expands the latent to keys/values for every head, so num_key_value_heads = num_attention_heads.
    "deepseek_v3": dict(num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                        moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32,
                        kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_group=2,
                        topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, rope_interleave=True),
}

_WORDS = ("the a an of to in is was for on with as by at from that this it be are or and not but which one two three "
          "model expert router token layer cache weight matrix vector tensor group scale block byte page memory "
          "fast slow small large cat dog bird tree river stone cloud light dark red green blue north south east west "
          "hello world please thanks yes no maybe why how what when where who run walk talk sing read write").split()


def _corpus(rng: random.Random) -> list[str]:
    lines = []
    for i in range(400):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        if i % 5 == 0:
            words.insert(0, rng.choice(("Hello", "The", "Why", "What", "A")))
        if i % 7 == 0:
            words.append(str(rng.randint(0, 9999)))
        lines.append(" ".join(words) + rng.choice((".", "?", "!", ",", ":", " (ok)")))
    return lines


@functools.lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """A byte-level BPE tokenizer (about VOCAB_TARGET ids, the ChatML markers as special tokens) as JSON text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_TARGET, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(random.Random(0)), trainer)
    return tok.to_str()


def vocab_size() -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json()).get_vocab_size(with_added_tokens=True)


def write_tokenizer(out_dir: Path) -> None:
    """tokenizer.json plus a tokenizer_config.json naming bos/eos and carrying the ChatML template."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    added = {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False} for i, t in enumerate(SPECIAL_TOKENS)}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[BOS_ID],
              "eos_token": SPECIAL_TOKENS[EOS_ID], "pad_token": SPECIAL_TOKENS[BOS_ID], "add_bos_token": False,
              "add_eos_token": False, "model_max_length": 256, "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": added, "chat_template": CHATML}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def config_kwargs(arch: str, overrides: dict | None = None) -> dict:
    """The config.json keys a tiny model of `arch` is built with."""
    if arch not in CONFIGS:
        raise ValueError(f"unknown arch {arch!r} (known: {', '.join(ARCHS)})")
    kw = {**_COMMON, **CONFIGS[arch], **(overrides or {})}
    ids = dict(vocab_size=vocab_size(), bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=BOS_ID)
    kw.update((k, v) for k, v in ids.items() if k not in (overrides or {}))  # a model with its own tokenizer
    return kw


def _init_weights(model, seed: int) -> None:
    """Redraw every weight with a scale that keeps activations near unit size (see the module docstring)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm weights around 1, biases around 0
                base = 0.0 if name.endswith("bias") else 1.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
                continue
            fan_in = p.shape[-1]
            std = 1.0 / math.sqrt(fan_in)
            if "embed_tokens" in name:
                std = 1.0
            elif "lm_head" in name:
                std = 6.0 / math.sqrt(fan_in)  # logits with std ~6: greedy tokens win by clear margins
            elif name.endswith(("gate.weight", "router.weight", "router.layer.weight")):
                std = 2.5 / math.sqrt(fan_in)  # router logits with std ~2.5: decisive top-k
            p.copy_(std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def build(arch: str, out_dir: str | Path, *, seed: int = 0, dtype: str = "float32", overrides: dict | None = None,
          max_shard_size: str | None = None, original_format: bool = True) -> Path:
    """Write a tiny random `arch` model with its tokenizer into out_dir and return out_dir.

    overrides: config keys to change (e.g. {"q_lora_rank": None} for DeepSeek-V3 without the query LoRA).
    max_shard_size: e.g. "64KB" to write several shards and model.safetensors.index.json.
    original_format: False saves transformers' in-memory names (fused 3-D expert tensors such as gate_up_proj)
    instead of the checkpoint names it normally converts back to.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    kw = config_kwargs(arch, overrides)
    config = AutoConfig.for_model(arch, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _init_weights(model, seed)
    model = model.to(getattr(torch, dtype)).eval()
    save_kw = {"save_original_format": original_format}
    if max_shard_size is not None:
        save_kw["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **save_kw)
    write_tokenizer(out_dir)
    return out_dir


def reference_model(model_dir: str | Path):
    """The transformers model of a built directory, in float32 and eval mode (the test reference)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def _fp8_weight(name: str, t) -> bool:
    """Which tensors a block-FP8 checkpoint (DeepSeek-V3, Kimi K2) stores in float8: the decoder layers' matrices
    but the router; embeddings, head, norms and biases stay bf16."""
    return name.startswith("model.layers.") and t.ndim == 2 and not name.endswith("mlp.gate.weight")


def fp8_twin(model_dir: str | Path, fp8_dir: str | Path, block: tuple[int, int], *, seed: int = 0,
             mtp_layer: bool = True) -> Path:
    """Quantize a built model's decoder matrices to float8_e4m3fn with one power-of-two scale per block (drawn at
    random from 2^-9..2^-4, so neighbouring blocks differ) and write the block-FP8 checkpoint to fp8_dir: weights,
    their `<name>_scale_inv` (float32), quantization_config {quant_method: fp8, weight_block_size}, two shards and
    an index; with mtp_layer, a multi-token-prediction layer (index num_hidden_layers, FP8 like the rest, in a
    third shard) that conversion must skip. model_dir is rewritten in bf16 with the dequantized values (exact:
    float8 times a power of two is a bf16 number): the "dequantized bf16 twin" the FP8 checkpoint must equal."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    model_dir, fp8_dir = Path(model_dir), Path(fp8_dir)
    src = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        src.update(load_file(f))
    g = torch.Generator().manual_seed(seed + 7)
    br, bc = block
    twin, fp8 = {}, {}
    for name, t in src.items():
        t = t.float()
        if not _fp8_weight(name, t):
            twin[name] = fp8[name] = t.to(torch.bfloat16)
            continue
        rows, cols = t.shape
        nr, nc = -(-rows // br), -(-cols // bc)
        scale = torch.pow(2.0, torch.randint(-9, -3, (nr, nc), generator=g).float())  # (row blocks, col blocks)
        full = scale.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
        q = (t / full).clamp(-448, 448).to(torch.float8_e4m3fn)
        twin[name] = (q.float() * full).to(torch.bfloat16)
        fp8[name], fp8[name + "_scale_inv"] = q, scale
    for f in model_dir.glob("*.safetensors*"):
        f.unlink()
    save_file(twin, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    fp8_dir.mkdir(parents=True, exist_ok=True)
    # two shards; a weight and its scales stay in one, as DeepSeek-V3's and Kimi K2's do
    groups = [[n] + [n + "_scale_inv"] * (n + "_scale_inv" in fp8) for n in fp8 if not n.endswith("_scale_inv")]
    half = len(groups) // 2
    shards = {f"model-0000{i + 1}-of-00003.safetensors": {n: fp8[n] for grp in part for n in grp}
              for i, part in enumerate((groups[:half], groups[half:]))}
    if mtp_layer:
        n = config["num_hidden_layers"]
        last = {k: v for k, v in fp8.items() if k.startswith(f"model.layers.{n - 1}.")}
        mtp = {k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}."): v for k, v in last.items()}
        h = config["hidden_size"]
        for k, shape in (("enorm.weight", (h,)), ("hnorm.weight", (h,)), ("eh_proj.weight", (h, 2 * h)),
                         ("shared_head.norm.weight", (h,))):
            mtp[f"model.layers.{n}.{k}"] = torch.ones(shape, dtype=torch.bfloat16)
        shards["model-00003-of-00003.safetensors"] = mtp
        config["num_nextn_predict_layers"] = 1
    weight_map = {}
    for fname, tensors in shards.items():
        save_file(tensors, str(fp8_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    (fp8_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (fp8_dir / "config.json").write_text(json.dumps(config, indent=2))
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".json")) or f.name.startswith(("tokenizer", "gen")):
            shutil.copy(f, fp8_dir / f.name)
    return fp8_dir
