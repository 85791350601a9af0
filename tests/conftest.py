"""Shared fixtures: the packaged SmolLM2 GGUF, its imported container, and an isolated LMCLI_HOME."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("NUMBA_NUM_THREADS", "2")


def _llama_cpp_without_amx_buffers() -> None:
    """llama.cpp (llama-cpp-python 0.3.36) dies with SIGSEGV at its first AMX instruction (ldtilecfg) on a virtual
    machine whose CPU lists amx_tile (seen on Sapphire Rapids guests): its extra buffer types (AMX and repacked
    weights) are turned off there, as `use_extra_bufts=False` does, so llama.cpp runs its plain CPU kernels on the
    same file. Other machines keep llama.cpp's defaults."""
    try:
        with open("/proc/cpuinfo") as f:
            if "amx_tile" not in f.read():
                return
        import llama_cpp
        import llama_cpp.llama
    except (OSError, ImportError):
        return
    base = llama_cpp.llama_model_default_params

    def params():
        p = base()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = llama_cpp.llama.llama_cpp.llama_model_default_params = params


_llama_cpp_without_amx_buffers()


@pytest.fixture(scope="session")
def ggml():
    """llama.cpp's libggml (as llama-cpp-python ships it) with ggml_quantize_chunk / ggml_quantize_init typed: the
    reference quantizer the encoders' tests compare bytes with."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    from lmcli.registry import load_registry
    from lmcli.store import packaged_file

    return packaged_file(load_registry()["smollm2"].packaged)


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


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a tmpfs of that many bytes (needs root; skipped otherwise)."""
    mounts = []

    def mount(size: int) -> Path:
        d = tmp_path / f"disk{len(mounts)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        mounts.append(d)
        return d

    yield mount
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)
