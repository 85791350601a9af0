"""Weight formats: block semantics (GGUF's) and the interleaved on-disk layout the kernels read."""

from __future__ import annotations

from dataclasses import dataclass

# Rows of a matrix are stored in tiles of TILE output rows. Inside a tile, for each 32-weight group,
# the codes of all TILE rows sit side by side so that the kernel's inner loop runs over rows with unit stride
# and vectorises (one 32-bit word per row and 8 elements (4-bit) or 4 (8-bit), see quantize._tile_words);
# scales live in a separate array after the codes.
TILE = 64
GROUP = 32
ALIGN = 4096  # every tensor and every expert bundle starts on a page boundary


@dataclass(frozen=True)
class Format:
    """One weight format: its name, GGUF type id, and bytes per group in each array."""

    name: str
    gguf_type: int  # gguf.GGMLQuantizationType value of the equivalent block format
    code_bytes: int  # bytes of codes per group of GROUP weights of one row
    scale_count: int  # fp16 scale values per group of one row (d, or d and m)
    quantized: bool


F32 = Format("f32", 0, 4 * GROUP, 0, False)
F16 = Format("f16", 1, 2 * GROUP, 0, False)
Q4_0 = Format("q4_0", 2, GROUP // 2, 1, True)
Q4_1 = Format("q4_1", 3, GROUP // 2, 2, True)
Q8_0 = Format("q8_0", 8, GROUP, 1, True)

FORMATS = {f.name: f for f in (F32, F16, Q4_0, Q4_1, Q8_0)}
BY_GGUF_TYPE = {f.gguf_type: f for f in FORMATS.values()}


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def matrix_parts(fmt: Format, n_out: int, n_in: int) -> tuple[int, int]:
    """Bytes of (codes, scales) of one (n_out, n_in) matrix in the interleaved layout.

    Rows are padded to a multiple of TILE (padding rows are zero); n_in must be a multiple of GROUP.
    """
    n_tiles = (n_out + TILE - 1) // TILE
    n_groups = n_in // GROUP
    codes = n_tiles * n_groups * fmt.code_bytes * TILE
    scales = n_tiles * n_groups * fmt.scale_count * TILE * 2
    return codes, scales


def matrix_nbytes(fmt: Format, n_out: int, n_in: int) -> int:
    codes, scales = matrix_parts(fmt, n_out, n_in)
    return codes + scales


def vector_nbytes(n: int) -> int:
    """1-D tensors (norm weights, biases) are always plain float32."""
    return 4 * n
