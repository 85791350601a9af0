"""GGUF import: a lossless repack (checked against gguf.quants on the real SmolLM2 file) and clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFWriter
from gguf import quants as gq

from quant.container import Container
from quant.errors import GGUFError
from quant.gguf_io import import_gguf
from quant.quantize import dequantize_interleaved


def test_import_is_lossless_for_every_tensor_of_the_real_model(smol_gguf, smol_container):
    r = GGUFReader(str(smol_gguf))
    c = Container(smol_container)
    assert len(c.tensors) == len(r.tensors)
    for t in r.tensors:
        ref = gq.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        info = c.info(t.name)
        if len(info.shape) == 1:
            got = c.vector(t.name)
        else:
            got = dequantize_interleaved(*c.matrix(t.name), info.fmt, *info.shape)
        assert np.array_equal(got.reshape(ref.shape), ref), t.name
    assert c.metadata["config"]["n_layer"] == 30
    assert c.metadata["tokenizer"]["model"] == "gpt2"
    assert "im_start" in c.metadata["chat_template"]


def _tiny_gguf(path, tensors, arch="llama"):
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b"])
    for name, arr, raw_dtype in tensors:
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_tensor_type_is_named(tmp_path):
    src = tmp_path / "k.gguf"
    raw = np.zeros((64, 82), np.uint8)  # 64 rows of one IQ2_S super-block (256 weights, 82 bytes)
    _tiny_gguf(src, [("token_embd.weight", raw, QT.IQ2_S)])
    with pytest.raises(GGUFError, match="IQ2_S"):
        import_gguf(src, tmp_path / "out.lmc")
    assert not (tmp_path / "out.lmc").exists()


def test_unsupported_architecture_is_named(tmp_path):
    src = tmp_path / "a.gguf"
    _tiny_gguf(src, [("x.weight", np.zeros(64, np.float32), None)], arch="mamba")
    with pytest.raises(GGUFError, match="mamba"):
        import_gguf(src, tmp_path / "out.lmc")


def test_truncated_gguf_is_refused_before_writing(smol_gguf, tmp_path):
    src = tmp_path / "t.gguf"
    data = smol_gguf.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError):
        import_gguf(src, tmp_path / "out.lmc")
    assert not (tmp_path / "out.lmc").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["t.gguf"]


def test_not_a_gguf_is_refused(tmp_path):
    src = tmp_path / "junk.gguf"
    src.write_bytes(b"hello world" * 100)
    with pytest.raises(GGUFError):
        import_gguf(src, tmp_path / "out.lmc")


# --- hostile headers (issue 19): every count and length bounded by the file, extents disjoint ----------------------


def _patched(src, dst, key: bytes, offset_after_key: int, new: bytes):
    """A copy of src with `new` written at a field offset_after_key bytes after the length-prefixed `key`."""
    import struct

    data = bytearray(src.read_bytes())
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + offset_after_key
    data[at:at + len(new)] = new
    dst.write_bytes(bytes(data))
    return dst


def _import_in_a_subprocess(path, tmp_path):
    """import_gguf in a child with a deadline: an unbounded loop fails the test instead of hanging the suite."""
    import subprocess
    import sys

    code = ("import sys; from quant.gguf_io import import_gguf; from quant.errors import GGUFError\n"
            "try:\n    import_gguf(sys.argv[1], sys.argv[2])\nexcept GGUFError as e:\n    print(e); sys.exit(3)")
    r = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "out.lmc")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 3, r.stderr[-2000:]
    assert not (tmp_path / "out.lmc").exists()
    return r.stdout.strip()


def test_an_array_count_of_2_64_minus_1_is_refused_at_once(smol_gguf, tmp_path):
    # tokenizer.ggml.token_type: value type (u32), item type (u32), then the count (u64)
    bad = _patched(smol_gguf, tmp_path / "count.gguf", b"tokenizer.ggml.token_type", 8, b"\xff" * 8)
    assert "18446744073709551615" in _import_in_a_subprocess(bad, tmp_path)


def test_a_string_longer_than_the_file_is_refused(smol_gguf, tmp_path):
    # general.architecture's value: value type (u32), then the string's length (u64)
    bad = _patched(smol_gguf, tmp_path / "len.gguf", b"general.architecture", 4, (1 << 40).to_bytes(8, "little"))
    assert "left in the file" in _import_in_a_subprocess(bad, tmp_path)


def test_overlapping_tensors_are_refused(smol_gguf, tmp_path):
    """A tensor whose type field says F32 instead of its real type covers its neighbours' bytes: llama.cpp refuses
    the file, and so does lmcli (it used to import it and fail at run time with a ZeroDivisionError)."""
    r = GGUFReader(str(smol_gguf))
    inner = sorted(r.tensors, key=lambda t: int(t.data_offset))[len(r.tensors) // 2:]  # 7x its size stays inside
    t = next(t for t in inner if t.tensor_type in (QT.Q4_1, QT.Q8_0) and len(t.shape) == 2)
    # tensor info: name, n_dims (u32), dims (u64 each), type (u32)
    bad = _patched(smol_gguf, tmp_path / "overlap.gguf", t.name.encode(), 4 + 8 * len(t.shape),
                   int(QT.F32).to_bytes(4, "little"))
    msg = _import_in_a_subprocess(bad, tmp_path)
    assert f"tensor {t.name}" in msg and "overlaps" in msg, msg


def test_every_unsupported_tensor_type_is_named_with_its_count_at_once(tmp_path):
    """Issue 17: a Q4_K_M file was refused naming only its first tensor; the refusal is a census of the header."""
    src = tmp_path / "mix.gguf"
    iq2s = np.zeros((64, 82), np.uint8)  # 64 rows of one IQ2_S super-block
    iq3s = np.zeros((64, 110), np.uint8)  # 64 rows of one IQ3_S super-block
    _tiny_gguf(src, [("a.weight", iq2s, QT.IQ2_S), ("b.weight", iq3s, QT.IQ3_S), ("c.weight", iq3s, QT.IQ3_S),
                     ("d.weight", np.zeros(64, np.float32), None),
                     ("e.weight", np.zeros((64, 144), np.uint8), QT.Q4_K)])  # a type lmcli imports: not named
    with pytest.raises(GGUFError, match=r"tensor types lmcli cannot import yet: IQ3_S x2, IQ2_S x1 \(supported: "):
        import_gguf(src, tmp_path / "out.lmc")
