"""A validated, memory-mapped safetensors reader for a model directory (one file or an indexed set of shards).

File layout (the safetensors rules, checked here before any tensor is read):
  0  u64 little-endian N = header length (capped at MAX_HEADER, and 8 + N <= file size)
  8  N bytes of UTF-8 JSON, starting with "{": {name: {"dtype", "shape", "data_offsets": [begin, end]},
     optional "__metadata__": {str: str}}
  8 + N  the data buffer: offsets are relative to it; the tensors tile it exactly, in offset order,
     without gaps or overlaps, and the last one ends at the end of the file.
Nothing is unpickled and no torch is needed: tensors are read through mmap and widened to float32.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import jsonio
from .errors import ConvertError

MAX_HEADER = 100 << 20  # the safetensors library's own cap
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_FAULT_AROUND = 1 << 20  # generous: fault_around_bytes is 64 KiB unless tuned

# dtype name -> (bytes per element, numpy dtype of the stored bits). BF16 is kept as uint16 bits:
# widening to float32 is an exact 16-bit shift (bf16 is the top half of an IEEE float32). numpy has no float8:
# F8_E4M3 (torch.float8_e4m3fn, block-FP8 weights) and F8_E8M0 (float8_e8m0fnu, power-of-two scales) are read
# as bytes and decoded through a 256-entry table.
DTYPES = {"F32": (4, np.dtype("<f4")), "F16": (2, np.dtype("<f2")), "BF16": (2, np.dtype("<u2")),
          "F8_E4M3": (1, np.dtype("u1")), "F8_E8M0": (1, np.dtype("u1"))}


def _e4m3_table() -> np.ndarray:
    """float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; subnormals at exponent 0; no infinities,
    S.1111.111 is NaN (the "fn" variant: 448 is the largest finite value)."""
    b = np.arange(256)
    e, m = (b >> 3) & 15, (b & 7).astype(np.float64)
    mag = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))
    mag[(e == 15) & (b & 7 == 7)] = np.nan
    return np.where(b >> 7, -mag, mag).astype(np.float32)


def _e8m0_table() -> np.ndarray:
    """float8_e8m0fnu: an unsigned exponent only, 2^(b - 127); 0xFF is NaN."""
    t = np.ldexp(1.0, np.arange(256) - 127)
    t[255] = np.nan
    return t.astype(np.float32)


FLOAT8 = {"F8_E4M3": _e4m3_table(), "F8_E8M0": _e8m0_table()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of one shard, validated against the file."""

    name: str
    dtype: str  # a key of DTYPES
    shape: tuple[int, ...]
    shard: str  # file name inside the model directory
    start: int  # absolute offset of the first byte in the shard file
    nbytes: int

    @property
    def row_len(self) -> int:
        """Elements per row of the tensor viewed as 2-D (-1, shape[-1]); 1 for a scalar."""
        return self.shape[-1] if self.shape else 1

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[:-1]) if self.shape else 1


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"key {k!r} appears twice")
        d[k] = v
    return d


def header_length(prefix: bytes, name: str, size: int) -> int:
    """The header length N from a file's first 8 bytes, checked against the file size."""
    if len(prefix) < 8:
        raise ConvertError(f"{name}: truncated safetensors file ({size} bytes)")
    (hlen,) = struct.unpack("<Q", prefix[:8])
    if hlen > MAX_HEADER:
        raise ConvertError(f"{name}: header length {hlen} exceeds the {MAX_HEADER}-byte limit; "
                           "not a safetensors file")
    if 8 + hlen > size:
        raise ConvertError(f"{name}: truncated: the header claims {hlen} bytes, the file has {size}")
    return hlen


def read_header(path: Path) -> tuple[list[TensorEntry], dict]:
    """Parse and validate one safetensors file's header -> (entries in offset order, __metadata__)."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            hlen = header_length(f.read(8), name, size)
            raw = f.read(hlen)
    except OSError as e:
        raise ConvertError(f"cannot read {name}: {e.strerror}") from None
    return parse_header(raw, name, size)


def parse_header(raw: bytes, name: str, size: int) -> tuple[list[TensorEntry], dict]:
    """Validate a header's JSON bytes against the size of the file it heads (which may be remote: read with a
    Range request before the file is downloaded) -> (entries in offset order, __metadata__)."""
    if not raw.startswith(b"{"):
        raise ConvertError(f"{name}: header is not a JSON object")
    try:
        header = jsonio.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise ConvertError(f"{name}: corrupt header ({e})") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{name}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ConvertError(f"{name}: __metadata__ must map strings to strings")
    data_start = 8 + len(raw)
    buffer_len = size - data_start
    spans = []
    for tname, info in header.items():
        if not isinstance(info, dict):
            raise ConvertError(f"{name}: tensor {tname} has a malformed entry")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPES:
            raise ConvertError(f"{name}: tensor {tname} has dtype {dtype!r}, which lmcli cannot convert "
                               f"(supported: {', '.join(DTYPES)})")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < (1 << 40) for d in shape)):
            raise ConvertError(f"{name}: tensor {tname} has a bad shape {shape!r}")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise ConvertError(f"{name}: tensor {tname} has bad data_offsets {offs!r}")
        nbytes = math.prod(shape) * DTYPES[dtype][0]
        if offs[1] - offs[0] != nbytes:
            raise ConvertError(f"{name}: tensor {tname} spans {offs[1] - offs[0]} bytes, its shape {shape} "
                               f"of {dtype} needs {nbytes}")
        spans.append((offs[0], offs[1], tname, dtype, tuple(shape)))
    spans.sort()
    # The safetensors rules: tensors tile the data buffer exactly, in offset order.
    pos, prev = 0, None
    for begin, end, tname, _, _ in spans:
        if begin < pos:
            raise ConvertError(f"{name}: tensors {prev} and {tname} overlap")
        if begin > pos:
            raise ConvertError(f"{name}: {begin - pos} unused bytes before tensor {tname}")
        pos, prev = end, tname
    if pos > buffer_len:
        raise ConvertError(f"{name}: truncated: tensor {prev} ends at data byte {pos}, the file holds {buffer_len}")
    if pos < buffer_len:
        raise ConvertError(f"{name}: {buffer_len - pos} bytes after the last tensor; the file is corrupt")
    entries = [TensorEntry(t, dt, sh, name, data_start + b, e - b) for b, e, t, dt, sh in spans]
    return entries, meta


def _shard_path(directory: Path, fname, where: str) -> Path:
    """A shard named by the index or found in the directory: a plain file inside it, never outside."""
    if (not isinstance(fname, str) or not fname or fname in (".", "..") or "/" in fname or "\\" in fname
            or "\x00" in fname or os.path.isabs(fname)):
        raise ConvertError(f"{where} names {fname!r}, which is not a plain file name inside {directory.name}")
    path = directory / fname
    if path.is_symlink():
        real, root = os.path.realpath(path), os.path.realpath(directory)
        if os.path.commonpath([real, root]) != root:
            raise ConvertError(f"{fname} is a symlink that points outside {directory.name}")
    if not path.is_file():
        raise ConvertError(f"{where} names {fname}, which is not a file in {directory.name}")
    return path


def read_index(directory: Path) -> dict[str, str] | None:
    """The shard index's weight_map (tensor name -> shard file name), every file name checked; None if absent."""
    index = directory / INDEX_FILE
    if not index.is_file():
        return None
    try:
        weight_map = jsonio.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        raise ConvertError(f"{INDEX_FILE} is not valid JSON with a weight_map") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConvertError(f"{INDEX_FILE} has no weight_map")
    for fname in set(weight_map.values()):
        _shard_path(directory, fname, INDEX_FILE)
    return weight_map


def shard_files(directory: Path, weight_map: dict[str, str] | None) -> list[Path]:
    """The safetensors files that hold the model: those the index names, else every *.safetensors."""
    if weight_map is not None:
        return [_shard_path(directory, f, INDEX_FILE) for f in sorted(set(weight_map.values()))]
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    if not found:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ConvertError(f"{directory.name} has only PyTorch pickle weights ({', '.join(pickles[:3])}); "
                               "lmcli reads safetensors only and never unpickles")
        raise ConvertError(f"{directory.name} has no *.safetensors weights")
    return [_shard_path(directory, f, directory.name) for f in found]


def collect_entries(shards: list[list[TensorEntry]], weight_map: dict[str, str] | None) -> dict[str, TensorEntry]:
    """Every tensor of a set of shards by name: none given twice, and where an index exists, each in the shard the
    index names and every indexed tensor present."""
    out: dict[str, TensorEntry] = {}
    for entries in shards:
        for e in entries:
            if e.name in out:
                raise ConvertError(f"tensor {e.name} appears in both {out[e.name].shard} and {e.shard}")
            if weight_map is not None and weight_map.get(e.name, e.shard) != e.shard:
                raise ConvertError(f"{INDEX_FILE} puts {e.name} in {weight_map[e.name]}, but it is in {e.shard}")
            out[e.name] = e
    if weight_map is not None:
        missing = [n for n in weight_map if n not in out]
        if missing:
            raise ConvertError(f"{INDEX_FILE} lists {missing[0]} in {weight_map[missing[0]]}, which does not hold it")
    return out


class TensorTable:
    """Names, shapes, dtypes and places of a model's tensors, from validated headers; no data.

    A conversion is planned on this alone, so it can be planned from headers read over the network before any
    shard is downloaded.
    """

    def __init__(self, entries: dict[str, TensorEntry]):
        self._entries = entries

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[TensorEntry]:
        return list(self._entries.values())

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise ConvertError(f"no tensor named {name}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entry(name).shape

    def dtype(self, name: str) -> str:
        return self.entry(name).dtype

    def nbytes(self, name: str) -> int:
        return self.entry(name).nbytes


class TensorSource(TensorTable):
    """The tensors of a model directory: names, shapes and dtypes from validated headers; data by mmap.

    Reading copies a tensor (or a range of its rows) out as float32, then tells the kernel to drop the
    pages it touched from this process, so reading a whole model keeps the resident set at one tensor.
    files: read only these shard files of the directory (one shard of a model being pulled), without the index.
    """

    def __init__(self, directory: str | os.PathLike, files: list[str] | None = None):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ConvertError(f"{self.dir} is not a directory")
        super().__init__({})
        self._maps: dict[str, mmap.mmap] = {}
        index_map = read_index(self.dir) if files is None else None
        paths = (shard_files(self.dir, index_map) if files is None
                 else [_shard_path(self.dir, f, "the shard list") for f in files])
        try:
            headers = []
            for path in paths:
                entries, _ = read_header(path)
                headers.append(entries)
                if any(e.nbytes for e in entries):
                    with open(path, "rb") as f:
                        self._maps[path.name] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._entries = collect_entries(headers, index_map)
        except BaseException:
            self.close()
            raise

    # --- data --------------------------------------------------------------------------------

    def read_f32(self, name: str) -> np.ndarray:
        """A float32 copy of one whole tensor."""
        e = self.entry(name)
        return self.read_rows(name, 0, e.n_rows).reshape(e.shape)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor viewed as 2-D (-1, shape[-1]), as a float32 copy."""
        e = self.entry(name)
        if not 0 <= start <= stop <= e.n_rows:
            raise ConvertError(f"rows [{start}, {stop}) out of range for {name} ({e.n_rows} rows)")
        size, np_dtype = DTYPES[e.dtype]
        count = (stop - start) * e.row_len
        if count == 0:
            return np.zeros((stop - start, e.row_len), np.float32)
        mm = self._maps[e.shard]
        off = e.start + start * e.row_len * size
        raw = np.frombuffer(mm, dtype=np_dtype, count=count, offset=off)
        if e.dtype == "BF16":
            bits = raw.astype(np.uint32)
            bits <<= np.uint32(16)
            out = bits.view(np.float32)
        elif e.dtype in FLOAT8:
            out = FLOAT8[e.dtype][raw]
        else:
            out = raw.astype(np.float32)  # a copy in every case (F32 -> F32 copies too)
        del raw
        self._release(mm, off, count * size)
        return out.reshape(stop - start, e.row_len)

    @staticmethod
    def _release(mm: mmap.mmap, off: int, length: int) -> None:
        # Dropping the mapping's pages keeps RSS bounded; the data stays in the page cache for re-reads.
        # The window is widened because the kernel's fault-around also maps cached pages next to the ones
        # read (up to 64 KiB by default), which would otherwise stay resident, a few per tensor.
        if hasattr(mmap, "MADV_DONTNEED"):
            lo = max(0, off - _FAULT_AROUND) // mmap.PAGESIZE * mmap.PAGESIZE
            hi = min(len(mm), off + length + _FAULT_AROUND)
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:
                pass  # a view is still alive; the mapping closes when it is collected
        self._maps = {}

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_model_dir(directory: str | os.PathLike) -> TensorSource:
    """Open every safetensors shard of a model directory, validating all headers before any data is read."""
    return TensorSource(directory)
