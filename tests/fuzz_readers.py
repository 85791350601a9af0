"""Mutation fuzzing of every reader of untrusted files: GGUF import, the container (with the schema and the
engine's weight map), safetensors headers. Each mutated file must be read or refused with the reader's typed
error: never another exception, a hang or a crash. tests/test_fuzz.py runs a few hundred mutations per reader with
a fixed seed; bench/fuzz.py runs as many as asked.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

EXTREMES = [0, 1, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, (1 << 63) - 1, (1 << 64) - 1]


def mutate(data: bytes, rng: random.Random, header: int) -> bytes:
    """1-4 random edits, most of them inside the first `header` bytes, where sizes and offsets live."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(min(header, len(b))) if rng.random() < 0.8 or len(b) <= header else rng.randrange(len(b))
        op = rng.randrange(6)
        if op == 0:
            b[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[at] = rng.randrange(256)
        elif op == 2 and at + 8 <= len(b):
            b[at:at + 8] = struct.pack("<Q", rng.choice(EXTREMES))
        elif op == 3 and at + 4 <= len(b):
            b[at:at + 4] = struct.pack("<I", rng.choice(EXTREMES) & 0xFFFFFFFF)
        elif op == 4:
            del b[at:]
        else:
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        if not b:
            break
    return bytes(b)


def seeds(tmp: Path) -> dict[str, Path]:
    """Small valid files of each kind: a tiny MoE container, the GGUF exported from it, a safetensors shard."""
    import numpy as np
    from safetensors.numpy import save_file

    from quant.gguf_export import export_gguf
    from quant.synthetic import write_synthetic_moe

    lmc = write_synthetic_moe(tmp / "seed.lmc", n_layer=1, n_embd=64, n_ff_exp=64, n_expert=4, n_head=2,
                              n_head_kv=1, vocab=300, overwrite=True)
    gguf = export_gguf(lmc, tmp / "seed.gguf", overwrite=True)
    st = tmp / "seed.safetensors"
    save_file({"model.norm.weight": np.ones(64, np.float32), "lm_head.weight": np.zeros((8, 64), np.float16)}, st)
    return {"container": Path(lmc), "gguf": Path(gguf), "safetensors": st}


def read_container(path: Path, out: Path) -> None:
    from lmcli.engine.weights import load_weights
    from quant.container import Container
    from quant.schema import ModelConfig

    c = Container(path)
    try:
        load_weights(c, ModelConfig.from_dict(c.metadata.get("config")))
    finally:
        c.close()


def read_gguf(path: Path, out: Path) -> None:
    from quant.gguf_io import import_gguf

    import_gguf(path, out, overwrite=True)


def read_safetensors(path: Path, out: Path) -> None:
    from quant.safetensors_io import read_header

    read_header(path)


READERS = {"container": read_container, "gguf": read_gguf, "safetensors": read_safetensors}
HEADER_BYTES = {"container": 4096, "gguf": 8192, "safetensors": 512}


def run(kind: str, seed_file: Path, work: Path, n: int, seed: int = 0) -> dict:
    """n mutations of seed_file through the reader of `kind` -> counts of outcomes; an exception that is not
    the reader's typed error propagates (with the mutated file kept as work/crash.<kind>)."""
    from lmcli.errors import LmcliError
    from quant.errors import QuantError

    rng = random.Random(seed)
    data = seed_file.read_bytes()
    counts = {"read": 0, "refused": 0}
    case = work / f"case.{kind}"
    for _ in range(n):
        case.write_bytes(mutate(data, rng, HEADER_BYTES[kind]))
        try:
            READERS[kind](case, work / "out.lmc")
            counts["read"] += 1
        except (QuantError, LmcliError):
            counts["refused"] += 1
        except BaseException:
            (work / f"crash.{kind}").write_bytes(case.read_bytes())
            raise
    return counts
