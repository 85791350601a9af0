"""A bounded walk over a GGUF file's header before the `gguf` package's reader sees it.

The reader trusts every count and length the file declares: an array count of 2^64-1 makes it loop while memory
grows, a string length past the end of the file makes it read garbage. This walk reads only fixed-size integers,
checks every count and length against the bytes left in the file before stepping over them, and returns where the
tensor data starts; gguf_io then checks the tensors' extents (ordered, aligned, disjoint, inside the file).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from .errors import GGUFError

# gguf.GGUFValueType -> the size of one item (None: a string, whose length comes first; ARRAY is 9)
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 8: None, 10: 8, 11: 8, 12: 8}
_ARRAY, _STRING, _UINT32, _UINT64 = 9, 8, 4, 10
MAX_KEY = 1 << 16  # bytes in a key or a tensor name (llama.cpp's GGUF_MAX... names are far shorter)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_DEPTH = 2  # arrays of arrays: deeper nesting is refused


class _Walk:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str):
        raise GGUFError(f"{self.path}: {what} (header byte {self.pos})")

    def take(self, n: int) -> int:
        if n < 0 or n > self.size - self.pos:
            self.fail(f"{n} bytes declared, {self.size - self.pos} left in the file")
        p = self.pos
        self.pos += n
        return p

    def u32(self) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8))[0]

    def string(self, limit: int | None = None) -> bytes:
        n = self.u64()
        if limit is not None and n > limit:
            self.fail(f"a name of {n} bytes")
        p = self.take(n)
        return bytes(self.buf[p:p + n]) if limit is not None else b""

    def value(self, vtype: int, depth: int = 0) -> int | None:
        """Step over one value; returns it when it is an unsigned integer (general.alignment)."""
        if vtype == _ARRAY:
            if depth >= MAX_DEPTH:
                self.fail("arrays nested too deeply")
            itype, count = self.u32(), self.u64()
            size = _SIZES.get(itype, 0) if itype != _ARRAY else None
            if itype not in _SIZES and itype != _ARRAY:
                self.fail(f"unknown array item type {itype}")
            # fixed-size items: one bounds check for the whole array; strings or arrays take at least 8 bytes each
            # (their length or count), so their count is bounded before the first is read
            if count > (self.size - self.pos) // (size or 8):
                self.fail(f"an array of {count} items, more than the file can hold")
            if size is not None:
                self.take(count * size)
                return None
            for _ in range(count):
                self.value(itype, depth + 1)
            return None
        if vtype == _STRING:
            self.string()
            return None
        size = _SIZES.get(vtype)
        if size is None:
            self.fail(f"unknown value type {vtype}")
        p = self.take(size)
        if vtype == _UINT32:
            return struct.unpack_from("<I", self.buf, p)[0]
        if vtype == _UINT64:
            return struct.unpack_from("<Q", self.buf, p)[0]
        return None


def check_header(path: Path) -> int:
    """Walk the header of the GGUF file at path, bounding every count and length by the file; returns the offset
    where tensor data starts (the end of the header, aligned). Raises GGUFError."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise GGUFError(f"{path} is not a GGUF file ({size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            w = _Walk(buf, path)
            if bytes(buf[:4]) != b"GGUF":
                raise GGUFError(f"{path} is not a GGUF file (no GGUF magic)")
            w.take(4)
            version = w.u32()
            if version not in (2, 3):
                raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
            n_tensors, n_kv = w.u64(), w.u64()
            if n_kv > (size - w.pos) // 12 or n_tensors > (size - w.pos) // 24:
                w.fail(f"{n_kv} metadata keys and {n_tensors} tensors, more than the file can hold")
            alignment = 32
            for _ in range(n_kv):
                key = w.string(MAX_KEY)
                v = w.value(w.u32())
                if key == b"general.alignment":
                    alignment = v
            if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
                w.fail(f"general.alignment {alignment!r} is not a power of two")
            for _ in range(n_tensors):
                w.string(MAX_KEY)
                n_dims = w.u32()
                if not 1 <= n_dims <= MAX_DIMS:
                    w.fail(f"a tensor with {n_dims} dimensions")
                n = 1
                for _ in range(n_dims):
                    d = w.u64()
                    if d == 0 or d > size * 8:  # no type stores fewer than 1 bit per weight
                        w.fail(f"a tensor dimension of {d}")
                    n *= d
                    if n > size * 8:
                        w.fail(f"a tensor of {n} elements, more than the file can hold")
                w.u32()  # type: the importer checks it against the formats it reads
                w.u64()  # offset: checked with the extents once the reader has sized each tensor
            return -(-w.pos // alignment) * alignment
