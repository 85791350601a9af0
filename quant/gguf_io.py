"""GGUF import: a lossless repack of GGUF tensors (same codes and scales) into an lmcli container."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .container import ContainerWriter
from .errors import GGUFError, QuantError
from .formats import BY_GGUF_TYPE, F32, GROUP, Format
from .quantize import BLOCK_BYTES, interleave

SUPPORTED_ARCHS = ("llama",)
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


def _open(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    try:
        return GGUFReader(str(path), "r")
    except QuantError:
        raise
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors on bad input
        raise GGUFError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None


def read_config(reader, path: Path) -> dict:
    """Model config from GGUF metadata, under lmcli's (llama.cpp's) names."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")

    def req(key):
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise GGUFError(f"{path}: missing metadata {arch}.{key}")
        return v

    n_embd = int(req("embedding_length"))
    n_head = int(req("attention.head_count"))
    n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv or n_embd <= 0:
        raise GGUFError(f"{path}: inconsistent head counts ({n_head} heads, {n_head_kv} KV heads)")
    head_dim = int(_field(reader, f"{arch}.attention.key_length", n_embd // n_head))
    cfg = {
        "arch": arch,
        "n_layer": int(req("block_count")),
        "n_embd": n_embd,
        "n_ff": int(req("feed_forward_length")),
        "n_head": n_head,
        "n_head_kv": n_head_kv,
        "head_dim": head_dim,
        "n_ctx_train": int(_field(reader, f"{arch}.context_length", 2048)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rope_dim": int(_field(reader, f"{arch}.rope.dimension_count", head_dim)),
        # llama.cpp's converter permutes Q/K rows for LLAMA_ROPE_TYPE_NORM: rotate adjacent pairs.
        "rope_interleaved": True,
        "norm_eps": float(req("attention.layer_norm_rms_epsilon")),
    }
    return cfg


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
    plan = []
    for t in reader.tensors:
        ttype = int(t.tensor_type)
        fmt = BY_GGUF_TYPE.get(ttype)
        if fmt is None:
            raise GGUFError(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}, which lmcli cannot import "
                "(supported: F32, F16, Q4_0, Q4_1, Q8_0)"
            )
        dims = [int(d) for d in t.shape]  # GGUF order: ne0 (row length) first
        if not 1 <= len(dims) <= 2 or any(d <= 0 for d in dims):
            raise GGUFError(f"{path}: tensor {t.name} has unsupported shape {dims}")
        end = int(t.data_offset) + int(t.n_bytes)
        if int(t.data_offset) < 0 or end > size:
            raise GGUFError(f"{path}: tensor {t.name} data [{t.data_offset}, {end}) lies outside the file ({size} bytes)")
        if len(dims) == 1 or dims[1] == 1:
            shape = (dims[0],)
            if fmt.quantized:
                raise GGUFError(f"{path}: vector tensor {t.name} is quantized ({fmt.name}); not supported")
            plan.append((t.name, F32, shape, t, fmt))
        else:
            n_in, n_out = dims
            if n_in % GROUP:
                raise GGUFError(f"{path}: tensor {t.name} row length {n_in} is not a multiple of {GROUP}")
            expect = n_out * (n_in // GROUP * BLOCK_BYTES[fmt.name] if fmt.quantized else n_in * (4 if fmt is F32 else 2))
            if int(t.n_bytes) != expect:
                raise GGUFError(f"{path}: tensor {t.name} holds {t.n_bytes} bytes, its shape needs {expect}")
            plan.append((t.name, fmt, (n_out, n_in), t, fmt))
    return plan


def import_gguf(src: str | os.PathLike, dst: str | os.PathLike, *, overwrite: bool = False,
                source: dict | None = None) -> Path:
    """Repack a GGUF file into a container at dst (written atomically). Returns dst."""
    path = Path(src)
    reader = _open(path)
    size = path.stat().st_size
    cfg = read_config(reader, path)
    tok = read_tokenizer(reader)
    plan = _tensor_plan(reader, path, size)
    names = {p[0] for p in plan}
    need = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{n}.weight" for i in range(cfg["n_layer"])
        for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
    ]
    missing = [n for n in need if n not in names]
    if missing:
        raise GGUFError(f"{path}: missing tensors: {', '.join(missing[:4])}")
    cfg["vocab_size"] = len(tok["tokens"])
    cfg["tied_embeddings"] = "output.weight" not in names
    formats = {}
    for name, fmt, shape, _t, _src in plan:
        formats[fmt.name] = formats.get(fmt.name, 0) + 1
    metadata = {
        "config": cfg,
        "tokenizer": tok,
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "quant": {"scheme": _field(reader, "general.file_type"), "formats": formats, "source_format": "gguf"},
        "source": dict(source or {}, file=path.name, name=_field(reader, "general.name")),
    }
    with ContainerWriter(dst, overwrite=overwrite) as w:
        for name, fmt, shape, _t, _src in plan:
            w.plan(name, fmt, shape)
        w.begin(metadata)
        for name, fmt, shape, t, srcfmt in plan:
            data = np.asarray(t.data)
            if len(shape) == 1:
                vec = data.reshape(-1).astype(np.float32)  # F16 vectors widen exactly
                if not np.all(np.isfinite(vec)):
                    raise GGUFError(f"{path}: tensor {name} has non-finite values")
                w.write(name, vec)
            else:
                n_out, n_in = shape
                raw = data.reshape(n_out, -1)
                codes, scales = interleave(raw, fmt, n_out, n_in)
                if scales.size and not np.all(np.isfinite(scales.view(np.float16))):
                    raise GGUFError(f"{path}: tensor {name} has non-finite scales")
                w.write(name, codes, scales)
        return w.finish()
