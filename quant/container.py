"""The lmcli container: a versioned, self-describing file of weights in the kernels' interleaved layout.

File layout (all integers little-endian):
  0   magic  b"LMCLIWT\\x00"  (never "GGUF": llama.cpp cannot mistake it for one of its files)
  8   u32    format version
  12  u32    reserved (0)
  16  u64    header length H
  24  H bytes of UTF-8 JSON: {"metadata": {...}, "tensors": [{name, format, shape, offset, nbytes,
             [stride]}], "file_size": total bytes (a truncated or extended file is rejected)}
  then zero padding to ALIGN; tensor data at absolute, ALIGN-aligned offsets.
A matrix's bytes are its codes then its scales (see formats.matrix_parts). An expert tensor of shape
(n_expert, n_out, n_in) stores expert e at offset + e * stride; the gate, up and down tensors of a layer
share one stride, so each expert's three matrices form one contiguous, aligned bundle.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import jsonio
from .errors import ContainerError
from .formats import ALIGN, F32, FORMATS, GROUP, TILE, Format, align_up, matrix_parts

MAGIC = b"LMCLIWT\x00"
VERSION = 2  # 2: codes in the word layout of quantize._tile_words (1: GGUF's code bytes, one per row and column)
_PREFIX = struct.Struct("<8sIIQ")
MAX_HEADER = 256 << 20
MAX_DIM = 1 << 31
SUFFIX = ".lmc"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's index entry, validated against the file."""

    name: str
    fmt: Format
    shape: tuple[int, ...]  # (n,) vector, (n_out, n_in) matrix, (n_expert, n_out, n_in) expert matrices
    offset: int
    nbytes: int  # bytes of one matrix (one expert's for expert tensors)
    stride: int = 0  # bytes between experts (expert tensors only)

    @property
    def n_expert(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 0


def expected_nbytes(fmt: Format, shape: tuple[int, ...]) -> int:
    """Bytes of one matrix (or vector) of this shape and format; raises ContainerError if not storable."""
    if len(shape) == 1:
        if fmt is not F32:
            raise ContainerError(f"vector tensors are stored as f32, not {fmt.name}")
        return 4 * shape[0]
    n_out, n_in = shape[-2], shape[-1]
    if n_in % fmt.row_multiple:
        raise ContainerError(f"matrix row length {n_in} is not a multiple of {fmt.row_multiple} ({fmt.name})")
    codes, scales = matrix_parts(fmt, n_out, n_in)
    return codes + scales


def _check_shape(shape) -> tuple[int, ...]:
    if not isinstance(shape, list) or not 1 <= len(shape) <= 3:
        raise ContainerError(f"bad tensor shape {shape!r}")
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 < d < MAX_DIM:
            raise ContainerError(f"bad tensor dimension {d!r}")
    return tuple(shape)


class Container:
    """A container opened read-only: metadata plus validated, memory-mapped tensor views."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise ContainerError(f"cannot open {self.path}: {e.strerror}") from None
        with f:
            st = os.fstat(f.fileno())
            size = st.st_size
            self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
                raise ContainerError(f"{self.path} is not an lmcli container")
            _, version, _, hlen = _PREFIX.unpack(prefix)
            if version != VERSION:
                how = ("convert it again: `lmcli rm` and `lmcli pull` it, or `lmcli import`/`lmcli quantize` its source"
                       if version < VERSION else "upgrade lmcli")
                raise ContainerError(f"{self.path} has container version {version}, this lmcli reads {VERSION}: {how}")
            if hlen > MAX_HEADER or _PREFIX.size + hlen > size:
                raise ContainerError(f"{self.path} is truncated or declares a header of {hlen} bytes")
            raw = f.read(hlen)
            # names this header's bytes (metadata, tensor index): what is derived from them can be cached under it
            self.header_digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
            try:
                header = jsonio.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ContainerError(f"{self.path} has a corrupt header") from None
            self.file_size = size
            self.data_start = align_up(_PREFIX.size + hlen)
            if not isinstance(header, dict) or not isinstance(header.get("metadata"), dict):
                raise ContainerError(f"{self.path} has no metadata")
            declared = header.get("file_size")
            if declared != size:
                raise ContainerError(f"{self.path} is truncated or corrupt: {size} bytes, the header declares {declared}")
            self.metadata: dict = header["metadata"]
            self.tensors: dict[str, TensorInfo] = {}
            for entry in header.get("tensors", []):
                info = self._validate(entry)
                if info.name in self.tensors:
                    raise ContainerError(f"{self.path} lists tensor {info.name} twice")
                self.tensors[info.name] = info
            self._check_overlaps()
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self._buf = np.frombuffer(self._mm, dtype=np.uint8) if self._mm is not None else np.zeros(0, np.uint8)

    def _validate(self, e) -> TensorInfo:
        if not isinstance(e, dict):
            raise ContainerError(f"{self.path}: bad tensor entry")
        name, fname = e.get("name"), e.get("format")
        if not isinstance(name, str) or fname not in FORMATS:
            raise ContainerError(f"{self.path}: tensor {name!r} has unknown format {fname!r}")
        fmt = FORMATS[fname]
        shape = _check_shape(e.get("shape"))
        offset, nbytes, stride = e.get("offset"), e.get("nbytes"), e.get("stride", 0)
        for v in (offset, nbytes, stride):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ContainerError(f"{self.path}: tensor {name} has a bad offset or size")
        want = expected_nbytes(fmt, shape)
        if nbytes != want:
            raise ContainerError(f"{self.path}: tensor {name} declares {nbytes} bytes, its shape needs {want}")
        n_expert = shape[0] if len(shape) == 3 else 1
        # Standalone tensors start on a page; an expert bundle's members on a cache line inside the bundle.
        if offset % (ALIGN if len(shape) < 3 else 64) or offset < self.data_start:
            raise ContainerError(f"{self.path}: tensor {name} has a misaligned or out-of-range offset {offset}")
        if n_expert > 1 and (stride < nbytes or stride % ALIGN):
            raise ContainerError(f"{self.path}: tensor {name} has a bad expert stride {stride}")
        end = offset + (n_expert - 1) * stride + nbytes
        if end > self.file_size:
            raise ContainerError(
                f"{self.path}: tensor {name} ends at byte {end}, past the end of the file ({self.file_size}); "
                "the file is truncated or corrupt"
            )
        return TensorInfo(name, fmt, shape, offset, nbytes, stride if n_expert > 1 else 0)

    def _check_overlaps(self) -> None:
        spans = []
        for t in self.tensors.values():
            for e in range(max(1, t.n_expert)):
                spans.append((t.offset + e * t.stride, t.offset + e * t.stride + t.nbytes, t.name))
        spans.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise ContainerError(f"{self.path}: tensors {an} and {bn} overlap")

    # --- views ------------------------------------------------------------------------------

    def vector(self, name: str) -> np.ndarray:
        t = self.info(name)
        if len(t.shape) != 1:
            raise ContainerError(f"{self.path}: tensor {name} is not a vector")
        return self._buf[t.offset : t.offset + t.nbytes].view(np.float32)

    def matrix(self, name: str, expert: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(codes, scales) views of a matrix (or one expert of an expert tensor), shaped for the kernels."""
        t = self.info(name)
        if len(t.shape) == 1:
            raise ContainerError(f"{self.path}: tensor {name} is not a matrix")
        off = t.offset
        if len(t.shape) == 3:
            if expert is None or not 0 <= expert < t.shape[0]:
                raise ContainerError(f"{self.path}: tensor {name} needs an expert index")
            off += expert * t.stride
        return matrix_views(self._buf, off, t.fmt, t.shape[-2], t.shape[-1])

    def raw(self, name: str) -> np.ndarray:
        t = self.info(name)
        n = max(1, t.n_expert)
        return self._buf[t.offset : t.offset + (n - 1) * t.stride + t.nbytes]

    def tensor_sizes(self) -> list:
        """Each tensor as quant.schema.token_costs reads it (one matrix's bytes, the expert count and stride)."""
        from .schema import TensorSize

        return [TensorSize(t.name, t.shape, t.nbytes, t.n_expert, t.stride, t.fmt.gguf_type)
                for t in self.tensors.values()]

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ContainerError(f"{self.path}: no tensor named {name}") from None

    def advise(self, advice: str, offset: int = 0, length: int | None = None) -> None:
        """madvise a byte range of the mapping: "random" (no readahead) or "willneed" (read it now, in one go).

        Readahead is per file, not per range: a fault in a dense tensor would read ahead into the expert
        bundles next to it. So the engine maps the whole file "random" and asks for the dense tensors with
        "willneed"; expert bundles are then read only when a router picks them.
        """
        flag = {"random": getattr(mmap, "MADV_RANDOM", None), "willneed": getattr(mmap, "MADV_WILLNEED", None)}[advice]
        if self._mm is None or flag is None:
            return
        length = self.file_size - offset if length is None else length
        start = offset - offset % mmap.PAGESIZE
        length = min(length + offset - start, self.file_size - start)
        if length > 0:
            self._mm.madvise(flag, start, length)

    @property
    def resident(self) -> bool:
        """True once load_resident() has copied the file into anonymous memory."""
        return getattr(self, "_anon", None) is not None

    def load_resident(self, chunk: int = 64 << 20) -> None:
        """Copy the whole file into anonymous memory backed by transparent huge pages, and read tensors there.

        The kernels stream weights at DRAM speed; over a file mapping each 4 KiB page costs a TLB miss and a
        page walk, which measured 2.2x slower on an expert matrix (23 vs 52 GB/s) than the same bytes in
        2 MiB pages. llama.cpp does the same by default (it repacks weights into RAM). Only for files that fit
        in memory: models larger than RAM stay mapped and go through the expert cache. Call before taking
        any matrix()/vector() view."""
        if self.resident or self._mm is None:
            return
        try:
            anon, buf = huge_buffer(self.file_size)
        except OSError:
            return  # no room for a copy (strict overcommit): keep reading through the file mapping
        view = memoryview(buf)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._identity:
                raise ContainerError(f"{self.path} was replaced while it was loaded; load it again")
            pos = 0
            while pos < self.file_size:
                n = os.preadv(fd, [view[pos : pos + chunk]], pos)
                if n <= 0:
                    raise ContainerError(f"{self.path} became shorter while it was read ({pos} of {self.file_size} bytes)")
                pos += n
        finally:
            os.close(fd)
            view.release()
        buf.flags.writeable = False
        self._buf, self._anon = buf, anon
        try:
            self._mm.close()
        except BufferError:
            pass  # a view of the mapping is alive; it closes when collected
        self._mm = None

    def release(self, offset: int, length: int) -> None:
        """Give the resident copy's whole pages inside [offset, offset + length) back to the system (a tensor the
        engine has repacked into its own buffer and never reads here again); they read as zeros afterwards. Does
        nothing for a mapped file (its pages are the page cache's)."""
        if not self.resident:
            return
        base = self._buf.ctypes.data - np.frombuffer(self._anon, np.uint8).ctypes.data  # the buffer's place in _anon
        start = align_up(base + offset, mmap.PAGESIZE)
        end = (base + offset + length) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            self._anon.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        self._buf = np.zeros(0, np.uint8)
        self._anon = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # views still alive; the mapping closes when they are collected


def huge_buffer(nbytes: int) -> tuple[mmap.mmap, np.ndarray]:
    """(mapping, its first nbytes as uint8): anonymous memory starting on a 2 MiB boundary, advised to be backed by
    transparent huge pages (the kernels read 2.2x faster than through 4 KiB pages, see load_resident). Raises
    OSError when the system refuses the mapping."""
    huge = 2 << 20
    anon = mmap.mmap(-1, align_up(nbytes, huge) + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = np.frombuffer(anon, dtype=np.uint8)
    skip = (-base.ctypes.data) % huge  # start on a 2 MiB boundary so that every page can be a huge page
    try:
        anon.madvise(mmap.MADV_HUGEPAGE, skip, len(anon) - skip)
    except (AttributeError, OSError):
        pass  # no transparent huge pages here: 4 KiB pages, still no page-cache mapping
    return anon, base[skip : skip + nbytes]


def matrix_views(buf: np.ndarray, off: int, fmt: Format, n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    n_tiles = (n_out + TILE - 1) // TILE
    n_groups = n_in // GROUP
    cb, sb = matrix_parts(fmt, n_out, n_in)
    raw_c = buf[off : off + cb]
    raw_s = buf[off + cb : off + cb + sb]
    codes = raw_c.view(fmt.code_dtype).reshape(fmt.codes_shape(n_out, n_in))
    scales = (raw_s.view(np.uint16).reshape(n_tiles, n_groups, fmt.scale_count, TILE) if sb
              else np.zeros((0, 1, 1, TILE), np.uint16))
    return codes, scales


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: Path, prefix: str = "") -> int:
    """Remove the temporary files (".<name>.<pid>.tmp", as every writer here names them) that a process killed
    before its rename left in directory, those of `prefix` only when given; a live process's are kept.
    Returns how many were removed."""
    n = 0
    for p in directory.glob(f".{prefix}*.tmp"):
        pid = p.name[: -len(".tmp")].rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
    return n


class ContainerWriter:
    """Writes a container in three steps, refusing calls out of order:
    plan every tensor -> begin(metadata) writes the header -> write each tensor in plan order -> finish().

    Output goes to a temporary file beside the target, fsynced and renamed only by finish().
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise ContainerError(f"{self.path} exists (refusing to overwrite)")
        self._plan: list[dict] = []
        self._groups: dict[str, int] = {}  # expert bundle group -> index of first member in plan
        self._state = "plan"
        self._next = 0
        self._f = None
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        if self.path.parent.is_dir():
            remove_stale_temps(self.path.parent, self.path.name + ".")  # a killed earlier write of this file

    def plan(self, name: str, fmt: Format, shape: tuple[int, ...]) -> None:
        self._require("plan")
        if any(p["name"] == name for p in self._plan):
            raise ContainerError(f"tensor {name} planned twice")
        if len(shape) == 3:
            raise ContainerError("expert tensors are planned with plan_experts")
        self._plan.append({"name": name, "format": fmt.name, "shape": list(shape),
                           "nbytes": expected_nbytes(fmt, tuple(shape))})

    def plan_experts(self, tensors: list[tuple[str, Format, tuple[int, int]]], n_expert: int) -> None:
        """Plan matrices that form one bundle per expert (e.g. a layer's gate, up and down)."""
        self._require("plan")
        inner = 0
        entries = []
        for name, fmt, (n_out, n_in) in tensors:
            nb = expected_nbytes(fmt, (n_out, n_in))
            entries.append({"name": name, "format": fmt.name, "shape": [n_expert, n_out, n_in],
                            "nbytes": nb, "inner": inner})
            inner = align_up(inner + nb, 64)
        stride = align_up(inner)
        for e in entries:
            e["stride"] = stride
        entries[0]["bundle"] = stride * n_expert
        self._plan.extend(entries)

    def begin(self, metadata: dict) -> None:
        self._require("plan")
        # Offsets depend on the header length, which depends on the offsets' digits: iterate to a fixpoint.
        hlen = 0
        for _ in range(8):
            data_start = align_up(_PREFIX.size + hlen)
            pos = data_start
            for p in self._plan:
                if "inner" in p:
                    if "bundle" in p:
                        base = pos = align_up(pos)
                        pos += p["bundle"]
                    p["offset"] = base + p["inner"]
                else:
                    pos = align_up(pos)
                    p["offset"] = pos
                    pos += p["nbytes"]
            index = [{k: v for k, v in p.items() if k not in ("inner", "bundle")} for p in self._plan]
            end = align_up(pos)
            header = json.dumps({"metadata": metadata, "tensors": index, "file_size": end},
                                separators=(",", ":")).encode()
            if align_up(_PREFIX.size + len(header)) == data_start:
                break
            hlen = len(header)
        self._end = end
        self._f = open(self._tmp, "wb")
        self._f.write(_PREFIX.pack(MAGIC, VERSION, 0, len(header)))
        self._f.write(header)
        self._state = "write"

    def write(self, name: str, *arrays: np.ndarray, expert: int | None = None) -> None:
        """Write the next planned tensor: (codes, scales) of a matrix, or one float32 vector.

        Expert tensors are written expert by expert, each with `expert=e`, in any order.
        """
        self._require("write")
        p = next((q for q in self._plan if q["name"] == name), None)
        if p is None:
            raise ContainerError(f"tensor {name} was not planned")
        data = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
        if len(data) != p["nbytes"]:
            raise ContainerError(f"tensor {name}: {len(data)} bytes given, {p['nbytes']} planned")
        off = p["offset"]
        if "stride" in p:
            if expert is None or not 0 <= expert < p["shape"][0]:
                raise ContainerError(f"tensor {name}: expert index required")
            off += expert * p["stride"]
            p.setdefault("written", set()).add(expert)
        else:
            p["written"] = True
        self._f.seek(off)
        self._f.write(data)

    def finish(self) -> Path:
        self._require("write")
        missing = [p["name"] for p in self._plan
                   if not p.get("written") or ("stride" in p and len(p["written"]) != p["shape"][0])]
        if missing:
            self.abort()
            raise ContainerError(f"tensors not written: {', '.join(missing[:5])}")
        return self._publish()

    def presize(self) -> Path:
        """Publish the file now, header written and every tensor's place reserved (sparse, unwritten), so that
        tensors can be written in place later by offset: a shard-by-shard pull, resumable after interruption."""
        self._require("write")
        return self._publish()

    def _publish(self) -> Path:
        self._f.truncate(self._end)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        os.replace(self._tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._state = "done"
        return self.path

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self._tmp.unlink(missing_ok=True)
        self._state = "done"

    def _require(self, state: str) -> None:
        if self._state != state:
            raise ContainerError(f"container writer: call not allowed in state {self._state!r}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._state != "done":
            self.abort()
