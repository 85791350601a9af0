"""A bounded walk over a GGUF file's header before the `gguf` package's reader sees it.

The reader trusts every count and length the file declares: an array count of 2^64-1 makes it loop while memory
grows, a string length past the end of the file makes it read garbage. This walk reads only fixed-size integers,
checks every count and length against the bytes left in the file before stepping over them, and returns what an
import decides on before reading any weight: the scalar metadata (architecture, split keys), each tensor's name,
shape and type, and where the tensor data starts. gguf_io then checks the tensors' extents (ordered, aligned,
disjoint, inside the file).

The walk reads through a window onto the file: a mapped local file, or a remote one fetched by HTTP Range requests
(lmcli pull), which asks for more bytes only as the walk reaches them.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import GGUFError

# gguf.GGUFValueType -> the size of one item (None: a string, whose length comes first; ARRAY is 9)
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 8: None, 10: 8, 11: 8, 12: 8}
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_ARRAY, _STRING = 9, 8
_U64 = struct.Struct("<Q")
MAX_KEY = 1 << 16  # bytes in a key or a tensor name (llama.cpp's GGUF_MAX... names are far shorter)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_DEPTH = 2  # arrays of arrays: deeper nesting is refused
MAX_VALUE = 1 << 20  # a longer string value (none that lmcli reads) is stepped over, not fetched
FIRST_FETCH = 1 << 16  # a remote header's first Range request; each further one doubles
SLACK = 1 << 15  # how far a remote read may go past the least the rest of the header takes: fewer round trips


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: ne0 (the row length) first
    ggml_type: int  # gguf.GGMLQuantizationType, not checked here: the importer checks it against what it reads
    offset: int  # from the start of the tensor data


@dataclass(frozen=True)
class Header:
    size: int  # the file's bytes
    values: dict  # the scalar and string metadata (general.architecture, split.count, ...); arrays are skipped
    tensors: tuple[TensorInfo, ...]
    data_offset: int  # where tensor data starts: the end of the header, aligned


class _Window:
    """Bytes [start, start + len(buf)) of a file of `size` bytes; fetch(start, stop) brings others.

    A fetch asks for twice the bytes of the one before (a long header, a large vocabulary, takes a few requests,
    not one per string), but never more than SLACK past the least the rest of the header can hold (rest: the walk's
    bound on the bytes still to come): a remote header is read with at most SLACK bytes of the weights after it.
    """

    def __init__(self, size: int, buf=b"", fetch: Callable[[int, int], bytes] | None = None):
        self.size, self.buf, self.start, self.fetch, self.step = size, buf, 0, fetch, FIRST_FETCH
        self.rest: Callable[[], int] = lambda: 0

    def get(self, p: int, n: int):
        if not (self.start <= p and p + n <= self.start + len(self.buf)):
            stop = min(self.size, p + n + min(self.step, self.rest() + SLACK))
            self.step *= 2
            end = self.start + len(self.buf)
            if self.start <= p <= end:  # the walk goes on from the window's end: keep its tail, fetch the rest
                self.buf = bytes(self.buf[p - self.start:]) + self.fetch(end, stop)
            else:  # it stepped over an array: the skipped bytes are never fetched
                self.buf = self.fetch(p, stop)
            self.start = p
            if len(self.buf) < p + n - self.start:
                raise GGUFError(f"the server sent {len(self.buf)} bytes where {p + n - self.start} were asked for")
        return self.buf[p - self.start:p - self.start + n]


# The least bytes one more key-value pair (key length, an empty key, value type, a 1-byte value), one more item of
# an array of strings or of arrays (its length or its item type and count), one more tensor info (name length, an
# empty name, n_dims, one dimension, type, offset) can take: bounds on what is left of a header.
_MIN_KV, _MIN_TENSOR = 8 + 4 + 1, 8 + 4 + 8 + 4 + 8


class _Walk:
    def __init__(self, window: _Window, where):
        self.win, self.pos, self.size, self.where = window, 0, window.size, where
        self.after = self.after_item = 0  # least bytes after the current key or tensor, after the array's item
        window.rest = lambda: self.after + self.after_item

    def fail(self, what: str):
        raise GGUFError(f"{self.where}: {what} (header byte {self.pos})")

    def take(self, n: int) -> int:
        if n < 0 or n > self.size - self.pos:
            self.fail(f"{n} bytes declared, {self.size - self.pos} left in the file")
        p = self.pos
        self.pos += n
        return p

    def read(self, n: int) -> bytes:
        return self.win.get(self.take(n), n)

    def u32(self) -> int:
        return struct.unpack("<I", self.read(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.read(8))[0]

    def string(self, limit: int | None = None, keep: bool = True) -> str | None:
        """A string (a name of at most `limit` bytes); its text, or None when it is stepped over unread (not kept,
        or longer than any metadata value lmcli uses)."""
        n = self.u64()
        if limit is not None and n > limit:
            self.fail(f"a name of {n} bytes")
        p = self.take(n)
        if not keep or n > MAX_VALUE:
            return None
        return bytes(self.win.get(p, n)).decode("utf-8", errors="replace")

    def skip_strings(self, count: int, outer: bool) -> None:
        """Step over `count` strings: a vocabulary's hundreds of thousands, so a tight loop over the window's bytes
        (the same bounds as string(): each length checked against the bytes left in the file)."""
        while count:
            if outer:
                self.after_item = (count - 1) * 8
            if self.size - self.pos < 8:
                self.take(8)  # fails, naming the bytes left
            self.win.get(self.pos, 8)  # the next length is in the window
            buf, base = self.win.buf, self.win.start
            pos, end, size = self.pos, self.win.start + len(self.win.buf) - 8, self.size
            while count and pos <= end:
                n = _U64.unpack_from(buf, pos - base)[0]
                if n > size - pos - 8:
                    self.pos = pos + 8
                    self.fail(f"{n} bytes declared, {size - pos - 8} left in the file")
                pos += 8 + n
                count -= 1
            self.pos = pos
        self.after_item = 0

    def value(self, vtype: int, depth: int = 0, keep: bool = True):
        """Step over one value; returns it when it is a scalar or a string (None for an array)."""
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
            if itype == _STRING:
                self.skip_strings(count, depth == 0)
                return None
            for i in range(count):
                if depth == 0:
                    self.after_item = (count - 1 - i) * (8 if itype == _STRING else 12)
                self.value(itype, depth + 1, keep=False)
            self.after_item = 0
            return None
        if vtype == _STRING:
            return self.string(keep=keep)
        fmt = _SCALAR.get(vtype)
        if fmt is None:
            self.fail(f"unknown value type {vtype}")
        return struct.unpack(fmt, self.read(_SIZES[vtype]))[0]


def _walk(win: _Window, where) -> Header:
    size = win.size
    if size < 24:
        raise GGUFError(f"{where} is not a GGUF file ({size} bytes)")
    w = _Walk(win, where)
    if bytes(w.read(4)) != b"GGUF":
        raise GGUFError(f"{where} is not a GGUF file (no GGUF magic)")
    version = w.u32()
    if version not in (2, 3):
        raise GGUFError(f"{where}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = w.u64(), w.u64()
    if n_kv > (size - w.pos) // 12 or n_tensors > (size - w.pos) // 24:
        w.fail(f"{n_kv} metadata keys and {n_tensors} tensors, more than the file can hold")
    values = {}
    for i in range(n_kv):
        w.after = (n_kv - 1 - i) * _MIN_KV + n_tensors * _MIN_TENSOR
        key = w.string(MAX_KEY)
        v = w.value(w.u32())
        if v is not None:
            values[key] = v
    alignment = values.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1 or alignment & (alignment - 1):
        w.fail(f"general.alignment {alignment!r} is not a power of two")
    tensors = []
    for i in range(n_tensors):
        w.after = (n_tensors - 1 - i) * _MIN_TENSOR
        name = w.string(MAX_KEY)
        n_dims = w.u32()
        if not 1 <= n_dims <= MAX_DIMS:
            w.fail(f"a tensor with {n_dims} dimensions")
        dims, n = [], 1
        for _ in range(n_dims):
            d = w.u64()
            if d == 0 or d > size * 8:  # no type stores fewer than 1 bit per weight
                w.fail(f"a tensor dimension of {d}")
            n *= d
            if n > size * 8:
                w.fail(f"a tensor of {n} elements, more than the file can hold")
            dims.append(d)
        ggml_type, offset = w.u32(), w.u64()  # the offset is checked with the extents once each tensor is sized
        tensors.append(TensorInfo(name, tuple(dims), ggml_type, offset))
    return Header(size, values, tuple(tensors), -(-w.pos // alignment) * alignment)


def read_header(path: Path) -> Header:
    """The header of the GGUF file at path, every count and length bounded by the file. Raises GGUFError."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size < 24:
            raise GGUFError(f"{path} is not a GGUF file ({size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _walk(_Window(size, buf), path)


def read_remote_header(fetch: Callable[[int, int], bytes], size: int, where: str) -> Header:
    """The header of a remote GGUF file of `size` bytes, read through fetch(start, stop) (HTTP Range requests):
    only the header's bytes are asked for, a few requests of doubling length. Raises GGUFError."""
    return _walk(_Window(size, fetch=fetch), where)


def check_header(path: Path) -> int:
    """Walk the header of the GGUF file at path -> the offset where tensor data starts. Raises GGUFError."""
    return read_header(path).data_offset
