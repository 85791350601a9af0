"""One EngineOptions value from the caller to the engine; the faces (CLI, chat, server) read generation
events and never the engine's state."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import lmcli
from lmcli.engine.options import EngineOptions

LMCLI = Path(__file__).resolve().parent.parent / "lmcli"


def test_fields_over_an_options_value_and_unknown_names_refused():
    base = EngineOptions(n_ctx=64, moe_topk=2)
    opts = EngineOptions.of(base, threads=1)
    assert (opts.n_ctx, opts.moe_topk, opts.threads) == (64, 2, 1) and base.threads is None
    assert EngineOptions.of(None) == EngineOptions()
    with pytest.raises(TypeError, match="'ctx_size'"):
        EngineOptions.of(base, ctx_size=64)
    with pytest.raises(TypeError, match="'nctx'"):  # before the (missing) model is even looked for
        lmcli.load("no-such-model-anywhere", nctx=64)


def test_keywords_and_an_options_value_load_the_same_engine(smol_container):
    a = lmcli.load(str(smol_container), n_ctx=96, threads=1)
    b = lmcli.load(str(smol_container), EngineOptions(n_ctx=96, threads=1))
    assert a.options == b.options == EngineOptions(n_ctx=96, threads=1, kv_type="f32")  # resolved: the default
    assert a.transformer.options is a.options and a.n_ctx == a.new_cache().n_ctx == 96
    c = lmcli.load(str(smol_container), EngineOptions(threads=1), n_ctx=32)  # keywords win over the value
    assert c.options.n_ctx == c.n_ctx == 32


@pytest.mark.parametrize("face", ["cli.py", "repl.py", "server.py", "bench.py"])
def test_faces_do_not_reach_into_the_engine(face):
    src = (LMCLI / face).read_text(encoding="utf-8")
    # the engine's state: routing counters, the trace switch, the expert cache; and patching its functions
    for pattern in (r"\b(transformer|tr)\.(stats|expert_cache)\b", r"\.trace\s*=", r"\.hist\[:?\]\s*=",
                    r"\bphase_timer\b", r"setattr\("):
        assert not re.search(pattern, src), (face, pattern)
