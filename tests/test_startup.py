"""What `lmcli run` loads on its way to the first token: no module it does not use (each costs start-up time on
every run), checked by the interpreter's own import log (python -X importtime)."""

from __future__ import annotations

import os
import subprocess
import sys

# Used by other commands (pull, serve, convert, show) or by tests, never by `run` on a converted model.
NOT_FOR_RUN = ("torch", "transformers", "huggingface_hub", "starlette", "uvicorn", "fastapi", "httpx", "requests",
               "rich", "gguf", "safetensors", "sentencepiece", "llguidance", "llama_cpp", "lmcli.server",
               "lmcli.hub", "lmcli.repl", "quant.convert", "quant.gguf_io", "quant.quantize")


def imported_by(args: list[str], home) -> set[str]:
    env = dict(os.environ, LMCLI_HOME=str(home))
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "lmcli.cli", *args], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}


def test_run_imports_nothing_it_does_not_use(lmcli_home):
    mods = imported_by(["run", "smollm2", "What is the capital of France?", "-n", "2", "--temp", "0"], lmcli_home)
    assert {"numba", "tokenizers", "lmcli.engine.model"} <= mods  # the log is read right: these it does need
    assert sorted(m for m in mods if m.split(".")[0] in NOT_FOR_RUN or m in NOT_FOR_RUN) == []


def test_run_keeps_the_built_tokenizer_beside_the_model_in_the_store(lmcli_home):
    from lmcli.store import TOKENIZER_CACHE, resolve

    imported_by(["run", "smollm2", "Hi", "-n", "1", "--temp", "0"], lmcli_home)
    assert (resolve("smollm2").parent / TOKENIZER_CACHE).is_file()
