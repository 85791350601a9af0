"""The one resolver: locate() says what a name or path refers to without writing anything; resolve() is locate
plus the import a GGUF needs; plan, run, show and the server agree on what a name means."""

from __future__ import annotations

import json
import shutil

import pytest

from lmcli.errors import ModelFileError, ModelNotFound, StoreError
from lmcli.store import in_store, locate, models_dir, resolve, validate_name


@pytest.fixture
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("LMCLI_HOME", str(h))
    return h


def _files(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


def test_locate_writes_nothing_and_resolve_imports_once(home, smol_gguf, tmp_path):
    loc = locate("smollm2")
    assert (loc.kind, loc.path, loc.name) == ("gguf", smol_gguf, "smollm2")
    copy = tmp_path / "My Model.Q4_1.gguf"
    shutil.copy(smol_gguf, copy)
    loc = locate(str(copy))
    assert (loc.kind, loc.path, loc.name) == ("gguf", copy, "My-Model.Q4_1")
    assert locate("olmoe").kind == "registry" and locate("olmoe").entry.name == "olmoe"
    assert _files(home) == []  # nothing imported, nothing created
    assert not in_store("smollm2")
    path = resolve("smollm2")
    assert in_store("smollm2") and path == models_dir() / "smollm2" / "model.lmc"
    assert locate("smollm2") == type(loc)("container", path, "smollm2")
    assert locate(str(path.parent)).path == path and locate(str(path)).path == path
    before = path.stat().st_mtime_ns
    assert resolve("smollm2") == path and path.stat().st_mtime_ns == before  # reused, not imported again


def test_an_interrupted_pull_is_named_with_the_command_that_resumes_it(home):
    partial = home / "models" / "olmoe" / ".partial"
    partial.mkdir(parents=True)
    (partial / "state.json").write_text(json.dumps({"spec": "allenai/OLMoE-1B-7B-0924-Instruct"}))
    assert locate("olmoe").kind == "partial"
    with pytest.raises(ModelNotFound, match="interrupted") as e:
        resolve("olmoe")
    assert e.value.hint == "run `lmcli pull allenai/OLMoE-1B-7B-0924-Instruct --name olmoe` to resume it"
    from lmcli.doctor import plan

    assert plan("olmoe", memory="16G")["source"].startswith("registry notes")  # plan still plans it


@pytest.mark.parametrize("name", ["smollm2\n", "a/b/c", "a/b\n", "../b", "a/..", "a/b:", "a/b:Q4\n", "/b", "..x",
                                  "x" * 65, ""])
def test_names_are_whole_matches(home, name):
    """Issue 19 (8): a name ending in a newline matched `$` and was stored under a name rm could not find."""
    assert not in_store(name)
    with pytest.raises(StoreError, match="invalid model name"):
        validate_name(name)
    with pytest.raises((ModelNotFound, StoreError)):
        resolve(name)


def test_a_pulled_repo_is_named_as_pulled_and_never_a_registry_name():
    """Issue 18 (3): `pull org/repo` stored the model as `repo`, which could shadow a registry short name."""
    from lmcli.registry import load_registry
    from lmcli.store import hub_name, is_name

    assert is_name("org/repo") and is_name("org/repo:Q4_K_M") and is_name("smollm2")
    assert hub_name("org/repo") == hub_name("https://huggingface.co/org/repo") == "org/repo"
    assert hub_name("org/repo@v1") == "org/repo"
    assert hub_name("hf.co/org/repo-GGUF:q4_k_m") == "org/repo-GGUF:Q4_K_M"
    assert hub_name("smollm2") is None and hub_name("a/b/c") is None
    assert not any("/" in name for name in load_registry())  # so no pulled name is a registry name


def test_a_hub_name_never_pulled_says_to_pull_it(home):
    with pytest.raises(ModelNotFound) as e:
        resolve("hf.co/org/repo-GGUF:q4_0")
    assert "'org/repo-GGUF:Q4_0' is not in the store" in str(e.value)
    assert e.value.hint == "pull it first: `lmcli pull hf.co/org/repo-GGUF:q4_0`"


def test_what_a_killed_writer_left_is_removed_by_the_next_store_command(home, smol_gguf, tmp_path):
    """Issue 19 (11): kill -9 left hidden temporaries nothing removed. Dead writers' go; a live process's stay."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    d = home / "models" / "smollm2"
    (d / ".partial").mkdir(parents=True)
    stale = [d / f".model.lmc.{dead}.tmp", d / f".manifest.json.{dead}.tmp", d / ".partial" / f".x.{dead}.tmp"]
    live = d / f".model.lmc.{os.getppid()}.tmp"
    for p in (*stale, live):
        p.write_bytes(b"x" * 1000)
    resolve("smollm2")  # imports under the model's lock
    assert not any(p.exists() for p in stale) and live.exists()
    # beside a quantize or export target outside the store: the next write of that file cleans up
    from quant.container import ContainerWriter

    left = tmp_path / f".out.lmc.{dead}.tmp"
    left.write_bytes(b"x")
    with ContainerWriter(tmp_path / "out.lmc") as w:
        w.begin({})
        w.finish()
    assert not left.exists() and (tmp_path / "out.lmc").exists()


def test_an_unfinished_pulls_file_is_refused_by_path(home, smol_container):
    partial = home / "models" / "m" / ".partial"
    partial.mkdir(parents=True)
    part = partial / "model.lmc.part"
    shutil.copy(smol_container, part)  # a pre-sized container has a valid header and zero weights
    for p in (part, shutil.copy(smol_container, partial / "x.lmc")):
        with pytest.raises(ModelFileError, match="unfinished pull"):
            locate(str(p))


def test_a_gguf_run_from_two_paths_is_stored_once_and_says_so(home, smol_gguf, tmp_path):
    """Issue 18 (4): each new path of the same GGUF was silently copied into the store again."""
    import os
    import subprocess
    import sys

    a, b = tmp_path / "a" / "smol.gguf", tmp_path / "b" / "other-name.gguf"
    for p in (a, b):
        p.parent.mkdir()
        os.link(smol_gguf, p) if os.stat(smol_gguf).st_dev == os.stat(tmp_path).st_dev else p.write_bytes(
            smol_gguf.read_bytes())
    env = dict(os.environ, LMCLI_HOME=str(home))
    run = [sys.executable, "-m", "lmcli.cli", "run"]
    r1 = subprocess.run(run + [str(a), "hi", "--raw", "-n", "1", "--temp", "0"], env=env, capture_output=True,
                        text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr
    assert "imported smol.gguf into the store as 'smol'" in r1.stderr
    r2 = subprocess.run(run + [str(b), "hi", "--raw", "-n", "1", "--temp", "0"], env=env, capture_output=True,
                        text=True, timeout=300)
    assert r2.returncode == 0 and r2.stdout == r1.stdout, r2.stderr
    assert "same bytes as the store's model 'smol'" in r2.stderr
    r3 = subprocess.run(run + [str(a), "hi", "--raw", "-n", "1", "--temp", "0"], env=env, capture_output=True,
                        text=True, timeout=300)
    assert r3.returncode == 0 and "imported" not in r3.stderr  # reused, silently
    assert sorted(p.name for p in (home / "models").iterdir()) == ["smol"]
