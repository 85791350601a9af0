"""GGUF import: a lossless repack of GGUF tensors (same codes and scales) into an lmcli container."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np

from .container import ContainerWriter
from .errors import GGUFError, QuantError
from .formats import BY_GGUF_TYPE, F32, FORMATS
from .gguf_archs import BY_NAME
from .gguf_header import Header, check_header, read_header
from .quantize import gguf_rows_finite, interleave
from .schema import ModelConfig, SchemaError, expected_tensors

_TOKENIZER_KEYS = {
    "tokenizer.ggml.model": "model",
    "tokenizer.ggml.pre": "pre",
    "tokenizer.ggml.tokens": "tokens",
    "tokenizer.ggml.token_type": "token_type",
    "tokenizer.ggml.merges": "merges",
    "tokenizer.ggml.scores": "scores",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
    "tokenizer.ggml.eot_token_id": "eot_token_id",
    "tokenizer.ggml.add_bos_token": "add_bos_token",
    "tokenizer.ggml.add_eos_token": "add_eos_token",
    "tokenizer.ggml.add_space_prefix": "add_space_prefix",
}


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        v = f.contents()
    except Exception as e:  # gguf raises assorted errors on malformed fields
        raise GGUFError(f"GGUF field {key} is malformed ({e})") from None
    if isinstance(v, (np.generic,)):
        v = v.item()
    return v


def open_gguf(path: Path, *, checked: bool = False):
    """The gguf package's reader on path, once its header has been walked with bounds (checked: already done)."""
    from gguf import GGUFReader

    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    if not checked:
        check_header(path)  # every count and length bounded by the file before the reader walks them
    try:
        return GGUFReader(str(path), "r")
    except QuantError:
        raise
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors on bad input
        raise GGUFError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


SUPPORTED_ARCHS = tuple(BY_NAME)
_SPLIT_NAME = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")  # llama.cpp's llama_split_path


def check_arch(arch, where) -> None:
    if arch not in BY_NAME:
        raise GGUFError(f"{where}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")


def type_census(types: Iterable[int]) -> dict[str, int]:
    """gguf.GGMLQuantizationType values -> how many tensors have each type, by its llama.cpp name, most first."""
    from gguf import GGMLQuantizationType as QT

    census: dict[str, int] = {}
    for t in types:
        name = QT(t).name if t in QT._value2member_map_ else f"type {t}"
        census[name] = census.get(name, 0) + 1
    return dict(sorted(census.items(), key=lambda kv: -kv[1]))


def census_text(census: dict[str, int]) -> str:
    return ", ".join(f"{k} x{n}" for k, n in census.items())


def check_types(types: Iterable[int], where) -> None:
    """Refuse tensor types lmcli cannot import: one census naming every such type with its count."""
    census = type_census(t for t in types if t not in BY_GGUF_TYPE)
    if census:
        raise GGUFError(f"{where}: tensor types lmcli cannot import yet: {census_text(census)} "
                        f"(supported: {', '.join(f.name.upper() for f in FORMATS.values())})")


def split_names(name: str, count: int) -> list[str]:
    """The file names of a split GGUF (llama.cpp's gguf-split: PREFIX-00001-of-0000N.gguf) from its first's."""
    m = _SPLIT_NAME.match(name)
    if m is None or int(m[2]) != 1 or int(m[3]) != count:
        raise GGUFError(f"{name}: split.count says {count} parts, but its name is not PREFIX-00001-of-{count:05d}.gguf")
    return [f"{m[1]}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def check_headers(heads: list[Header], names: list[str], where) -> None:
    """What an import decides from the headers alone, before any weight is read (or downloaded): a split's parts
    agree with each other (split.no, split.count, split.tensors.count), the architecture and every tensor type are
    ones lmcli imports. names: the parts' file names, as split_names gives them."""
    first = heads[0].values
    count = first.get("split.count", 1)
    if count != len(heads):
        raise GGUFError(f"{where}: split.count says {count} parts, {len(heads)} given")
    if count > 1:
        for i, (h, name) in enumerate(zip(heads, names)):
            if h.values.get("split.no") != i or h.values.get("split.count") != count:
                raise GGUFError(f"{name} is not part {i + 1} of {count} of {names[0]} (its split.no is "
                                f"{h.values.get('split.no')!r}, split.count {h.values.get('split.count')!r})")
        total = sum(len(h.tensors) for h in heads)
        if first.get("split.tensors.count") != total:
            raise GGUFError(f"{where}: the parts hold {total} tensors, split.tensors.count says "
                            f"{first.get('split.tensors.count')!r}")
        seen: set[str] = set()
        for h, name in zip(heads, names):
            for t in h.tensors:
                if t.name in seen:
                    raise GGUFError(f"{name}: tensor {t.name} is in two parts of the split GGUF")
                seen.add(t.name)
    check_arch(first.get("general.architecture"), where)
    check_types((t.ggml_type for h in heads for t in h.tensors), where)
    for h, name in zip(heads, names):
        _check_ends(h, name)


def _check_ends(h: Header, name: str) -> None:
    """Every tensor's data inside the file: a truncated file (or part) is named before its tensors are read."""
    from gguf import GGML_QUANT_SIZES

    for t in h.tensors:
        block, nbytes = GGML_QUANT_SIZES[t.ggml_type]
        n = int(np.prod(t.dims, dtype=object))
        if n % block:
            raise GGUFError(f"{name}: tensor {t.name} of {n} weights is not whole blocks of {block}")
        end = h.data_offset + t.offset + n // block * nbytes
        if end > h.size:
            raise GGUFError(f"{name}: tensor {t.name} ends at byte {end}, past the end of the file ({h.size} bytes): "
                            "the file is truncated or damaged")


def split_parts(path: Path) -> tuple[list[Path], list[Header]]:
    """A GGUF file's parts (itself, or every part of a split GGUF given its first) with their checked headers."""
    heads = [read_header(path)]
    count, no = heads[0].values.get("split.count", 1), heads[0].values.get("split.no", 0)
    if not isinstance(count, int) or not 1 <= count <= 99999:
        raise GGUFError(f"{path}: split.count {count!r} is not a part count")
    if no != 0:
        m = _SPLIT_NAME.match(path.name)
        first = f"{m[1]}-00001-of-{m[3]}.gguf" if m else "its first part"
        raise GGUFError(f"{path} is part {no + 1 if isinstance(no, int) else repr(no)} of a split GGUF: "
                        f"give its first part, {first}")
    paths = [path] if count == 1 else [path.with_name(n) for n in split_names(path.name, count)]
    for i, p in enumerate(paths[1:], 2):
        if not p.is_file():
            raise GGUFError(f"{p}: no such file (part {i} of the {count}-part GGUF {path.name})")
        heads.append(read_header(p))
    check_headers(heads, [p.name for p in paths], path)
    return paths, heads


def read_config(reader, path: Path) -> dict:
    """Model config from GGUF metadata (llama.cpp's keys) -> lmcli's ModelConfig keys."""
    arch = _field(reader, "general.architecture")
    check_arch(arch, path)
    ga = BY_NAME[arch]

    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    def req(key):
        v = get(key)
        if v is None:
            raise GGUFError(f"{path}: missing metadata {arch}.{key}")
        return v

    n_embd = int(req("embedding_length"))
    n_head = int(req("attention.head_count"))
    n_head_kv = get("attention.head_count_kv", n_head)
    if isinstance(n_head_kv, list):  # per-layer arrays (some exporters): all equal here
        n_head_kv = n_head_kv[0]
    n_head_kv = int(n_head_kv)
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv or n_embd <= 0:
        raise GGUFError(f"{path}: inconsistent head counts ({n_head} heads, {n_head_kv} KV heads)")
    head_dim = int(get("attention.key_length", n_embd // n_head))
    n_ff = get("feed_forward_length", 0)
    if isinstance(n_ff, list):
        n_ff = max(n_ff)
    cfg = {
        "arch": ga.model_type,
        "n_layer": int(req("block_count")),
        "n_embd": n_embd,
        "n_ff": int(n_ff) or 1,
        "n_head": n_head,
        "n_head_kv": n_head_kv,
        "head_dim": head_dim,
        "n_ctx_train": int(get("context_length", 2048)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_dim": int(get("rope.dimension_count", head_dim)),
        # llama.cpp's converter permutes Q/K rows for LLAMA_ROPE_TYPE_NORM: rotate adjacent pairs.
        "rope_interleaved": ga.rope_pairs,
        "norm_eps": float(req("attention.layer_norm_rms_epsilon")),
    }
    n_expert = int(get("expert_count", 0))
    if n_expert:
        used = int(req("expert_used_count"))
        gating = int(get("expert_gating_func", 0))  # llama.cpp: 1 softmax, 2 sigmoid (0: arch default)
        cfg.update({
            "n_expert": n_expert,
            "n_expert_used": used,
            "n_ff_exp": int(get("expert_feed_forward_length", cfg["n_ff"])),
            "n_expert_shared": int(get("expert_shared_count", 0)),
            "first_k_dense": int(get("leading_dense_block_count", 0)),
            "router": "sigmoid" if gating == 2 or (gating == 0 and ga.sigmoid_default) else "softmax",
            "norm_topk_prob": bool(get("expert_weights_norm", ga.norm_topk)),
            "routed_scaling_factor": float(get("expert_weights_scale", 1.0) or 1.0),
            "n_group": int(get("expert_group_count", 1) or 1),
            "topk_group": int(get("expert_group_used_count", 1) or 1),
        })
        shexp = get("expert_shared_feed_forward_length")
        if shexp is not None:
            cfg["n_ff_shexp"] = int(shexp)
            cfg["n_expert_shared"] = cfg["n_expert_shared"] or 1
        elif cfg["n_expert_shared"]:
            cfg["n_ff_shexp"] = cfg["n_ff_exp"] * cfg["n_expert_shared"]
    if ga.granite:
        cfg.update({
            "embedding_multiplier": float(get("embedding_scale", 1.0)),
            "residual_multiplier": float(get("residual_scale", 1.0)),
            "attention_multiplier": float(get("attention.scale", 0.0)),
            "logits_scaling": float(get("logit_scale", 1.0)),
        })
    if ga.mla:
        rope = int(req("rope.dimension_count"))
        cfg.update({
            "q_lora_rank": int(get("attention.q_lora_rank", 0)),
            "kv_lora_rank": int(req("attention.kv_lora_rank")),
            "qk_rope_head_dim": rope,
            "qk_nope_head_dim": head_dim - rope,
            "v_head_dim": int(get("attention.value_length", head_dim - rope)),
            "rope_dim": rope,
        })
    cfg["rope_scaling"] = _rope_scaling(get, ga.mla, path)
    return cfg


def _rope_scaling(get, mla: bool, path: Path) -> dict | None:
    """RoPE scaling from llama.cpp's rope.scaling.* keys as transformers' parameters (the inverse of
    gguf_export._add_rope_scaling); a YaRN llama.cpp computes unlike any transformers config is refused."""
    kind, factor = get("rope.scaling.type"), get("rope.scaling.factor")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor if factor is not None else 1.0)}
    if kind != "yarn":
        return {"rope_type": kind}  # the schema refuses it by name
    old = get("rope.scaling.original_context_length")
    if not factor or not old:
        raise GGUFError(f"{path}: YaRN RoPE scaling without its factor and original_context_length")
    p = {"rope_type": "yarn", "factor": float(factor), "original_max_position_embeddings": int(old)}
    for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if get(f"rope.scaling.{key}") is not None:
            p[name] = float(get(f"rope.scaling.{key}"))
    for key in ("yarn_ext_factor", "yarn_attn_factor", "attn_factor"):
        if get(f"rope.scaling.{key}", 1.0) != 1.0:
            raise GGUFError(f"{path}: YaRN with rope.scaling.{key} = {get(f'rope.scaling.{key}')} is not supported")
    log_mul = float(get("rope.scaling.yarn_log_multiplier", 0.0))
    if mla:
        # deepseek2: 0.1 * mscale_all_dim (conversion/deepseek.py); llama.cpp takes mscale = mscale_all_dim, so
        # cos and sin stay unscaled and the softmax takes get_mscale(factor, mscale_all_dim)^2
        if not log_mul:
            raise GGUFError(f"{path}: deepseek2 YaRN without rope.scaling.yarn_log_multiplier is not supported")
        m = float(np.float32(log_mul) / np.float32(0.1))
        p.update(mscale=m, mscale_all_dim=m)
    elif log_mul:
        raise GGUFError(f"{path}: YaRN with rope.scaling.yarn_log_multiplier outside deepseek2 is not supported")
    return p


def _finish_config(cfg: dict, names: set[str], shapes: dict, path: Path) -> None:
    """Facts GGUF keeps in the tensor list rather than the metadata: biases, QK-norm kind, shared gate."""
    cfg["attn_bias"] = "blk.0.attn_q.bias" in names
    qn = shapes.get("blk.0.attn_q_norm.weight")
    if qn is not None:
        cfg["qk_norm"] = "head" if qn == (cfg["head_dim"],) else "full"
    if cfg.get("n_expert"):
        first = cfg.get("first_k_dense", 0)
        cfg["shared_expert_gate"] = f"blk.{first}.ffn_gate_inp_shexp.weight" in names
        cfg["router_bias"] = f"blk.{first}.exp_probs_b.bias" in names
        if f"blk.{first}.ffn_gate_exps.weight" not in names and f"blk.{first}.ffn_gate.0.weight" in names:
            raise GGUFError(f"{path}: per-expert 2-D expert tensors (old Mixtral GGUF layout) are not supported; "
                            "re-convert with a current llama.cpp")
    if cfg.get("kv_lora_rank") and "blk.0.attn_kv_b.weight" not in names and "blk.0.attn_k_b.weight" not in names:
        raise GGUFError(f"{path}: MLA model without attn_kv_b or attn_k_b/attn_v_b tensors")


def _merge_kv_b(plan: list, cfg: dict, path: Path) -> list:
    """Recent llama.cpp GGUFs split DeepSeek's kv_b into attn_k_b (n_head, rank, nope), stored transposed, and
    attn_v_b (n_head, v, rank) (convert_hf_to_gguf.py DeepseekV2Model). lmcli's MLA reads the original
    kv_b (n_head * (nope + v), rank): rebuilt from the dequantized values and stored F32, so it is exact."""
    from gguf import quants as gq

    by = {p[0]: p for p in plan}
    out = [p for p in plan if not p[0].endswith(("attn_k_b.weight", "attn_v_b.weight"))]
    H, nope, v, rank = cfg["n_head"], cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    for i in range(cfg["n_layer"]):
        kb, vb = by.get(f"blk.{i}.attn_k_b.weight"), by.get(f"blk.{i}.attn_v_b.weight")
        if kb is None and vb is None:
            continue
        if kb is None or vb is None or kb[2] != (H, rank, nope) or vb[2] != (H, v, rank):
            raise GGUFError(f"{path}: layer {i} attn_k_b/attn_v_b have unexpected shapes")
        k = gq.dequantize(np.asarray(kb[3].data), kb[3].tensor_type).reshape(H, rank, nope).transpose(0, 2, 1)
        vv = gq.dequantize(np.asarray(vb[3].data), vb[3].tensor_type).reshape(H, v, rank)
        kv = np.ascontiguousarray(np.concatenate([k, vv], axis=1).reshape(H * (nope + v), rank), dtype=np.float32)
        out.append((f"blk.{i}.attn_kv_b.weight", F32, kv.shape, kv, F32))
    return out


def read_tokenizer(reader) -> dict:
    tok = {}
    for key, name in _TOKENIZER_KEYS.items():
        v = _field(reader, key)
        if v is None:
            continue
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, list):
            v = [x.item() if isinstance(x, np.generic) else x for x in v]
        tok[name] = v
    if "tokens" not in tok or "model" not in tok:
        raise GGUFError("GGUF has no tokenizer vocabulary")
    return tok


def _tensor_plan(reader, path: Path, size: int):
    """Validate every tensor (type, shape, byte range) before anything is written; yield (name, fmt, shape, t)."""
    plan = []  # every tensor type is one lmcli imports: split_parts has checked the headers
    for t in reader.tensors:
        fmt = BY_GGUF_TYPE[int(t.tensor_type)]
        dims = [int(d) for d in t.shape]  # GGUF order: ne0 (row length) first
        while len(dims) > 1 and dims[-1] == 1:
            dims.pop()
        if not 1 <= len(dims) <= 3 or any(d <= 0 for d in dims):
            raise GGUFError(f"{path}: tensor {t.name} has unsupported shape {dims}")
        end = int(t.data_offset) + int(t.n_bytes)
        if int(t.data_offset) < 0 or end > size:
            raise GGUFError(f"{path}: tensor {t.name} data [{t.data_offset}, {end}) lies outside the file ({size} bytes)")
        if len(dims) == 1:
            shape = (dims[0],)
            if fmt.quantized:
                raise GGUFError(f"{path}: vector tensor {t.name} is quantized ({fmt.name}); not supported")
            plan.append((t.name, F32, shape, t, fmt))
        else:
            n_in, n_out = dims[0], dims[1]
            n_expert = dims[2] if len(dims) == 3 else 1
            if n_in % fmt.row_multiple:
                raise GGUFError(f"{path}: tensor {t.name} row length {n_in} is not a multiple of {fmt.row_multiple}")
            row = fmt.row_nbytes(n_in)
            if int(t.n_bytes) != n_expert * n_out * row:
                raise GGUFError(f"{path}: tensor {t.name} holds {t.n_bytes} bytes, its shape needs {n_expert * n_out * row}")
            shape = (n_expert, n_out, n_in) if len(dims) == 3 else (n_out, n_in)
            plan.append((t.name, fmt, shape, t, fmt))
    _check_extents(reader, path)
    return plan


def _check_extents(reader, path: Path) -> None:
    """Tensor data as llama.cpp requires it: each extent aligned and none overlapping another."""
    align = int(getattr(reader, "alignment", 32))
    base = int(reader.data_offset)
    prev = None
    for t in sorted(reader.tensors, key=lambda t: int(t.data_offset)):
        start, end = int(t.data_offset), int(t.data_offset) + int(t.n_bytes)
        if (start - base) % align:
            raise GGUFError(f"{path}: tensor {t.name} data at offset {start - base} is not {align}-byte aligned")
        if prev is not None and start < prev[1]:
            raise GGUFError(f"{path}: tensor {t.name} data [{start}, {end}) overlaps tensor {prev[0]} "
                            f"[{prev[2]}, {prev[1]})")
        prev = (t.name, end, start)


def _check_schema(cfg: dict, shapes: dict[str, tuple], path: Path) -> ModelConfig:
    """The config checked against the schema, and the file's tensors against the schema's list for it."""
    try:
        mc = ModelConfig.from_dict(cfg)
    except SchemaError as e:
        raise GGUFError(f"{path}: {e}") from None
    want = dict(expected_tensors(mc))
    for name, shape in want.items():
        if name not in shapes:
            raise GGUFError(f"{path}: missing tensor {name}")
        if shapes[name] != shape:
            raise GGUFError(f"{path}: tensor {name} has shape {list(shapes[name])}, the config needs {list(shape)}")
    extra = sorted(set(shapes) - set(want))
    if extra:
        raise GGUFError(f"{path}: tensors a {mc.arch} model does not have: {', '.join(extra[:4])}")
    return mc


def import_gguf(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                source: dict | None = None) -> Path:
    """Repack a GGUF file (or a split GGUF, given its first part) into a container at dst (written atomically).
    Returns dst."""
    path = Path(src)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    parts, _ = split_parts(path)  # architecture and tensor types refused from the headers, before any reading
    readers = [open_gguf(p, checked=True) for p in parts]
    reader = readers[0]  # a split GGUF keeps its metadata in the first part, its tensors in all
    cfg = read_config(reader, path)
    tok = read_tokenizer(reader)
    plan = [x for r, p in zip(readers, parts) for x in _tensor_plan(r, p, p.stat().st_size)]
    names = {p[0] for p in plan}
    _finish_config(cfg, names, {p[0]: p[2] for p in plan}, path)
    if cfg.get("kv_lora_rank") and "blk.0.attn_k_b.weight" in names:
        plan = _merge_kv_b(plan, cfg, path)
    for need in ("token_embd.weight", "output_norm.weight", "blk.0.attn_norm.weight"):
        if need not in names:
            raise GGUFError(f"{path}: missing tensor {need}")
    cfg["vocab_size"] = len(tok["tokens"])
    cfg["tied_embeddings"] = "output.weight" not in names
    cfg = _check_schema(cfg, {p[0]: p[2] for p in plan}, path)
    formats = {}
    for name, fmt, shape, _t, _src in plan:
        formats[fmt.name] = formats.get(fmt.name, 0) + 1
    metadata = {
        "config": cfg.as_dict(),
        "tokenizer": tok,
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "quant": {"scheme": _field(reader, "general.file_type"), "formats": formats, "source_format": "gguf"},
        "source": dict(source or {}, file=path.name, name=_field(reader, "general.name")),
    }
    experts: dict[str, list] = {}  # "blk.N." -> its 3-D expert tensors, planned as one bundle per expert
    with ContainerWriter(dst, overwrite=overwrite) as w:
        for name, fmt, shape, _t, _src in plan:
            if len(shape) == 3:
                experts.setdefault(name.split("ffn_")[0], []).append((name, fmt, shape))
            else:
                w.plan(name, fmt, shape)
        for prefix, group in experts.items():
            order = {"gate": 0, "up": 1, "down": 2}
            group.sort(key=lambda g: order.get(g[0].split("ffn_")[1].split("_")[0], 3))
            if len({g[2][0] for g in group}) != 1:
                raise GGUFError(f"{path}: {prefix} expert tensors disagree on the expert count")
            w.plan_experts([(n, f, s[1:]) for n, f, s in group], n_expert=group[0][2][0])
        w.begin(metadata)
        for name, fmt, shape, t, srcfmt in plan:
            data = t if isinstance(t, np.ndarray) else np.asarray(t.data)
            if len(shape) == 1:
                vec = data.reshape(-1).astype(np.float32)  # F16 vectors widen exactly
                if not np.all(np.isfinite(vec)):
                    raise GGUFError(f"{path}: tensor {name} has non-finite values")
                w.write(name, vec)
                continue
            n_expert = shape[0] if len(shape) == 3 else 1
            n_out, n_in = shape[-2:]
            raw = data.reshape(n_expert, n_out, -1)
            for e in range(n_expert):
                if fmt.gguf_rows and not gguf_rows_finite(raw[e], fmt):
                    raise GGUFError(f"{path}: tensor {name} has non-finite scales or values")
                codes, scales = interleave(raw[e], fmt, n_out, n_in)
                if scales.size and not np.all(np.isfinite(scales.view(np.float16))):
                    raise GGUFError(f"{path}: tensor {name} has non-finite scales")
                if len(shape) == 3:
                    w.write(name, codes, scales, expert=e)
                else:
                    w.write(name, codes, scales)
        return w.finish()
