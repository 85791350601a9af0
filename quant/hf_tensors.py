"""Hugging Face tensor names -> the container's (llama.cpp's names, quant/schema.py's list): which source tensor,
or which rows of it, fills which container tensor, and at which precision."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .errors import ConvertError
from .formats import F16, F32, FORMATS, GROUP, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, Format
from .hf_config import fp8_blocks
from .safetensors_io import TensorTable
from .schema import ModelConfig, expected_tensors

_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER = {  # suffix after "model.layers.N." -> name after "blk.N." (llama.cpp's, gguf.constants)
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.kv_b_proj.weight": "attn_kv_b.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",  # Mixtral
    "block_sparse_moe.router.layer.weight": "ffn_gate_inp.weight",  # Granite as saved
    "block_sparse_moe.router.weight": "ffn_gate_inp.weight",  # Granite as held in memory
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
# One expert's matrix: Mixtral's w1 (gate), w3 (up), w2 (down); the others' gate_proj, up_proj, down_proj.
_EXPERT_RE = re.compile(r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight")
_EXPERT_PART = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
# All experts in one 3-D tensor: transformers 5's in-memory gate_up_proj (n_expert, 2 * n_ff_exp, n_embd), first
# half gate (MixtralExperts: .chunk(2, dim=-1)), and down_proj (n_expert, n_embd, n_ff_exp); GraniteMoe saves
# them as input_linear / output_linear (conversion_mapping renames them to gate_up_proj / down_proj).
_FUSED = {
    "mlp.experts.gate_up_proj": "gate_up", "block_sparse_moe.experts.gate_up_proj": "gate_up",
    "block_sparse_moe.input_linear.weight": "gate_up",
    "mlp.experts.down_proj": "down", "block_sparse_moe.experts.down_proj": "down",
    "block_sparse_moe.output_linear.weight": "down",
}


@dataclass(frozen=True)
class Piece:
    """Rows [row0, row0 + n_rows) of a source tensor viewed as 2-D (-1, row_len)."""

    src: str
    row0: int
    n_rows: int
    row_len: int
    scale: str | None = None  # block-FP8: the source's <src>_scale_inv, one float per block
    block: tuple[int, int] | None = None  # (rows, cols) of one block of the source


@dataclass(frozen=True)
class Out:
    """One container tensor: its name, shape, format, and where its data comes from (one piece per expert)."""

    name: str
    shape: tuple[int, ...]  # (n,) vector, (n_out, n_in) matrix, (n_expert, n_out, n_in) expert matrices
    fmt: Format
    pieces: tuple[Piece, ...]
    fallback_from: Format | None = None  # the format the policy chose, where this row length made it fall back


def _assignments(name: str, shape: tuple[int, ...], cfg: ModelConfig, ignore_layers: range):
    """Where one source tensor goes: a list of (container name, expert or None, piece); None if unknown;
    [] if deliberately dropped."""
    if not 1 <= len(shape) <= 3:
        return None
    whole = Piece(name, 0, shape[0] if len(shape) == 2 else 1, shape[-1])
    if len(shape) == 3 and not name.endswith(tuple(_FUSED)):
        return None  # only the fused expert tensors are 3-D
    if name in _GLOBAL:
        target = _GLOBAL[name]
        if target == "output.weight" and cfg.tied_embeddings:
            return []  # tied: HF ignores a stored lm_head too
        return [(target, None, whole)]
    m = _LAYER_RE.fullmatch(name)
    if m is None:
        return None
    i, rest = int(m.group(1)), m.group(2)
    if rest.endswith("rotary_emb.inv_freq") or i in ignore_layers:
        return []  # a recomputed buffer; DeepSeek-V3's multi-token-prediction layers (not used for decoding)
    if i >= cfg.n_layer:
        return None
    if rest in _LAYER:
        return [(f"blk.{i}.{_LAYER[rest]}", None, whole)]
    m = _EXPERT_RE.fullmatch(rest)
    if m is not None:
        return [(f"blk.{i}.ffn_{_EXPERT_PART[m.group(2)]}_exps.weight", int(m.group(1)), whole)]
    kind = _FUSED.get(rest)
    if kind is None or len(shape) != 3:
        return None
    n_expert, n_rows, n_in = shape
    if kind == "down":
        return [(f"blk.{i}.ffn_down_exps.weight", e, Piece(name, e * n_rows, n_rows, n_in)) for e in range(n_expert)]
    if n_rows % 2:
        raise ConvertError(f"tensor {name} {list(shape)}: gate_up rows must be an even count (gate, then up)")
    half = n_rows // 2
    return [(f"blk.{i}.ffn_{part}_exps.weight", e, Piece(name, e * n_rows + k * half, half, n_in))
            for e in range(n_expert) for k, part in enumerate(("gate", "up"))]


MIXES = ("uniform", "moe")  # how quantize spreads precision over a model's matrices (tensor_format)
# llama.cpp's file types whose per-tensor rules (llama_tensor_get_type) lmcli follows: type name -> main format
FILE_TYPES = {"q4_k_m": Q4_K, "q5_k_m": Q5_K}
LLAMA_MIX = "llama.cpp"  # the mix a file type records: each matrix's type chosen by llama.cpp's rules
# llama.cpp's per-tensor fallback for a row length that is not whole super-blocks (tensor_type_fallback)
FALLBACK = {Q4_K: Q5_0, Q5_K: Q5_1, Q6_K: Q8_0}


def fitting(fmt: Format, n_in: int) -> Format:
    """fmt if it holds rows of n_in weights; else llama.cpp's fallback type (Q4_K -> Q5_0, Q5_K -> Q5_1,
    Q6_K -> Q8_0) if that holds them; else F16, which holds any."""
    for f in (fmt, FALLBACK.get(fmt)):
        if f is not None and n_in % f.row_multiple == 0:
            return f
    return F16


def resolve_qtype(qtype: str, mix: str = "uniform") -> tuple[Format, str]:
    """A quantization type name (a format, or a llama.cpp file type such as q4_k_m) and a mix -> (main format,
    mix); a file type brings its own mix (LLAMA_MIX) and takes no other."""
    if qtype in FILE_TYPES:
        if mix != "uniform":
            raise ConvertError(f"--mix {mix} does not combine with {qtype}: llama.cpp's file type chooses each "
                               "matrix's type itself")
        return FILE_TYPES[qtype], LLAMA_MIX
    return FORMATS[qtype], mix


def _base_format(name: str, shape: tuple[int, ...], qtype: Format, mix: str) -> Format:
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return F32
    wide = name in ("token_embd.weight", "output.weight") or (mix == "moe" and len(shape) == 2)
    return Q8_0 if wide and qtype.bits < 8 else qtype


def tensor_format(name: str, shape: tuple[int, ...], qtype: Format, mix: str = "uniform") -> Format:
    """The precision policy (as llama.cpp and mlx-lm): vectors and routers F32; embeddings and output at least
    8-bit; everything else qtype; a matrix whose rows the chosen format cannot hold (a length that is not a whole
    number of blocks) falls back per tensor as llama.cpp does (fitting).

    mix "moe": only the routed experts (3-D tensors) take qtype; attention, shared experts and dense FFN layers take
    at least 8 bits. Every token reads all of those but only top-k of the experts, and the experts hold most of an
    MoE's bytes, so the file grows a little and the error every token sees shrinks a lot."""
    return fitting(_base_format(name, shape, qtype, mix), shape[-1])


def _use_more_bits(i: int, n: int) -> bool:
    # llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _attn_v_like(name: str) -> bool:
    # llama.cpp's category_is_attn_v: attn_v, attn_qkv, attn_kv_b (MLA)
    return any(k in name for k in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight"))


def llama_choice(name: str, shape: tuple[int, ...], qtype: Format, cfg: ModelConfig, i_wv: int, n_wv: int) -> Format:
    """llama.cpp's llama_tensor_get_type for file type Q4_K_M (qtype Q4_K) or Q5_K_M (Q5_K), on the tensors lmcli
    stores (i_wv: how many attn_v-like tensors come before this one in file order, n_wv: how many there are):
    output Q6_K (Q8_0 if its rows are not whole super-blocks; the token embedding too when it is the output);
    attn_v (attn_kv_b) and ffn_down (ffn_down_exps, ffn_down_shexp) Q6_K in the layers use_more_bits picks; with
    exactly 8 experts attn_v and attn_k Q8_0 and (Q4_K_M) attn_output Q5_K; qtype elsewhere. The per-tensor
    fallback (fitting) comes after."""
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return F32
    eight = cfg.n_expert == 8
    if name == "output.weight" or (name == "token_embd.weight" and cfg.tied_embeddings):
        fmt = Q8_0 if shape[-1] % qtype.block_size else Q6_K
    elif name == "token_embd.weight":
        fmt = qtype
    elif _attn_v_like(name):
        fmt = Q8_0 if eight else Q6_K if _use_more_bits(i_wv, n_wv) else qtype
    elif "attn_k.weight" in name:
        fmt = Q8_0 if eight else qtype
    elif "ffn_down" in name:  # layer from the name (llama.cpp's layer_info for MoE; its counter for dense models)
        fmt = Q6_K if _use_more_bits(int(name.split(".")[1]), cfg.n_layer) else qtype
    elif "attn_output.weight" in name:
        fmt = Q5_K if eight and qtype is Q4_K else qtype
    else:
        fmt = qtype
    return fmt


def planned_formats(cfg: ModelConfig, qtype: Format, mix: str = "uniform") -> dict[str, tuple[Format, Format]]:
    """Every tensor of the config (quant.schema's list) -> (its format, the format its policy chose before a row
    length made it fall back)."""
    if mix == LLAMA_MIX and qtype not in FILE_TYPES.values():
        raise ConvertError(f"llama.cpp's file-type rules are for {', '.join(FILE_TYPES)}, not {qtype.name}")
    tensors = expected_tensors(cfg)
    n_wv = sum(_attn_v_like(name) for name, _ in tensors)
    out, i_wv = {}, 0
    for name, shape in tensors:
        if mix == LLAMA_MIX:
            want = llama_choice(name, shape, qtype, cfg, i_wv, n_wv)
            i_wv += _attn_v_like(name)
        else:
            want = _base_format(name, shape, qtype, mix)
        out[name] = (fitting(want, shape[-1]), want)
    return out


SCALE_SUFFIX = "_scale_inv"  # block-FP8 checkpoints: <weight name>_scale_inv holds the weight's block scales


def mtp_layers(cfg: ModelConfig, hf_cfg: dict) -> range:
    """DeepSeek-V3's multi-token-prediction layers (num_nextn_predict_layers of them, after the decoder's): lmcli
    decodes one token at a time and does not use them, so they are skipped whole, never half-loaded."""
    mtp = hf_cfg.get("num_nextn_predict_layers") if cfg.arch == "deepseek_v3" else 0
    if mtp is not None and (not isinstance(mtp, int) or isinstance(mtp, bool) or mtp < 0):
        raise ConvertError(f"config.json: num_nextn_predict_layers = {mtp!r} is not an integer >= 0")
    return range(cfg.n_layer, cfg.n_layer + (mtp or 0))


def skipped_tensors(names, cfg: ModelConfig, hf_cfg: dict) -> list[str]:
    """The source tensors of the skipped multi-token-prediction layers (what a conversion reports as skipped)."""
    layers = mtp_layers(cfg, hf_cfg)
    return [n for n in names if (m := _LAYER_RE.fullmatch(n)) is not None and int(m.group(1)) in layers]


def _with_scale(src: TensorTable, p: Piece, scales: dict[str, str], block: tuple[int, int] | None) -> Piece:
    """A piece of a float8 tensor gains its block scales (DeepSeek-V3's weight_dequant: each block of the weight
    times one scale, the blocks at the right and bottom edges partial); any other piece stays as it is."""
    sname, dtype = scales.get(p.src), src.dtype(p.src)
    if dtype != "F8_E4M3":
        if sname is not None:
            raise ConvertError(f"tensor {p.src} has block scales ({sname}) but is {dtype}, not float8")
        return p
    shape = src.shape(p.src)
    if sname is None:
        raise ConvertError(f"tensor {p.src} is float8 without its {p.src}{SCALE_SUFFIX} block scales")
    if block is None:
        raise ConvertError(f"tensor {p.src} is float8, but config.json has no quantization_config "
                           "(quant_method fp8, weight_block_size)")
    if len(shape) != 2:
        raise ConvertError(f"tensor {p.src} {list(shape)}: float8 is supported for matrices only")
    want = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    if src.shape(sname) != want or src.dtype(sname) == "F8_E4M3":
        raise ConvertError(f"tensor {sname} is {src.dtype(sname)} {list(src.shape(sname))}; {p.src} "
                           f"{list(shape)} in blocks of {list(block)} needs {list(want)} scales")
    return replace(p, scale=sname, block=block)


def plan_tensors(src: TensorTable, cfg: ModelConfig, qtype: Format, hf_cfg: dict, mix: str = "uniform") -> list[Out]:
    """Match every source tensor to a container tensor and check every name and shape (nanoGPT's habit):
    an unknown or unexpected source tensor, a missing one, or a shape mismatch is an error. A float8 tensor's
    <name>_scale_inv goes with it into its pieces. mix: see tensor_format."""
    if mix not in MIXES and mix != LLAMA_MIX:
        raise ConvertError(f"unknown precision mix {mix!r} (choose from {', '.join(MIXES)})")
    if mix == "moe" and not cfg.is_moe:
        raise ConvertError(f"the moe mix is for Mixture-of-Experts models; this {cfg.arch} model is dense "
                           "(use the uniform mix)")
    ignore = mtp_layers(cfg, hf_cfg)
    block = fp8_blocks(hf_cfg)
    names = src.names()
    scales = {n[: -len(SCALE_SUFFIX)]: n for n in names if n.endswith(SCALE_SUFFIX)}
    held = set(names)
    for base, sname in scales.items():
        if base not in held:
            raise ConvertError(f"tensor {sname} holds the scales of {base}, which the checkpoint does not hold")
    want = dict(expected_tensors(cfg))
    formats = planned_formats(cfg, qtype, mix)
    given: dict[str, dict] = {}
    for name in names:
        if name.endswith(SCALE_SUFFIX):
            continue  # consumed with its weight (below), or dropped with it
        shape = src.shape(name)
        found = _assignments(name, shape, cfg, ignore)
        if found is None:
            raise ConvertError(f"tensor {name} {list(shape)} is not part of a {cfg.arch} model lmcli knows")
        for target, expert, piece in found:
            piece = _with_scale(src, piece, scales, block)
            if target not in want:
                raise ConvertError(f"tensor {name} (-> {target}) does not belong in this model's config")
            slot = given.setdefault(target, {})
            if expert in slot:
                raise ConvertError(f"{target}{'' if expert is None else f' expert {expert}'} is given twice "
                                   f"({slot[expert].src} and {name})")
            slot[expert] = piece
    plan = []
    for target, shape in want.items():
        slot = given.get(target)
        if not slot:
            raise ConvertError(f"no source tensor for {target}")
        if len(shape) == 3:
            if sorted(slot, key=lambda e: -1 if e is None else e) != list(range(shape[0])):
                have = sorted(e for e in slot if e is not None)
                raise ConvertError(f"{target}: experts {have[:8]}{'...' if len(have) > 8 else ''} given, "
                                   f"{shape[0]} expected")
            pieces = tuple(slot[e] for e in range(shape[0]))
            n_out, n_in = shape[1:]
        else:
            pieces = (slot[None],)
            n_out, n_in = (1, shape[0]) if len(shape) == 1 else shape
        for p in pieces:
            if (p.n_rows, p.row_len) != (n_out, n_in) or (len(shape) == 2 and src.shape(p.src) != shape):
                raise ConvertError(f"tensor {p.src} has shape {list(src.shape(p.src))}; {target} needs "
                                   f"{list(shape)}")
        fmt, chosen = formats[target]
        if len(shape) == 3 and fmt is F16 and qtype is not F16:  # experts are quantized or all f16
            raise ConvertError(f"{target}: row length {shape[-1]} is not a multiple of {GROUP} (experts of "
                               f"{qtype.name} need whole blocks; convert with --type f16)")
        plan.append(Out(target, shape, fmt, pieces, chosen if chosen is not fmt else None))
    return plan
