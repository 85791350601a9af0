"""The container: round trip, and every declared size and offset validated before anything is mapped."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from quant.container import MAGIC, Container, ContainerWriter
from quant.errors import ContainerError
from quant.formats import ALIGN, F32, Q4_0, Q8_0
from quant.quantize import dequantize_interleaved, quantize_matrix


def _write(path, rng=None):
    rng = rng or np.random.default_rng(0)
    a = rng.standard_normal((100, 64)).astype(np.float32)
    e = [rng.standard_normal((64, 32)).astype(np.float32) for _ in range(3)]
    v = rng.standard_normal(64).astype(np.float32)
    with ContainerWriter(path) as w:
        w.plan("a", Q4_0, (100, 64))
        w.plan("v", F32, (64,))
        w.plan_experts([("gate", Q8_0, (64, 32)), ("up", Q4_0, (64, 32))], n_expert=3)
        w.begin({"config": {"x": 1}, "pad": "x" * 64})
        w.write("a", *quantize_matrix(a, Q4_0))
        w.write("v", v)
        for i in range(3):
            w.write("gate", *quantize_matrix(e[i], Q8_0), expert=i)
            w.write("up", *quantize_matrix(e[i], Q4_0), expert=i)
        w.finish()
    return a, v, e


def test_round_trip_keeps_metadata_and_tensors(tmp_path):
    p = tmp_path / "m.lmc"
    a, v, e = _write(p)
    c = Container(p)
    assert c.metadata["config"] == {"x": 1}
    assert np.array_equal(c.vector("v"), v)
    codes, scales = c.matrix("a")
    ref_codes, ref_scales = quantize_matrix(a, Q4_0)
    assert np.array_equal(codes, ref_codes) and np.array_equal(scales, ref_scales)
    g1 = dequantize_interleaved(*c.matrix("gate", expert=1), Q8_0, 64, 32)
    assert np.array_equal(g1, dequantize_interleaved(*quantize_matrix(e[1], Q8_0), Q8_0, 64, 32))


def test_every_tensor_and_expert_bundle_is_page_aligned_and_contiguous(tmp_path):
    p = tmp_path / "m.lmc"
    _write(p)
    c = Container(p)
    gate, up = c.info("gate"), c.info("up")
    assert all(t.offset % ALIGN == 0 for t in (c.info("a"), c.info("v"), gate))
    assert up.offset % 64 == 0
    assert gate.stride == up.stride and gate.stride % ALIGN == 0
    # up of expert e sits right after gate of expert e inside the same bundle
    assert gate.offset < up.offset < gate.offset + gate.stride
    assert up.offset + up.nbytes <= gate.offset + gate.stride


def test_writer_refuses_out_of_order_calls_and_overwrites(tmp_path):
    p = tmp_path / "m.lmc"
    w = ContainerWriter(p)
    with pytest.raises(ContainerError):
        w.write("a", np.zeros(4, np.float32))
    w.plan("v", F32, (4,))
    w.begin({})
    with pytest.raises(ContainerError):
        w.plan("late", F32, (4,))
    with pytest.raises(ContainerError):
        w.finish()  # v not written
    assert not p.exists() and not list(tmp_path.iterdir())  # nothing half-written left behind
    _write(p)
    with pytest.raises(ContainerError, match="exists"):
        ContainerWriter(p)


def _header(p):
    raw = p.read_bytes()
    hlen = struct.unpack_from("<Q", raw, 16)[0]
    return raw, json.loads(raw[24 : 24 + hlen]), hlen


def _rewrite(p, header, raw, hlen):
    # keep the header length (so data offsets stay valid) by shrinking the metadata's filler string
    header["metadata"]["pad"] = ""
    new = json.dumps(header, separators=(",", ":")).encode()
    header["metadata"]["pad"] = "x" * (hlen - len(new))
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) == hlen
    p.write_bytes(raw[:24] + new + raw[24 + hlen :])


def test_truncated_file_is_rejected(tmp_path):
    p = tmp_path / "m.lmc"
    _write(p)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ContainerError, match="truncated|past the end"):
        Container(p)


def test_out_of_range_offset_is_rejected(tmp_path):
    p = tmp_path / "m.lmc"
    _write(p)
    raw, h, hlen = _header(p)
    h["tensors"][0]["offset"] = 1 << 40
    _rewrite(p, h, raw, hlen)
    with pytest.raises(ContainerError, match="past the end"):
        Container(p)


@pytest.mark.parametrize("field,value,msg", [
    ("nbytes", 12, "declares"), ("offset", 4097 * 3, "misaligned"), ("shape", [100, 65], "multiple"),
    ("format", "iq2_s", "unknown format"), ("shape", [-1, 64], "dimension"),
])
def test_inconsistent_index_entries_are_rejected(tmp_path, field, value, msg):
    p = tmp_path / "m.lmc"
    _write(p)
    raw, h, hlen = _header(p)
    h["tensors"][0][field] = value
    _rewrite(p, h, raw, hlen)
    with pytest.raises(ContainerError, match=msg):
        Container(p)


def test_overlapping_tensors_are_rejected(tmp_path):
    p = tmp_path / "m.lmc"
    _write(p)
    raw, h, hlen = _header(p)
    h["tensors"][1]["offset"] = h["tensors"][0]["offset"]
    _rewrite(p, h, raw, hlen)
    with pytest.raises(ContainerError, match="overlap"):
        Container(p)


def test_bad_magic_and_header_length_are_rejected(tmp_path):
    p = tmp_path / "x.lmc"
    p.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(ContainerError, match="not an lmcli container"):
        Container(p)
    p.write_bytes(MAGIC + struct.pack("<IIQ", 1, 0, 1 << 50))
    with pytest.raises(ContainerError, match="header"):
        Container(p)


def test_llama_cpp_cannot_mistake_a_container_for_gguf(tmp_path):
    p = tmp_path / "m.lmc"
    _write(p)
    assert p.read_bytes()[:4] != b"GGUF"
    from gguf import GGUFReader

    with pytest.raises(Exception):
        GGUFReader(str(p))
