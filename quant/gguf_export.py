"""GGUF export: a container written back as a real GGUF that llama.cpp runs (its arch, keys, names, block bytes)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import jsonio, rope
from .container import Container
from .errors import GGUFError
from .formats import F16, F32, FORMATS, Format
from .gguf_archs import FOR_EXPORT, GGUFArch
from .hf_tiktoken import KIMI
from .quantize import deinterleave, dequantize_blocks

# GGUF token types (llama_token_type).
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5

# Hugging Face pre-tokenizer split regexes -> the llama.cpp `tokenizer.ggml.pre` that splits the same way.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_PRE_BY_SPLIT = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2", _GPT2_SPLIT: "gpt-2", KIMI.pat_str: "kimi-k2"}


@dataclass
class _Tensor:
    """One GGUF tensor to write: its type, logical shape (outermost first), size, and a chunk producer."""

    name: str
    fmt: Format  # its GGUF type is fmt.gguf_type
    shape: tuple[int, ...]  # numpy order: (n_expert, n_out, n_in) / (n_out, n_in) / (n,)
    nbytes: int
    chunks: Callable[[], Iterator[np.ndarray]]  # yields the data in file order, one piece at a time


def export_gguf(container_path: str | os.PathLike, out_path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the container as a GGUF file llama.cpp runs (atomically: temp file, fsync, rename). Returns out_path."""
    src, out = Path(container_path), Path(out_path)
    if out.exists() and not overwrite:
        raise GGUFError(f"{out} exists (refusing to overwrite)")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise GGUFError(f"{out} is the container being exported; choose another output path")
    c = Container(src)
    try:
        cfg = c.metadata.get("config")
        if not isinstance(cfg, dict):
            raise GGUFError(f"{src}: the container has no model config")
        ga = _arch(cfg)
        tensors = _plan_tensors(c, cfg, ga)
        _write(out, ga.name, lambda w: _add_metadata(w, c, cfg, ga), tensors)
    finally:
        c.close()
    return out


# --- architecture and metadata ----------------------------------------------------------------


def _arch(cfg: dict) -> GGUFArch:
    name = cfg.get("arch")
    if name not in FOR_EXPORT:
        raise GGUFError(f"architecture {name!r} cannot be exported to GGUF "
                        f"(exportable: {', '.join(sorted(FOR_EXPORT))})")
    ga = FOR_EXPORT[name]
    arch = ga.name
    n_expert = int(cfg.get("n_expert", 0))
    if n_expert and ga.fixed_routing:
        for key, want in ga.fixed_routing:
            have = cfg.get(key, want)
            if have != want:
                raise GGUFError(
                    f"{name} with {key} = {have!r} cannot be exported: llama.cpp's {arch} graph always uses "
                    f"{key} = {want!r}"
                )
    if n_expert and not ga.deepseek_moe and int(cfg.get("n_group", 1)) > 1:
        if int(cfg.get("topk_group", 1)) < int(cfg["n_group"]):
            raise GGUFError(f"{name} with group-limited routing cannot be exported as llama.cpp's {arch}")
    if n_expert and not ga.deepseek_moe and int(cfg.get("first_k_dense", 0)):
        raise GGUFError(f"{name} with leading dense layers cannot be exported: llama.cpp's {arch} has none")
    if ga.mla and not cfg.get("kv_lora_rank"):
        raise GGUFError(f"{name} without multi-head latent attention cannot be exported as deepseek2")
    scaling = cfg.get("rope_scaling")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    if scaling and (kind not in ("linear", "yarn", "llama3") or (kind == "llama3" and not ga.llama3_rope)):
        raise GGUFError(f"{name} with {kind!r} rope scaling cannot be exported as llama.cpp's {arch}")
    if kind == "yarn" and scaling.get("truncate", True) is False:  # ggml_rope_yarn_corr_dims floors and ceils
        raise GGUFError(f"{name}: YaRN with truncate false cannot be exported (llama.cpp always truncates)")
    if kind == "yarn" and not math.isclose(rope.yarn_attention_factor(scaling), _llama_cpp_yarn_factor(scaling, ga),
                                           rel_tol=1e-6):
        raise GGUFError(f"{name}: its YaRN attention factor (mscale {scaling.get('mscale')}, mscale_all_dim "
                        f"{scaling.get('mscale_all_dim')}, attention_factor {scaling.get('attention_factor')}) "
                        f"is not one llama.cpp's {arch} computes; it cannot be exported")
    return ga


def _llama_cpp_yarn_factor(p: dict, ga: GGUFArch) -> float:
    """The factor on cos and sin llama.cpp applies for the keys _add_rope_scaling writes (llama_context's
    yarn_attn_factor times ggml's own 1 + 0.1 ln(factor)): deepseek2 cancels it to 1 and moves mscale_all_dim into
    the softmax scale, as DeepseekV3Attention does (so only mscale == mscale_all_dim is expressible); the other
    architectures get get_mscale(factor), transformers' default. NaN where nothing matches."""
    if ga.mla:
        return 1.0 if p.get("mscale_all_dim") else math.nan
    return rope.get_mscale(float(p["factor"]))


def _add_metadata(w, c: Container, cfg: dict, ga: GGUFArch) -> None:
    """Every key llama.cpp's loader reads for the architecture (llama_model_*::load_arch_hparams, load_hparams)."""
    from gguf import ExpertGatingFuncType

    meta = c.metadata
    n_embd, n_head = int(cfg["n_embd"]), int(cfg["n_head"])
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    n_expert = int(cfg.get("n_expert", 0))
    n_ff, n_ff_exp = int(cfg["n_ff"]), int(cfg.get("n_ff_exp", 0))
    source = meta.get("source") or {}
    name = source.get("name") or source.get("repo") or source.get("dir")
    if isinstance(name, str):
        w.add_name(name)
    w.add_block_count(int(cfg["n_layer"]))
    w.add_context_length(int(cfg.get("n_ctx_train", 2048)))
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff_exp if n_expert and ga.ff_is_expert else n_ff)
    w.add_head_count(n_head)
    w.add_layer_norm_rms_eps(float(cfg["norm_eps"]))
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_vocab_size(c.info("token_embd.weight").shape[0])
    if ga.mla:
        # MLA as llama.cpp's converter writes it (conversion/deepseek.py): one shared latent "KV head" of
        # kv_lora_rank + rope dims; the per-head sizes go in the *_mla keys.
        kv_lora, rope = int(cfg["kv_lora_rank"]), int(cfg["qk_rope_head_dim"])
        w.add_head_count_kv(1)
        w.add_q_lora_rank(int(cfg.get("q_lora_rank", 0)))
        w.add_kv_lora_rank(kv_lora)
        w.add_key_length(kv_lora + rope)
        w.add_value_length(kv_lora)
        w.add_key_length_mla(int(cfg["qk_nope_head_dim"]) + rope)
        w.add_value_length_mla(int(cfg["v_head_dim"]))
        w.add_rope_dimension_count(rope)
    else:
        w.add_head_count_kv(n_head if ga.kv_as_mha else int(cfg.get("n_head_kv", n_head)))
        w.add_rope_dimension_count(int(cfg.get("rope_dim") or head_dim))
        if head_dim != n_embd // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
    _add_rope_scaling(w, cfg, ga)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(int(cfg["n_expert_used"]))
        if not ga.ff_is_expert:
            w.add_expert_feed_forward_length(n_ff_exp)
        n_group, topk_group = int(cfg.get("n_group", 1)), int(cfg.get("topk_group", 1))
        # build_moe_ffn groups whenever the count is > 1, and load_hparams asserts used < count:
        # keeping every group is no grouping at all, so it is written as none.
        if n_group > 1 and topk_group < n_group:
            w.add_expert_group_count(n_group)
            w.add_expert_group_used_count(topk_group)
        if cfg.get("n_ff_shexp") and ga.shexp_length:
            w.add_expert_shared_feed_forward_length(int(cfg["n_ff_shexp"]))
        if ga.deepseek_moe:
            n_shared = int(cfg.get("n_expert_shared", 0))
            if n_shared and int(cfg.get("n_ff_shexp", 0)) != n_ff_exp * n_shared:
                raise GGUFError(f"{ga.name}: llama.cpp sizes shared experts as n_expert_shared * n_ff_exp")
            w.add_expert_shared_count(n_shared)
            w.add_leading_dense_block_count(int(cfg.get("first_k_dense", 0)))
            w.add_expert_weights_scale(float(cfg.get("routed_scaling_factor", 1.0)))
            w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", True)))
            sigmoid = cfg.get("router", "softmax") == "sigmoid"
            w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if sigmoid else ExpertGatingFuncType.SOFTMAX)
    if ga.granite:
        # Granite's multipliers under llama.cpp's *_scale names (conversion/granite.py); logit_scale is required.
        w.add_embedding_scale(float(cfg.get("embedding_multiplier", 1.0)))
        w.add_residual_scale(float(cfg.get("residual_multiplier", 1.0)))
        if cfg.get("attention_multiplier"):
            w.add_attention_scale(float(cfg["attention_multiplier"]))
        w.add_logit_scale(float(cfg.get("logits_scaling", 1.0)))
    w.add_file_type(_file_type(c))
    if any(t.fmt.quantized for t in c.tensors.values()):
        w.add_quantization_version(2)  # GGML_QNT_VERSION
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict):
        raise GGUFError(f"{c.path}: the container has no tokenizer")
    _add_tokenizer(w, tok, c.info("token_embd.weight").shape[0])
    template = meta.get("chat_template")
    if isinstance(template, str) and template:
        w.add_chat_template(template)


def _add_rope_scaling(w, cfg: dict, ga: GGUFArch) -> None:
    """RoPE scaling keys as llama.cpp's converter writes them (conversion/base.py set_gguf_parameters);
    llama3 scaling travels as the rope_freqs tensor instead (see _llama3_rope_freqs)."""
    from gguf import RopeScalingType

    p = cfg.get("rope_scaling") or {}
    kind = p.get("rope_type", p.get("type"))
    if kind == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(p["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(p["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(p["original_max_position_embeddings"]))
        # transformers' defaults (32, 1) are llama.cpp's; `or` as _compute_yarn_parameters reads them
        w.add_rope_scaling_yarn_beta_fast(float(p.get("beta_fast") or 32))
        w.add_rope_scaling_yarn_beta_slow(float(p.get("beta_slow") or 1))
        if ga.mla:
            # conversion/deepseek.py writes 0.1 * mscale_all_dim (TAG_DEEPSEEK2_YARN_LOG_MUL_FIX); llama.cpp's
            # deepseek2 graph multiplies kq_scale by get_mscale(factor, mscale_all_dim)^2 from it.
            w.add_rope_scaling_yarn_log_mul(0.1 * float(p["mscale_all_dim"]))


def _llama3_rope_freqs(cfg: dict) -> np.ndarray:
    """Per-frequency divisors of Llama 3's RoPE scaling (conversion/llama.py generate_extra_tensors)."""
    p = cfg["rope_scaling"]
    dim = int(cfg.get("head_dim") or int(cfg["n_embd"]) // int(cfg["n_head"]))
    freqs = 1.0 / (float(cfg.get("rope_theta", 10000.0)) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = float(p.get("factor", 8.0))
    lo, hi = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old_ctx = float(p.get("original_max_position_embeddings", 8192))
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    mid = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / hi, 1.0, np.where(wavelen > old_ctx / lo, factor, mid))
    return out.astype(np.float32)


def _file_type(c: Container) -> int:
    quant = c.metadata.get("quant") or {}
    scheme = quant.get("scheme", quant.get("type"))
    if isinstance(scheme, int) and not isinstance(scheme, bool):
        return scheme
    if isinstance(scheme, str) and scheme.lower() in FORMATS:
        return FORMATS[scheme.lower()].file_type
    counts = Counter(t.fmt for t in c.tensors.values() if len(t.shape) > 1)
    return counts.most_common(1)[0][0].file_type if counts else F32.file_type


# --- tokenizer -------------------------------------------------------------------------------


def _add_tokenizer(w, tok: dict, n_vocab: int) -> None:
    if "json" in tok:
        _add_hf_tokenizer(w, tok, n_vocab)
        return
    if "tokens" not in tok or "model" not in tok:
        raise GGUFError("the container's tokenizer has neither GGUF fields nor a tokenizer.json")
    # GGUF-origin (or SentencePiece-origin) fields go back under their tokenizer.ggml.* keys.
    w.add_tokenizer_model(tok["model"])
    if tok.get("pre"):
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(list(tok["tokens"]))
    if tok.get("token_type"):
        w.add_token_types([int(t) for t in tok["token_type"]])
    if tok.get("merges"):
        w.add_token_merges(list(tok["merges"]))
    if tok.get("scores"):
        w.add_token_scores([float(s) for s in tok["scores"]])
    _add_ids(w, tok)


def _add_ids(w, tok: dict) -> None:
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id),
                     ("eot_token_id", w.add_eot_token_id)):
        v = tok.get(key)
        if isinstance(v, list):  # a Hugging Face config may list several end ids; GGUF holds one
            v = v[0] if v else None
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            add(v)
    for key, add in (("add_bos_token", w.add_add_bos_token), ("add_eos_token", w.add_add_eos_token),
                     ("add_space_prefix", w.add_add_space_prefix)):
        if isinstance(tok.get(key), bool):
            add(tok[key])


def _add_hf_tokenizer(w, tok: dict, n_vocab: int) -> None:
    """A byte-level BPE tokenizer.json as llama.cpp's "gpt2" vocabulary (as convert_hf_to_gguf's _set_vocab_gpt2)."""
    try:
        j = jsonio.loads(tok["json"])
    except (TypeError, json.JSONDecodeError) as e:
        raise GGUFError(f"the container's tokenizer.json is unreadable ({e})") from None
    model = j.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(j):
        raise GGUFError(
            f"tokenizer {model.get('type')!r} is not byte-level BPE; only byte-level BPE tokenizer.json exports to GGUF"
        )
    by_id: dict[int, str] = {i: t for t, i in model.get("vocab", {}).items()}
    kinds: dict[int, int] = {}
    for a in j.get("added_tokens") or []:
        by_id[a["id"]] = a["content"]
        kinds[a["id"]] = _CONTROL if a.get("special") else _USER_DEFINED
    if by_id and max(by_id) >= n_vocab:
        raise GGUFError(f"tokenizer has id {max(by_id)} but the embedding holds only {n_vocab} tokens")
    # Ids the tokenizer never produces (embedding rows padded past the vocabulary) become unused tokens.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [kinds.get(i, _NORMAL if i in by_id else _UNUSED) for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_name(j.get("pre_tokenizer")))
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    _add_ids(w, tok)
    if "add_bos_token" not in tok:
        w.add_add_bos_token(False)


def _is_byte_level(j: dict) -> bool:
    def kinds(node) -> list[str]:
        if not isinstance(node, dict):
            return []
        children = node.get("pretokenizers") or node.get("decoders") or []
        return [node.get("type")] + [k for child in children for k in kinds(child)]

    return "ByteLevel" in kinds(j.get("pre_tokenizer")) or "ByteLevel" in kinds(j.get("decoder"))


def _pre_name(pre) -> str:
    """The llama.cpp pre-tokenizer that splits text as this Hugging Face pre_tokenizer does ("default" if none)."""
    if not isinstance(pre, dict):
        return "default"
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    parts = [p for p in parts or [] if isinstance(p, dict)]
    kinds = [p.get("type") for p in parts]
    splits = [((p.get("pattern") or {}).get("Regex")) for p in parts if p.get("type") == "Split"]
    byte_regex = any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts)
    if splits:
        return _PRE_BY_SPLIT.get(splits[0], "default") if len(splits) == 1 else "default"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and byte_regex:
        return "smollm"  # \p{N} then GPT-2's regex (LLAMA_VOCAB_PRE_TYPE_SMOLLM)
    if kinds == ["ByteLevel"] and byte_regex:
        return "gpt-2"
    return "default"


# --- tensors ---------------------------------------------------------------------------------


def _plan_tensors(c: Container, cfg: dict, ga: GGUFArch) -> list[_Tensor]:
    perm = _rope_permutations(cfg, ga)
    for suffix, repeat in _kv_repeats(cfg, ga).items():  # rows of the permuted tensor, repeated per head
        perm[suffix] = perm[suffix][repeat] if suffix in perm else repeat
    out: list[_Tensor] = []
    for t in c.tensors.values():
        name = t.name
        if ga.mla and name.endswith(".attn_kv_b.weight"):
            out.extend(_split_kv_b(c, t, cfg))
            continue
        rows = next((p for suffix, p in perm.items() if name.endswith(suffix)), None)
        if name.endswith(".exp_probs_b.weight"):
            name = name[: -len("weight")] + "bias"  # llama.cpp loads the router bias as exp_probs_b.bias
        out.append(_tensor(c, t.name, name, rows))
    if ga.needs_output and "output.weight" not in c.tensors:
        out.append(_tensor(c, "token_embd.weight", "output.weight", None))  # tied embeddings, stored twice
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3" and "rope_freqs.weight" not in c.tensors:
        freqs = _llama3_rope_freqs(cfg)
        out.append(_Tensor("rope_freqs.weight", F32, freqs.shape, freqs.nbytes, lambda: iter([freqs])))
    return out


def _tensor(c: Container, src: str, name: str, rows: np.ndarray | None) -> _Tensor:
    """One container tensor as GGUF data; `rows` (source row of each output row) reorders or repeats rows."""
    t = c.info(src)
    n_src = t.shape[-2] if len(t.shape) > 1 else t.shape[0]
    if rows is not None and (len(t.shape) == 3 or rows.max() >= n_src or len(rows) % n_src):
        raise GGUFError(f"{src} has shape {t.shape}, which does not fit the model config's head layout")
    n_out = n_src if rows is None else len(rows)
    if len(t.shape) == 1:
        return _Tensor(name, F32, (n_out,), 4 * n_out, lambda: iter([_vec(c, src, rows)]))
    n_in = t.shape[-1]
    n_expert = t.shape[0] if len(t.shape) == 3 else 0
    shape = (*t.shape[:-2], n_out, n_in)
    fmt = t.fmt

    def chunks():
        for e in range(max(1, n_expert)):
            raw = deinterleave(*c.matrix(src, e if n_expert else None), fmt, n_src, n_in)
            yield raw if rows is None else raw[rows]

    return _Tensor(name, fmt, shape, _nbytes(fmt, shape), chunks)


def _vec(c: Container, name: str, rows: np.ndarray | None) -> np.ndarray:
    v = np.ascontiguousarray(c.vector(name), dtype=np.float32)
    return v if rows is None else v[rows]


def _nbytes(fmt: Format, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[:-1])) * fmt.row_nbytes(shape[-1])


def _rope_permutations(cfg: dict, ga: GGUFArch) -> dict[str, np.ndarray]:
    """Row orders that turn the container's Q/K rope rows into the pairing llama.cpp's architecture rotates.

    Hugging Face rows rotate halves (i, i + rope/2), as llama.cpp's NEOX; llama.cpp's NORM architectures
    rotate adjacent pairs, and its converter permutes Q/K rows for them (conversion/llama.py
    LlamaModel.permute). GGUF-origin containers (rope_interleaved true) already hold pairs. A whole-row
    permutation keeps block-format rows intact, so it is lossless.
    """
    pairs_wanted, pairs_held = ga.rope_pairs, bool(cfg.get("rope_interleaved", False))
    if pairs_wanted == pairs_held:
        return {}
    if ga.mla or cfg.get("kv_lora_rank"):
        nope, rope, kv_lora = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"]), int(cfg["kv_lora_rank"])
        q = _pair_rows(int(cfg["n_head"]), nope + rope, nope, rope)  # each head's rows: nope, then rope
        kv_a = _pair_rows(1, kv_lora + rope, kv_lora, rope)  # the latent, then the shared rope key
        perms = {".attn_q.weight": q, ".attn_q_b.weight": q, ".attn_kv_a_mqa.weight": kv_a}
    else:
        n_head, n_head_kv = int(cfg["n_head"]), int(cfg.get("n_head_kv", cfg["n_head"]))
        head_dim = int(cfg.get("head_dim") or int(cfg["n_embd"]) // n_head)
        rope = int(cfg.get("rope_dim") or head_dim)
        q, k = _pair_rows(n_head, head_dim, 0, rope), _pair_rows(n_head_kv, head_dim, 0, rope)
        perms = {".attn_q.weight": q, ".attn_q.bias": q, ".attn_k.weight": k, ".attn_k.bias": k}
        if cfg.get("qk_norm") == "head":
            perms[".attn_q_norm.weight"] = perms[".attn_k_norm.weight"] = _pair_rows(1, head_dim, 0, rope)
        elif cfg.get("qk_norm") == "full":
            perms[".attn_q_norm.weight"], perms[".attn_k_norm.weight"] = q, k
    if pairs_held:  # pairs back to halves for a NEOX architecture: the inverse permutation
        perms = {suffix: np.argsort(rows) for suffix, rows in perms.items()}
    return perms


def _kv_repeats(cfg: dict, ga: GGUFArch) -> dict[str, np.ndarray]:
    """Row orders that repeat each KV head for its group of query heads (see GGUFArch.kv_as_mha)."""
    n_head, n_head_kv = int(cfg["n_head"]), int(cfg.get("n_head_kv", cfg["n_head"]))
    if not ga.kv_as_mha or n_head_kv == n_head:
        return {}
    head_dim = int(cfg.get("head_dim") or int(cfg["n_embd"]) // n_head)
    src_head = np.arange(n_head) // (n_head // n_head_kv)
    rows = (src_head[:, None] * head_dim + np.arange(head_dim)).reshape(-1)
    out = {".attn_k.weight": rows, ".attn_k.bias": rows, ".attn_v.weight": rows, ".attn_v.bias": rows}
    if cfg.get("qk_norm") == "full":
        out[".attn_k_norm.weight"] = rows
    return out


def _pair_rows(n_heads: int, head_size: int, offset: int, rope: int) -> np.ndarray:
    """Source row of each output row: inside each head, rope rows [offset, offset + rope) go from
    (first half, second half) order to interleaved pairs (i, i + rope/2) -> (2i, 2i + 1)."""
    idx = np.arange(n_heads * head_size).reshape(n_heads, head_size)
    seg = idx[:, offset : offset + rope].reshape(n_heads, 2, rope // 2).swapaxes(1, 2).reshape(n_heads, rope)
    idx[:, offset : offset + rope] = seg
    return idx.reshape(-1)


def _split_kv_b(c: Container, t, cfg: dict) -> list[_Tensor]:
    """attn_kv_b (n_head * (nope + v), kv_lora) -> attn_k_b (n_head, kv_lora, nope) and attn_v_b (n_head, v, kv_lora).

    llama.cpp loads MLA only in this split form (conversion/deepseek.py, llama_model_deepseek2::load_arch_tensors).
    attn_v_b is a selection of whole rows (lossless in any format); attn_k_b is transposed, so a block-format
    source is dequantized exactly and stored as F16 when every value fits F16, else F32.
    """
    n_head, nope, v_dim = int(cfg["n_head"]), int(cfg["qk_nope_head_dim"]), int(cfg["v_head_dim"])
    kv_lora = int(cfg["kv_lora_rank"])
    if t.shape != (n_head * (nope + v_dim), kv_lora):
        raise GGUFError(f"{t.name} has shape {t.shape}, expected {(n_head * (nope + v_dim), kv_lora)}")
    fmt = t.fmt

    def raw():  # (n_head, nope + v, row) in the source format
        r = deinterleave(*c.matrix(t.name), fmt, *t.shape)
        return r.reshape(n_head, nope + v_dim, -1)

    if fmt.quantized:
        k = dequantize_blocks(raw()[:, :nope], fmt, kv_lora).transpose(0, 2, 1)
        exact16 = bool(np.array_equal(k.astype(np.float16).astype(np.float32), k))
        k_fmt = F16 if exact16 else F32
    else:
        k_fmt = fmt

    def k_chunks():
        r = raw()[:, :nope]  # (n_head, nope, kv_lora)
        k = k_fmt.codec.encode(dequantize_blocks(r, fmt, kv_lora)) if fmt.quantized else r
        yield np.ascontiguousarray(k.transpose(0, 2, 1))

    base = t.name[: -len("attn_kv_b.weight")]
    k_shape, v_shape = (n_head, kv_lora, nope), (n_head, v_dim, kv_lora)
    return [
        _Tensor(base + "attn_k_b.weight", k_fmt, k_shape, _nbytes(k_fmt, k_shape), k_chunks),
        _Tensor(base + "attn_v_b.weight", fmt, v_shape, _nbytes(fmt, v_shape),
                lambda: iter([np.ascontiguousarray(raw()[:, nope:])])),
    ]


# --- writing ---------------------------------------------------------------------------------


def _write(out: Path, arch: str, add_metadata: Callable, tensors: list[_Tensor]) -> None:
    """Header, metadata and tensor index through gguf.GGUFWriter, then each tensor's data streamed in order."""
    from gguf import GGMLQuantizationType, GGUFWriter

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    w = GGUFWriter(str(tmp), arch)
    try:
        add_metadata(w)
        for t in tensors:
            # described by its byte shape and type, as GGUFWriter.add_tensor takes block formats (for F32/F16 the
            # writer divides the byte shape back to the same element shape)
            byte_shape = (*t.shape[:-1], t.fmt.row_nbytes(t.shape[-1]))
            w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes,
                              raw_dtype=GGMLQuantizationType(t.fmt.gguf_type))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        f = w.fout[0]
        for t in tensors:
            w.write_padding(f, f.tell())  # each tensor starts on the file's alignment (general.alignment)
            n = 0
            for chunk in t.chunks():
                data = np.ascontiguousarray(chunk)
                f.write(memoryview(data).cast("B"))
                n += data.nbytes
            if n != t.nbytes:
                raise GGUFError(f"tensor {t.name}: {n} bytes produced, {t.nbytes} declared")
            w.write_padding(f, n)
        f.flush()
        os.fsync(f.fileno())
        w.close()
        os.replace(tmp, out)
        dfd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        _discard(w, tmp)
        raise GGUFError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        _discard(w, tmp)
        raise


def _discard(w, tmp: Path) -> None:
    """No partial file survives a failed export."""
    w.close()
    tmp.unlink(missing_ok=True)
