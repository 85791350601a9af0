"""Weight formats: each one an object owning its geometry, reference codec, kernels and GGUF mapping."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cached_property

# Rows of a matrix are stored in tiles of TILE output rows. Inside a tile, for each 32-weight group,
# the codes of all TILE rows sit side by side so that the kernel's inner loop runs over rows with unit stride
# and vectorises (one 32-bit word per row and 8 elements (4-bit) or 4 (8-bit), see quantize._tile_words);
# scales live in a separate array after the codes.
TILE = 64
GROUP = 32
ALIGN = 4096  # every tensor and every expert bundle starts on a page boundary


@dataclass(frozen=True)
class Format:
    """One weight format and everything that depends on which format it is: geometry, the numpy reference codec,
    the kernel entry points and the GGUF mapping. Code elsewhere asks the format, never tests its name, so a new
    format (K-quants, IQ) is one definition here plus its codec (quant.quantize) and kernels (quant.kernels).

    The codec and the matmul are named, not imported: they are resolved on first use, so importing this module
    loads neither numpy nor Numba (kernels compile lazily on their first call).
    """

    name: str
    gguf_type: int  # gguf.GGMLQuantizationType of the equivalent GGUF tensor (import and export)
    file_type: int  # llama_ftype (general.file_type) of a GGUF file whose matrices are mostly in this format
    code_bytes: int  # bytes of codes per group of GROUP weights of one row
    scale_count: int  # fp16 scale values per group of one row (d, or d and m)
    quantized: bool
    bits: float  # bits per weight, scales included (precision policies compare it: "embeddings at least 8-bit")
    block_size: int  # weights per block in GGUF's row-major data (1 for float formats), as gguf.GGML_QUANT_SIZES
    block_bytes: int  # bytes per block
    code_dtype: str  # numpy dtype of the interleaved codes as the kernels read them
    codec_name: str  # the numpy reference codec: a quant.quantize.Codec
    matmul_name: str  # quant.kernels entry for a batch of activations (see int_act for its arguments)
    int_act: bool  # the matmul takes int16 activations (codes, scales, xq, xd, xs, out), else (codes, x, out)
    kind: int  # the format's id in the kernels that take any format (embed_rows, moe_*): its GGUF type id
    expert_rows: bool  # moe_*_rows (prefill: codes unpacked once for all of an expert's tokens) take this kind
    gguf_rows: bool = False  # codes are GGUF's own row-major blocks (see ROWS below), the matmul (codes, kind, x, out)
    half_fields: tuple[int, ...] = ()  # offsets of a GGUF block's fp16 fields (gguf_rows: checked finite on import)

    @cached_property
    def codec(self):
        """-> quant.quantize.Codec."""
        return getattr(importlib.import_module("quant.quantize"), self.codec_name)

    @cached_property
    def matmul(self):
        return getattr(importlib.import_module("quant.kernels"), self.matmul_name)

    def codes_shape(self, n_out: int, n_in: int) -> tuple[int, ...]:
        """Shape of a matrix's interleaved codes (in code_dtype): per group for block formats, per element for
        float formats (the tile layout of quant.quantize)."""
        n_tiles = (n_out + TILE - 1) // TILE
        if self.gguf_rows:
            return (n_tiles, TILE, self.row_nbytes(n_in))
        if not self.quantized:
            return (n_tiles, n_in, TILE)
        return (n_tiles, n_in // GROUP, self.code_bytes // _ITEMSIZE[self.code_dtype], TILE)

    @property
    def row_multiple(self) -> int:
        """Row lengths this format stores: any for float formats, whole GROUPs for tile block formats, whole GGUF
        blocks for gguf_rows formats."""
        if self.gguf_rows:
            return self.block_size
        return GROUP if self.quantized else 1

    def row_nbytes(self, n_in: int) -> int:
        """Bytes of one row of n_in weights in GGUF's row-major data."""
        return n_in // self.block_size * self.block_bytes


_ITEMSIZE = {"uint8": 1, "int8": 1, "uint16": 2, "float32": 4}

F32 = Format("f32", gguf_type=0, file_type=0, code_bytes=4 * GROUP, scale_count=0, quantized=False, bits=32,
             block_size=1, block_bytes=4, code_dtype="float32", codec_name="F32_CODEC", matmul_name="matmul_f32",
             int_act=False, kind=0, expert_rows=False)
F16 = Format("f16", gguf_type=1, file_type=1, code_bytes=2 * GROUP, scale_count=0, quantized=False, bits=16,
             block_size=1, block_bytes=2, code_dtype="uint16", codec_name="F16_CODEC", matmul_name="matmul_f16",
             int_act=False, kind=1, expert_rows=False)
Q4_0 = Format("q4_0", gguf_type=2, file_type=2, code_bytes=GROUP // 2, scale_count=1, quantized=True, bits=4.5,
              block_size=GROUP, block_bytes=18, code_dtype="uint8", codec_name="Q4_0_CODEC", matmul_name="matmul_q4",
              int_act=True, kind=2, expert_rows=True)
Q4_1 = Format("q4_1", gguf_type=3, file_type=3, code_bytes=GROUP // 2, scale_count=2, quantized=True, bits=5,
              block_size=GROUP, block_bytes=20, code_dtype="uint8", codec_name="Q4_1_CODEC", matmul_name="matmul_q4",
              int_act=True, kind=3, expert_rows=True)
Q8_0 = Format("q8_0", gguf_type=8, file_type=7, code_bytes=GROUP, scale_count=1, quantized=True, bits=8.5,
              block_size=GROUP, block_bytes=34, code_dtype="int8", codec_name="Q8_0_CODEC", matmul_name="matmul_q8",
              int_act=True, kind=8, expert_rows=True)


# GGUF types imported as they are (gguf_rows): each row keeps GGUF's blocks byte for byte, rows padded with zero
# bytes to whole tiles (codes (n_tiles, TILE, row bytes), no separate scales). The engine repacks all but BF16 and
# the codebook types into tiles at load (quant.repack, run by kernels.matmul_tiles); the rows kernels (quant.kernels,
# matmul_gguf_rows and the expert kernels' gguf_rows kinds) decode one row at a time to float32 with gguf.quants'
# operations and take float activations: BF16, the codebook types IQ3_XXS/IQ2_XS/IQ2_XXS/IQ1_S (grids in
# quant.iq_grids), and the experts of a model read through its mapping.
# Q5_0, Q5_1, Q4_K, Q5_K and Q6_K are also written (quant.quantize, quant.kquants: llama.cpp's encoders); the
# others lmcli imports from llama.cpp's files only.


def _rows(name, gguf_type, file_type, block_size, block_bytes, half_fields):
    return Format(name, gguf_type=gguf_type, file_type=file_type, code_bytes=0, scale_count=0, quantized=True,
                  bits=8 * block_bytes / block_size, block_size=block_size, block_bytes=block_bytes,
                  code_dtype="uint8", codec_name=f"{name.upper()}_CODEC", matmul_name="matmul_gguf_rows",
                  int_act=False, kind=gguf_type, expert_rows=True, gguf_rows=True, half_fields=half_fields)


Q5_0 = _rows("q5_0", 6, 8, GROUP, 22, (0,))  # d | qh u32 | qs[16]
Q5_1 = _rows("q5_1", 7, 9, GROUP, 24, (0, 2))  # d | m | qh u32 | qs[16]
Q2_K = _rows("q2_k", 10, 10, 256, 84, (80, 82))  # scales[16] | qs[64] | d | dmin   (file type: Q2_K)
Q3_K = _rows("q3_k", 11, 12, 256, 110, (108,))  # hmask[32] | qs[64] | scales[12] | d   (Q3_K_M)
Q4_K = _rows("q4_k", 12, 15, 256, 144, (0, 2))  # d | dmin | scales[12] | qs[128]   (file type: Q4_K_M)
Q5_K = _rows("q5_k", 13, 17, 256, 176, (0, 2))  # d | dmin | scales[12] | qh[32] | qs[128]   (Q5_K_M)
Q6_K = _rows("q6_k", 14, 18, 256, 210, (208,))  # ql[128] | qh[64] | scales int8[16] | d
IQ4_NL = _rows("iq4_nl", 20, 25, GROUP, 18, (0,))  # d | qs[16]
IQ4_XS = _rows("iq4_xs", 23, 30, 256, 136, (0,))  # d | scales_h u16 | scales_l[4] | qs[128]
IQ2_XXS = _rows("iq2_xxs", 16, 19, 256, 66, (0,))  # d | qs u16[32]: per 32 weights 4 grid bytes, 4 x 7 sign bits, scale
IQ2_XS = _rows("iq2_xs", 17, 20, 256, 74, (0,))  # d | qs u16[32] (9-bit grid index, 7 sign bits) | scales[8]
IQ3_XXS = _rows("iq3_xxs", 18, 23, 256, 98, (0,))  # d | qs[64] grid bytes | u32[8] (4 x 7 sign bits, scale)
IQ1_S = _rows("iq1_s", 19, 24, 256, 50, (0,))  # d | qs[32] | qh u16[8] (3 index bits x 4, scale, delta sign)
BF16 = _rows("bf16", 30, 32, 1, 2, ())  # bfloat16 values (checked finite by their exponent)
ROWS = (Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, BF16)

FORMATS = {f.name: f for f in (F32, F16, Q4_0, Q4_1, Q8_0, *ROWS)}
BY_GGUF_TYPE = {f.gguf_type: f for f in FORMATS.values()}


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def matrix_parts(fmt: Format, n_out: int, n_in: int) -> tuple[int, int]:
    """Bytes of (codes, scales) of one (n_out, n_in) matrix in the interleaved layout.

    Rows are padded to a multiple of TILE (padding rows are zero); n_in must be a multiple of fmt.row_multiple.
    """
    n_tiles = (n_out + TILE - 1) // TILE
    if fmt.gguf_rows:
        return n_tiles * TILE * fmt.row_nbytes(n_in), 0
    n_groups = n_in // GROUP
    per_row = n_groups * fmt.code_bytes if fmt.quantized else n_in * _ITEMSIZE[fmt.code_dtype]
    codes = n_tiles * per_row * TILE
    scales = n_tiles * n_groups * fmt.scale_count * TILE * 2
    return codes, scales


def matrix_nbytes(fmt: Format, n_out: int, n_in: int) -> int:
    codes, scales = matrix_parts(fmt, n_out, n_in)
    return codes + scales


def vector_nbytes(n: int) -> int:
    """1-D tensors (norm weights, biases) are always plain float32."""
    return 4 * n
