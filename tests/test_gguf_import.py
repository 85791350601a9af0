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
    raw = np.zeros((64, 144), np.uint8)  # 64 rows of one Q4_K super-block (256 weights, 144 bytes)
    _tiny_gguf(src, [("token_embd.weight", raw, QT.Q4_K)])
    with pytest.raises(GGUFError, match="Q4_K"):
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
