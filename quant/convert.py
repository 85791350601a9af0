"""Hugging Face model directory (safetensors, config, tokenizer) -> lmcli container, streaming one tensor at a time;
and shard by shard, while a model downloads (lmcli pull). The config is read by hf_config, the tensor plan made by
hf_tensors, the tokenizer read by hf_tokenizer; this module moves the bytes."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .container import Container, ContainerWriter
from .errors import ContainerError, ConvertError
from .formats import F32, TILE, Format
from .hf_config import read_config
from .hf_tensors import FILE_TYPES, LLAMA_MIX, Out, Piece, plan_tensors, resolve_qtype, skipped_tensors
from .hf_tokenizer import read_json, read_chat_template, read_tokenizer
from .imatrix import for_matrix, weighted
from .quantize import dequantize_interleaved, quantize_matrix
from .safetensors_io import DTYPES, TensorEntry, TensorSource, TensorTable, collect_entries, open_model_dir
from .schema import ModelConfig

QTYPES = ("q4_0", "q4_1", "q8_0", "f16", "q4_k", "q5_k", "q6_k", *FILE_TYPES)
CHUNK_BYTES = 8 << 20  # float32 rows quantized at a time: bounds the temporaries of one large matrix


def _read_rows(src: TensorSource, p: Piece, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a piece as float32; a block-FP8 piece's rows times their blocks' scale_inv, one block
    column at a time (so the temporaries stay those rows), the last block of a row or column partial."""
    r0, r1 = p.row0 + start, p.row0 + stop
    w = src.read_rows(p.src, r0, r1)  # (n, row_len)
    if p.scale is None or r1 == r0:
        return w
    br, bc = p.block
    s = src.read_rows(p.scale, r0 // br, (r1 - 1) // br + 1)  # (row blocks, column blocks)
    per_row = s[np.arange(r0, r1) // br - r0 // br]  # (n, column blocks)
    for j in range(per_row.shape[1]):
        w[:, j * bc : (j + 1) * bc] *= per_row[:, j : j + 1]
    return w


def _convert_rows(src: TensorSource, p: Piece, fmt: Format, measure: bool = True,
                  importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """One matrix (a piece of a source tensor) -> interleaved (codes, scales) and its summed squared error
    (0.0 unless measure).

    Rows are quantized in chunks of whole tiles, so the result equals quantizing the matrix at once while the
    float32 temporaries stay bounded.
    """
    step = max(TILE, CHUNK_BYTES // (4 * p.row_len) // TILE * TILE)
    codes, scales, sq = [], [], 0.0
    for r in range(0, p.n_rows, step):
        n = min(step, p.n_rows - r)
        w = _read_rows(src, p, r, r + n)  # (n, n_in)
        if not np.isfinite(w).all():
            raise ConvertError(f"tensor {p.src} has non-finite values")
        try:
            c, s = quantize_matrix(w, fmt, importance)
        except ConvertError as e:
            raise ConvertError(f"tensor {p.src}: {e}") from None
        if measure and fmt is not F32:
            sq += float(np.sum(np.square(dequantize_interleaved(c, s, fmt, n, p.row_len) - w, dtype=np.float64)))
        codes.append(c)
        scales.append(s)
    return np.concatenate(codes), np.concatenate(scales), sq


def _piece_bytes(src: TensorSource, p: Piece) -> int:
    return p.n_rows * p.row_len * DTYPES[src.dtype(p.src)][0]


def convert_hf(src_dir: str | os.PathLike, out_path: str | os.PathLike, qtype: str = "q4_0", *,
               overwrite: bool = False, progress: Callable[[int, int, int, int], None] | None = None,
               mix: str = "uniform", imatrix: dict | None = None) -> dict:
    """Convert a local Hugging Face model directory into an lmcli container at out_path (written atomically).
    qtype: a format (q4_0, q4_1, q8_0, f16, q4_k, q5_k, q6_k) or a llama.cpp file type (q4_k_m, q5_k_m: each
    matrix's type chosen by llama.cpp's rules, hf_tensors.llama_choice).
    mix: how precision is spread over the matrices (hf_tensors.tensor_format: "uniform" or "moe").
    imatrix: importances per matrix (quant.imatrix.load): rounding weighted by them as llama.cpp's, for every
    4-, 5- and 6-bit type.

    progress(done_tensors, total_tensors, done_bytes, total_bytes) counts container tensors and source bytes;
    it is called after each tensor and, inside an expert layer, after each expert.
    Returns {"tensors", "input_bytes", "output_bytes", "seconds", "rms_error": {name: float}}.
    """
    t0 = time.perf_counter()
    directory, out = Path(src_dir), Path(out_path)
    if qtype not in QTYPES:
        raise ConvertError(f"unknown quantization type {qtype!r} (choose from {', '.join(QTYPES)})")
    fmt, mix = resolve_qtype(qtype, mix)
    if not directory.is_dir():
        raise ConvertError(f"{directory} is not a directory")
    if out.suffix == ".gguf":
        raise ConvertError(f"{out.name}: an lmcli container is never named .gguf (llama.cpp cannot read it)")
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} exists (refusing to overwrite)")
    if not out.parent.is_dir():
        raise ConvertError(f"{out.parent} is not a directory")
    hf_cfg = read_json(directory / "config.json", required=True)
    cfg = read_config(hf_cfg)
    metadata = _metadata(directory, hf_cfg, cfg, {"format": "hf", "dir": directory.resolve().name})
    with open_model_dir(directory) as src:
        plan = plan_tensors(src, cfg, fmt, hf_cfg, mix)
        skipped = skipped_tensors(src.names(), cfg, hf_cfg)
        metadata["quant"] = _quant_info(plan, qtype, fmt, mix)
        if imatrix is not None:
            used = sorted(o.name for o in plan if o.name in imatrix and weighted(o.fmt))
            if not any(o.name in imatrix for o in plan):
                raise ConvertError("the importance matrix names none of this model's matrices (was it computed on "
                                   "another model?)")
            metadata["quant"]["imatrix"] = used
        total_bytes = sum(_piece_bytes(src, p) for o in plan for p in o.pieces)
        try:
            rms = _write(src, plan, out, overwrite, metadata, progress, total_bytes, imatrix)
        except ContainerError as e:
            raise ConvertError(str(e)) from None
        except OSError as e:
            raise ConvertError(f"cannot write {out}: {e.strerror or e}") from None
    return {"tensors": len(plan), "input_bytes": total_bytes, "output_bytes": out.stat().st_size,
            "seconds": time.perf_counter() - t0, "rms_error": rms, "fallback": metadata["quant"]["fallback"],
            "fallback_from": metadata["quant"]["fallback_from"],
            "skipped": _skipped_note(skipped), "imatrix": len(metadata["quant"].get("imatrix", []))}


def skipped_line(skipped: dict) -> str:
    """One line saying what a conversion left out on purpose (for the CLI and pull)."""
    layers = ", ".join(map(str, skipped["mtp_layers"]))
    return (f"skipped the multi-token-prediction layer {layers} ({skipped['tensors']} tensors): lmcli decodes "
            "one token at a time without it")


def _skipped_note(names: list[str]) -> dict:
    """What a conversion left out on purpose: the multi-token-prediction layers (layer indices, tensor count)."""
    layers = sorted({int(n.split(".")[2]) for n in names})
    return {"mtp_layers": layers, "tensors": len(names)} if names else {}


def _metadata(directory: Path, hf_cfg: dict, cfg: ModelConfig, source: dict) -> dict:
    """The container's metadata but for "quant" (known once the tensors are planned)."""
    return {
        "config": cfg.as_dict(),
        "tokenizer": read_tokenizer(directory, hf_cfg, cfg.vocab_size),
        "chat_template": read_chat_template(directory),
        "quant": None,
        "source": {**source, "model_type": cfg.arch},
    }


def _quant_info(plan: list[Out], qtype: str, fmt: Format, mix: str = "uniform") -> dict:
    """The container's "quant" metadata: the type and mix asked for, the format of each kind of tensor, how many
    tensors each format holds, and the matrices that fell back to another format for their row length."""
    formats: dict[str, int] = {}
    for o in plan:
        formats[o.fmt.name] = formats.get(o.fmt.name, 0) + 1
    by = {o.name: o for o in plan}
    embd = by["token_embd.weight"]
    other = next((o for o in plan if o.name.startswith("blk.") and len(o.shape) == 2 and o.fmt is not F32), None)
    experts = next((o for o in plan if len(o.shape) == 3), None)
    chosen = lambda o: (o.fallback_from or o.fmt).name  # noqa: E731
    return {
        "type": qtype,
        "mix": mix,
        "policy": {"vectors": "f32", "ffn_gate_inp": "f32", "token_embd": chosen(embd),
                   "output": chosen(by.get("output.weight", embd)),
                   "experts": chosen(experts) if experts is not None else fmt.name,
                   "other": chosen(other) if other is not None else fmt.name,
                   **({"rules": "llama.cpp llama_tensor_get_type"} if mix == LLAMA_MIX else {})},
        "formats": formats,
        # matrices whose rows are not whole blocks of the format chosen for them (hf_tensors.fitting)
        "fallback": {o.name: o.fmt.name for o in plan if o.fallback_from is not None},
        "fallback_from": {o.name: o.fallback_from.name for o in plan if o.fallback_from is not None},
        "source_format": "hf",
    }


def _plan_writer(w: ContainerWriter, plan: list[Out]) -> None:
    k = 0
    while k < len(plan):  # the three expert tensors of a layer are consecutive: one bundle per expert
        o = plan[k]
        if len(o.shape) == 3:
            group = plan[k:k + 3]
            w.plan_experts([(g.name, g.fmt, g.shape[1:]) for g in group], o.shape[0])
            k += 3
        else:
            w.plan(o.name, o.fmt, o.shape)
            k += 1


def _write(src, plan: list[Out], out: Path, overwrite: bool, metadata: dict, progress, total_bytes: int,
           imatrix: dict | None = None) -> dict:
    rms: dict[str, float] = {}
    done_t = done_b = 0
    with ContainerWriter(out, overwrite=overwrite) as w:
        _plan_writer(w, plan)
        w.begin(metadata)
        k = 0
        while k < len(plan):
            o = plan[k]
            if len(o.shape) == 1:
                p = o.pieces[0]
                vec = src.read_rows(p.src, 0, 1).reshape(-1)
                if not np.isfinite(vec).all():
                    raise ConvertError(f"tensor {p.src} has non-finite values")
                w.write(o.name, vec)
                rms[o.name] = 0.0
                group = [o]
            elif len(o.shape) == 2:
                imp = for_matrix(imatrix, o.name, o.shape[1])
                codes, scales, sq = _convert_rows(src, o.pieces[0], o.fmt, importance=imp)
                w.write(o.name, codes, scales)
                rms[o.name] = float(np.sqrt(sq / (o.shape[0] * o.shape[1])))
                group = [o]
            else:
                group = plan[k:k + 3]
                sq = {g.name: 0.0 for g in group}
                for e in range(o.shape[0]):  # expert by expert: one bundle's reads, then its write
                    for g in group:
                        imp = for_matrix(imatrix, g.name, g.shape[2], e, g.shape[0])
                        codes, scales, s = _convert_rows(src, g.pieces[e], g.fmt, importance=imp)
                        w.write(g.name, codes, scales, expert=e)
                        sq[g.name] += s
                        done_b += _piece_bytes(src, g.pieces[e])
                    if progress is not None and e + 1 < o.shape[0]:
                        progress(done_t, len(plan), done_b, total_bytes)
                for g in group:
                    rms[g.name] = float(np.sqrt(sq[g.name] / np.prod(g.shape)))
            if len(o.shape) < 3:
                done_b += _piece_bytes(src, o.pieces[0])
            k += len(group)
            done_t += len(group)
            if progress is not None:
                progress(done_t, len(plan), done_b, total_bytes)
        w.finish()
    return rms


# --- shard by shard: converting while a model downloads (lmcli pull) -----------------------------


@dataclass(frozen=True)
class ShardJob:
    """A conversion planned before any shard is read, from the small files (config, tokenizer) and every shard's
    header: the container's metadata and tensors, and which tensors (or experts of one) each shard fills.

    A container tensor may draw on several shards (the experts of one layer spread over two files); each of its
    experts is written when the shard that holds it arrives.
    """

    qtype: str
    metadata: dict
    plan: tuple[Out, ...]
    table: TensorTable  # every source tensor, as the headers describe it
    units: dict[str, tuple[tuple[int, int | None], ...]]  # shard file -> (plan index, expert or None), in order
    skipped: dict  # what is left out on purpose (convert_hf's "skipped"), and "shards": those holding nothing else


def check_config(src_dir: str | os.PathLike) -> ModelConfig:
    """A directory's config.json read and checked as a conversion reads it (architecture, RoPE scaling,
    quantization), so that a model lmcli cannot convert is refused before any shard is read."""
    return read_config(read_json(Path(src_dir) / "config.json", required=True))


def plan_shards(src_dir: str | os.PathLike, headers: dict[str, list[TensorEntry]], weight_map: dict[str, str] | None,
                qtype: str, source: dict, mix: str = "uniform") -> ShardJob:
    """Plan a conversion from a directory holding config.json and the tokenizer files, and the validated headers
    of every shard (safetensors_io.parse_header); `source` goes into the container's metadata."""
    if qtype not in QTYPES:
        raise ConvertError(f"unknown quantization type {qtype!r} (choose from {', '.join(QTYPES)})")
    directory = Path(src_dir)
    hf_cfg = read_json(directory / "config.json", required=True)
    cfg = read_config(hf_cfg)
    metadata = _metadata(directory, hf_cfg, cfg, {"format": "hf", **source})
    table = TensorTable(collect_entries([headers[s] for s in sorted(headers)], weight_map))
    fmt, mix = resolve_qtype(qtype, mix)
    plan = plan_tensors(table, cfg, fmt, hf_cfg, mix)
    metadata["quant"] = _quant_info(plan, qtype, fmt, mix)
    units: dict[str, list] = {s: [] for s in headers}
    for i, o in enumerate(plan):
        for e, p in enumerate(o.pieces):
            shard = table.entry(p.src).shard
            if p.scale is not None and table.entry(p.scale).shard != shard:
                raise ConvertError(f"{p.scale} is in {table.entry(p.scale).shard}, its weight {p.src} in {shard}: "
                                   "converting while downloading needs them in one shard (download, then quantize)")
            units[shard].append((i, e if len(o.shape) == 3 else None))
    skipped = set(skipped_tensors(table.names(), cfg, hf_cfg))
    note = _skipped_note(sorted(skipped))
    if note:  # the shards that hold skipped tensors only
        kept = {e.shard for e in table.entries() if e.name not in skipped}
        note["shards"] = sorted({table.entry(n).shard for n in skipped} - kept)
    return ShardJob(qtype, metadata, tuple(plan), table, {s: tuple(u) for s, u in units.items()}, note)


def start_container(job: ShardJob, path: str | os.PathLike) -> Path:
    """Create (atomically, replacing any) the container file of a job: its header, every tensor's place, no data."""
    try:
        with ContainerWriter(path, overwrite=True) as w:
            _plan_writer(w, list(job.plan))
            w.begin(job.metadata)
            return w.presize()
    except ContainerError as e:
        raise ConvertError(str(e)) from None


def resumable(job: ShardJob, path: str | os.PathLike) -> bool:
    """Whether a file started by start_container holds this job's layout (so its written tensors can be kept)."""
    try:
        c = Container(path)
    except ContainerError:
        return False
    try:
        want = [(o.name, o.fmt.name, tuple(o.shape)) for o in job.plan]
        have = [(t.name, t.fmt.name, t.shape) for t in c.tensors.values()]
        return sorted(have) == sorted(want) and c.metadata == json.loads(json.dumps(job.metadata))
    finally:
        c.close()


def convert_shard(job: ShardJob, path: str | os.PathLike, shard_dir: str | os.PathLike, shard: str, *,
                  progress: Callable[[int, int], None] | None = None) -> None:
    """Convert every tensor (or expert) that one downloaded shard holds into the job's container at path, in place,
    and fsync it. The shard's header must be the one the job was planned from.

    progress(done, total) counts this shard's pieces. OSError (a full disk) is raised as is.
    """
    if shard not in job.units:
        raise ConvertError(f"{shard} is not a shard of this model")
    with TensorSource(shard_dir, files=[shard]) as src:
        planned = sorted((e for e in job.table.entries() if e.shard == shard), key=lambda e: e.start)
        found = sorted((src.entry(n) for n in src.names()), key=lambda e: e.start)
        if found != planned:
            raise ConvertError(f"{shard}: its header differs from the one the conversion was planned from")
        try:
            c = Container(path)
        except ContainerError as e:
            raise ConvertError(str(e)) from None
        places = {name: (t.offset, t.stride, t.nbytes) for name, t in c.tensors.items()}
        c.close()
        units = job.units[shard]
        fd = os.open(path, os.O_WRONLY)
        try:
            for k, (i, expert) in enumerate(units):
                o = job.plan[i]
                p = o.pieces[expert or 0]
                if len(o.shape) == 1:
                    vec = src.read_rows(p.src, 0, 1).reshape(-1)
                    if not np.isfinite(vec).all():
                        raise ConvertError(f"tensor {p.src} has non-finite values")
                    data = vec.tobytes()
                else:
                    codes, scales, _ = _convert_rows(src, p, o.fmt, measure=False)
                    data = codes.tobytes() + scales.tobytes()
                offset, stride, nbytes = places[o.name]
                if len(data) != nbytes:
                    raise ConvertError(f"tensor {o.name}: {len(data)} bytes converted, {nbytes} planned")
                _pwrite_all(fd, data, offset + (expert or 0) * stride)
                if progress is not None:
                    progress(k + 1, len(units))
            os.fsync(fd)
        finally:
            os.close(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
