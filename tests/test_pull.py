"""`lmcli pull` against a fake Hub (tests/hub_server.py) that the real huggingface_hub client talks to.

The reference for every successful pull: the same safetensors directory quantized locally with `lmcli quantize`
(identical tensor bytes, identical logits). Every fault ends in that model or in a one-line error with a
non-zero exit and the store as it was (nothing listed, nothing runnable), and a later pull resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tiny_models
from hub_server import FakeHub, Faults

from quant.container import Container

REPO = "org/tiny-moe"
TOKEN = "hf_test_token_for_the_fake_hub"
BIG_SHARD, BUFFER = "buffers.safetensors", "model.layers.0.self_attn.rotary_emb.inv_freq"
DECOYS = {"pytorch_model.bin": b"\x80\x04 not to be unpickled", "modeling_tiny.py": b"raise SystemExit\n",
          "README.md": b"# tiny\n"}


# --- fixtures: a sharded tiny MoE model, its local quantization, the fake Hub -----------------------


def reshard(src: Path, out: Path, budget: int) -> Path:
    """Rewrite a model's tensors into shards of about `budget` bytes in name order, so that one layer's experts
    (one container tensor) land in different shards, with a matching index."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if cur and size + n > budget:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = tensors[k], size + n
    shards.append(cur)
    out.mkdir(parents=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    for f in src.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    built = tiny_models.build("qwen2_moe", root / "built", dtype="bfloat16")
    out = reshard(built, root / "model", 48_000)
    wm = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    spread = {wm[f"model.layers.{i}.mlp.experts.{e}.gate_proj.weight"] for i in (1, 2) for e in range(8)}
    assert len(set(wm.values())) >= 8 and len(spread) >= 2  # a container tensor drawn from two shards
    return out


@pytest.fixture(scope="module")
def shards(model_dir) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


@pytest.fixture(scope="module")
def big_dir(model_dir, tmp_path_factory) -> Path:
    """The same model plus a 12 MB shard holding a recomputed buffer (rotary_emb.inv_freq) that conversion drops:
    big enough for huggingface_hub to resume it with a Range request (it writes in 10 MiB chunks)."""
    from safetensors.numpy import save_file

    out = tmp_path_factory.mktemp("big") / "model"
    shutil.copytree(model_dir, out)
    save_file({BUFFER: np.random.default_rng(0).standard_normal(3_000_000, dtype=np.float32)}, out / BIG_SHARD)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"][BUFFER] = BIG_SHARD
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.lmc"
    r = subprocess.run([sys.executable, "-m", "lmcli.cli", "quantize", str(model_dir), str(out), "--type", "q4_0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory) -> dict[str, bytes]:
    """A tiny dense model as GGUF files of two quant types (lmcli quantize, then lmcli export)."""
    from quant.convert import convert_hf
    from quant.gguf_export import export_gguf

    root = tmp_path_factory.mktemp("gguf")
    src = tiny_models.build("llama", root / "llama")
    out = {}
    for q in ("q4_0", "q8_0"):
        convert_hf(src, root / f"{q}.lmc", q)
        out[f"tiny-{q.upper()}.gguf"] = export_gguf(root / f"{q}.lmc", root / f"tiny-{q.upper()}.gguf").read_bytes()
    return out


def split_gguf(src: Path, out: Path, per_part: int) -> list[Path]:
    """src rewritten as a split GGUF as llama.cpp's gguf-split writes one (the gguf package's writer: the metadata
    in the first part, split.no / split.count / split.tensors.count in each, at most per_part tensors a part)."""
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(None, r.fields["general.architecture"].contents(), split_max_tensors=per_part)
    for f in r.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=np.asarray(t.data).shape, raw_dtype=t.tensor_type)
    w.write_header_to_file(out)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(out.parent.glob(f"{out.stem}-*-of-*.gguf"))


@pytest.fixture(scope="module")
def split_parts(gguf_files, tmp_path_factory) -> tuple[Path, list[Path]]:
    """tiny-Q8_0.gguf and the same model split in three parts."""
    root = tmp_path_factory.mktemp("split")
    whole = root / "tiny-Q8_0.gguf"
    whole.write_bytes(gguf_files["tiny-Q8_0.gguf"])
    (root / "parts").mkdir()
    parts = split_gguf(whole, root / "parts" / "tiny-Q8_0.gguf", 7)
    assert [p.name for p in parts] == [f"tiny-Q8_0-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    return whole, parts


# Types lmcli does not import (chosen at run time from gguf's list, so that a type becoming supported keeps the
# test meaningful): the file holds 3 tensors of the first, 2 of the second.
_NEVER = ("TQ1_0", "TQ2_0", "IQ1_M", "IQ1_S", "IQ2_S", "IQ3_S", "IQ2_XS", "IQ2_XXS", "IQ3_XXS", "Q8_1", "Q8_K")


def unsupported_types() -> list:
    from gguf import GGMLQuantizationType as QT

    from quant.formats import BY_GGUF_TYPE

    return [QT[n] for n in _NEVER if n in QT.__members__ and int(QT[n]) not in BY_GGUF_TYPE][:2]


def odd_gguf(arch: str = "llama") -> bytes:
    """A GGUF lmcli cannot import: a 9,000-token vocabulary (its header takes several Range requests), tensors of
    two unsupported types, and 4 MB of F32 weights after the header."""
    import tempfile

    from gguf import GGML_QUANT_SIZES, GGUFWriter

    a, b = unsupported_types()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "odd.gguf"
        w = GGUFWriter(str(path), arch)
        w.add_block_count(1)
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"token{i}" for i in range(9000)])
        w.add_tensor("token_embd.weight", np.ones((1024, 1024), np.float32))
        for i, t in enumerate((a, a, a, b, b)):
            block, nbytes = GGML_QUANT_SIZES[t]
            raw = np.random.default_rng(i).integers(0, 256, (64, 2 * nbytes), dtype=np.uint8)  # 64 rows of 2 blocks
            w.add_tensor(f"blk.0.t{i}.weight", raw, raw_dtype=t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


@pytest.fixture(scope="module")
def hub(model_dir, big_dir, gguf_files, split_parts):
    h = FakeHub().start()
    h.add_repo("org/split-GGUF", {**{p.name: p.read_bytes() for p in split_parts[1]}, "README.md": b"# split\n"})
    h.add_repo("org/odd-GGUF", {"odd-IQX.gguf": odd_gguf(), "odd-Q8_0.gguf": gguf_files["tiny-Q8_0.gguf"]})
    h.add_repo("org/mamba-GGUF", {"mamba-F32.gguf": odd_gguf("mamba")})
    files = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    h.add_repo(REPO, {**files, **DECOYS})
    h.add_repo("org/big-moe", big_dir)
    h.add_repo("org/gated-moe", files, gated=True, token=TOKEN)
    h.add_repo("org/tiny-GGUF", {**gguf_files, "README.md": b"# gguf\n"})
    h.add_repo("org/pickles", {"config.json": files["config.json"], "tokenizer.json": files["tokenizer.json"],
                               "pytorch_model.bin": b"\x80\x04 pickle"})
    yield h
    h.stop()


@pytest.fixture(autouse=True)
def _fresh_faults(request):
    if "hub" in request.fixturenames:
        h = request.getfixturevalue("hub")
        h.faults = Faults()
        h.log.clear()


def env_for(hub: FakeHub, home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LMCLI_"))}
    env.update(LMCLI_HOME=str(home), HF_ENDPOINT=hub.url, HF_HOME=str(home.parent / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="10",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.update(extra)  # a test's settings over the defaults above
    return env


def pull(hub, home: Path, *args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmcli.cli", "pull", *args], env=env_for(hub, home, **(env or {})),
                          capture_output=True, text=True, timeout=120, **kw)


def start_pull(hub, home: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmcli.cli", "pull", *args], env=env_for(hub, home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_clean_failure(r, *words: str) -> None:
    stderr = r.stderr if isinstance(r.stderr, str) else r.stderr.read()
    assert r.returncode not in (0, None), stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for w in words:
        assert w in lines[0], lines[0]


def listed(home: Path, monkeypatch) -> list[str]:
    from lmcli import store

    monkeypatch.setenv("LMCLI_HOME", str(home))
    return [m["name"] for m in store.list_models()]


def assert_not_runnable(home: Path, name: str, monkeypatch) -> None:
    from lmcli import store
    from lmcli.errors import ModelNotFound

    monkeypatch.setenv("LMCLI_HOME", str(home))
    assert name not in listed(home, monkeypatch)
    with pytest.raises(ModelNotFound):
        store.resolve(name)


def snapshot(home: Path) -> list:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*")) if home.exists() else []


def assert_same_model(path: Path, reference: Path) -> None:
    """Tensor for tensor, the same bytes as `lmcli quantize` wrote."""
    a, b = Container(path), Container(reference)
    assert a.tensors.keys() == b.tensors.keys()
    for name in b.tensors:
        assert (a.info(name).fmt, a.info(name).shape) == (b.info(name).fmt, b.info(name).shape)
        assert np.array_equal(a.raw(name), b.raw(name)), name
    assert a.metadata["config"] == b.metadata["config"] and a.metadata["tokenizer"] == b.metadata["tokenizer"]


# --- the happy path ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pulled(hub, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, list]:
    home = tmp_path_factory.mktemp("pulled") / "home"
    hub.log.clear()
    r = pull(hub, home, REPO)
    return home, r, list(hub.log)


def test_pull_gives_the_model_lmcli_quantize_gives_with_equal_logits(pulled, reference):
    import lmcli

    home, r, _ = pulled
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # silent on a pipe
    path = home / "models" / "org" / "tiny-moe" / "model.lmc"
    assert r.stdout.strip().endswith(str(path))
    assert_same_model(path, reference)
    ids = [1, 5, 17, 42, 99, 200, 7, 3, 250, 11]
    assert np.array_equal(lmcli.load(str(path)).logits(ids), lmcli.load(str(reference)).logits(ids))


def test_the_name_you_pull_is_the_name_you_run(pulled, hub):
    """Issue 18 (3): `lmcli pull org/repo` then `lmcli run org/repo` (and show) found "no such file"."""
    home, _, _ = pulled
    r = subprocess.run([sys.executable, "-m", "lmcli.cli", "run", REPO, "hello", "--raw", "-n", "3", "--temp", "0"],
                       env=env_for(hub, home), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    r = subprocess.run([sys.executable, "-m", "lmcli.cli", "show", f"hf.co/{REPO}", "--json"], env=env_for(hub, home),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == REPO, r.stderr


def test_the_server_serves_a_pulled_model_by_the_name_it_was_pulled_with(pulled, monkeypatch):
    import httpx

    from lmcli.server import create_app
    from test_server import running

    home, _, _ = pulled
    monkeypatch.setenv("LMCLI_HOME", str(home))
    with running(create_app(None, n_ctx=128, log=lambda line: None)) as url:
        for name in (REPO, f"hf.co/{REPO}"):
            r = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2},
                           timeout=120)
            assert r.status_code == 200, r.text
        assert REPO in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]


def test_pull_fetches_only_the_needed_files_and_records_what_it_verified(pulled, hub, shards):
    home, r, log = pulled
    assert r.returncode == 0, r.stderr
    requested = {e["file"] for e in log if e["file"]}
    assert not requested & set(DECOYS)  # no pickles, no code, no README
    assert {s.name for s in shards} <= requested
    d = home / "models" / "org" / "tiny-moe"
    # sources deleted (tokenizer.cache.json is written by the first run of the model, which other tests of this
    # fixture make)
    left = sorted(p.name for p in d.iterdir() if p.name != "tokenizer.cache.json")
    assert left == [".lock", "manifest.json", "model.lmc"]
    man = json.loads((d / "manifest.json").read_text())
    src = man["source"]
    assert (src["repo"], src["commit"], src["revision"], man["quant"]) == (REPO, hub.repos[REPO].commit, "main", "q4_0")
    import hashlib

    for s in shards:
        assert src["files"][s.name] == {"size": s.stat().st_size, "sha256": hashlib.sha256(s.read_bytes()).hexdigest()}
    assert man["size"] == (d / "model.lmc").stat().st_size and man["created"]


def test_pulling_again_downloads_nothing(pulled, hub, shards):
    home, _, _ = pulled
    r = pull(hub, home, REPO)
    assert r.returncode == 0, r.stderr
    assert all(hub.downloads(s.name) == 0 for s in shards)


def test_another_type_replaces_a_model_only_with_force(hub, tmp_path):
    home = tmp_path / "home"
    assert pull(hub, home, REPO).returncode == 0
    assert_clean_failure(pull(hub, home, REPO, "--type", "q8_0"), "already exists")
    r = pull(hub, home, REPO, "--type", "q8_0", "--force")
    assert r.returncode == 0, r.stderr
    d = home / "models" / "org" / "tiny-moe"
    assert json.loads((d / "manifest.json").read_text())["quant"] == "q8_0"
    assert Container(d / "model.lmc").metadata["quant"]["type"] == "q8_0"


def test_pull_with_the_moe_mix_gives_what_quantize_gives_and_is_its_own_record(hub, tmp_path, model_dir):
    """--mix moe over the Hub equals `lmcli quantize --mix moe` tensor for tensor; a uniform pull of the same repo
    is another model (already exists), and the mix pulled again downloads nothing."""
    ref = tmp_path / "mix.lmc"
    r = subprocess.run([sys.executable, "-m", "lmcli.cli", "quantize", str(model_dir), str(ref), "--mix", "moe"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    home = tmp_path / "home"
    r = pull(hub, home, REPO, "--mix", "moe")
    assert r.returncode == 0, r.stderr
    path = home / "models" / "org" / "tiny-moe" / "model.lmc"
    assert_same_model(path, ref)
    assert {t.fmt.name for n, t in Container(path).tensors.items() if ".attn_" in n and len(t.shape) == 2} == {"q8_0"}
    hub.log.clear()
    assert pull(hub, home, REPO, "--mix", "moe").returncode == 0
    assert not any(".safetensors" in line for line in map(str, hub.log))
    assert_clean_failure(pull(hub, home, REPO), "already exists")
    assert_clean_failure(pull(hub, home, "hf.co/org/tiny-GGUF:Q8_0", "--mix", "moe"), "does not apply")


def test_pull_of_a_llama_cpp_file_type_gives_what_quantize_gives(hub, tmp_path, model_dir):
    """--type q4_k_m over the Hub (shard by shard) equals `lmcli quantize --type q4_k_m` tensor for tensor (this
    model's 64-wide rows fall back to Q5_0 / Q8_0 as llama.cpp's do); the manifest records the type; --mix does not
    combine with a file type."""
    ref = tmp_path / "km.lmc"
    r = subprocess.run([sys.executable, "-m", "lmcli.cli", "quantize", str(model_dir), str(ref), "--type", "q4_k_m"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "kept at q5_0, their rows not whole q4_k blocks" in r.stdout
    home = tmp_path / "home"
    r = pull(hub, home, REPO, "--type", "q4_k_m")
    assert r.returncode == 0, r.stderr
    d = home / "models" / "org" / "tiny-moe"
    assert_same_model(d / "model.lmc", ref)
    assert json.loads((d / "manifest.json").read_text())["quant"] == "q4_k_m"
    assert Container(d / "model.lmc").metadata["quant"]["mix"] == "llama.cpp"
    assert_clean_failure(pull(hub, tmp_path / "h2", REPO, "--type", "q4_k_m", "--mix", "moe"), "does not combine")


def test_a_pinned_revision_is_recorded_and_keep_source_keeps_the_verified_files(hub, tmp_path, shards, reference):
    commit = hub.repos[REPO].commit
    home = tmp_path / "home"
    r = pull(hub, home, f"{REPO}@{commit}", "--name", "pinned", "--keep-source")
    assert r.returncode == 0, r.stderr
    d = home / "models" / "pinned"
    man = json.loads((d / "manifest.json").read_text())
    assert man["source"]["revision"] == man["source"]["commit"] == commit
    assert all((d / "source" / s.name).read_bytes() == s.read_bytes() for s in shards)
    assert not (d / ".partial").exists()
    assert_same_model(d / "model.lmc", reference)


# --- faults -------------------------------------------------------------------------------------------


def test_a_connection_cut_mid_file_is_resumed_with_a_range_request(hub, tmp_path, reference):
    hub.faults.cut[BIG_SHARD] = 11 << 20
    r = pull(hub, tmp_path / "home", "org/big-moe")
    assert r.returncode == 0, r.stderr
    assert [e["range"] for e in hub.requests(BIG_SHARD)][-2:] == [None, f"bytes={10 << 20}-"]
    assert r.stderr == ""
    assert_same_model(tmp_path / "home" / "models" / "org" / "big-moe" / "model.lmc", reference)


def test_a_server_ignoring_range_gets_the_whole_file_again(hub, tmp_path, reference):
    hub.faults.cut[BIG_SHARD] = 11 << 20
    hub.faults.ignore_range = True  # the header probes and the resume get whole files (200) too
    r = pull(hub, tmp_path / "home", "org/big-moe")
    assert r.returncode == 0, r.stderr
    assert [e["range"] for e in hub.requests(BIG_SHARD)][-2:] == [None, f"bytes={10 << 20}-"]
    assert_same_model(tmp_path / "home" / "models" / "org" / "big-moe" / "model.lmc", reference)


def test_a_failed_download_leaves_no_model_and_the_next_pull_resumes(hub, tmp_path, shards, reference, monkeypatch):
    home, k = tmp_path / "home", 4
    hub.faults.cut[shards[k].name] = 10_000
    hub.faults.fail_after_cut = True  # the resumed request gets 503: the pull gives up
    r = pull(hub, home, REPO)
    assert_clean_failure(r, "503")
    assert_not_runnable(home, REPO, monkeypatch)
    hub.faults = Faults()
    r = pull(hub, home, REPO)
    assert r.returncode == 0, r.stderr
    assert [hub.downloads(s.name) for s in shards[:k]] == [1] * k  # finished shards are not fetched again
    assert_same_model(home / "models" / "org" / "tiny-moe" / "model.lmc", reference)


def test_a_hub_that_stalls_on_a_header_range_request_is_an_error_not_a_hang(hub, tmp_path, shards, reference,
                                                                            monkeypatch):
    """Issue 19 (5): the first Range request of a shard (its safetensors header) had no timeout."""
    import time

    home = tmp_path / "home"
    hub.faults.stall_range.add(shards[0].name)
    t = time.monotonic()
    r = pull(hub, home, REPO, env={"HF_HUB_DOWNLOAD_TIMEOUT": "2"})
    assert time.monotonic() - t < 25  # the server holds the connection for 30 s
    assert_clean_failure(r, "cannot reach the Hub")
    assert_not_runnable(home, REPO, monkeypatch)
    hub.faults = Faults()
    r = pull(hub, home, REPO)
    assert r.returncode == 0, r.stderr
    assert_same_model(home / "models" / "org" / "tiny-moe" / "model.lmc", reference)


def test_corrupted_bytes_are_refused_and_nothing_is_published(hub, tmp_path, shards, reference, monkeypatch):
    home, victim = tmp_path / "home", shards[5]
    hub.faults.corrupt.add(victim.name)
    r = pull(hub, home, REPO)
    assert_clean_failure(r, victim.name, "corrupt")
    assert_not_runnable(home, REPO, monkeypatch)
    assert not [p for p in home.rglob(victim.name)]  # the bad file is gone
    hub.faults = Faults()
    r = pull(hub, home, REPO)
    assert r.returncode == 0, r.stderr
    assert_same_model(home / "models" / "org" / "tiny-moe" / "model.lmc", reference)


@pytest.mark.parametrize("spec, words", [
    ("org/missing", ["org/missing", "not found"]),
    ("org/gated-moe", ["gated", "HF_TOKEN"]),
    (f"{REPO}@no-such-branch", ["revision", "no-such-branch"]),
    ("hf.co/org/tiny-GGUF:Q5_K_M", ["no GGUF file", "Q5_K_M"]),
    ("org/pickles", ["pickle"]),
    ("not a repo/x y", ["repo id"]),
    ("hf.co/org/mamba-GGUF:F32", ["architecture 'mamba' is not supported", "nothing was downloaded"]),
])
def test_refusals_are_one_line_and_leave_the_store_as_it_was(hub, tmp_path, spec, words):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    r = pull(hub, home, spec)
    assert_clean_failure(r, *words)
    assert snapshot(home) == ["models"]


def test_a_gated_repo_opens_with_hf_token(hub, tmp_path, reference):
    r = pull(hub, tmp_path / "home", "org/gated-moe", env={"HF_TOKEN": TOKEN})
    assert r.returncode == 0, r.stderr
    assert_same_model(tmp_path / "home" / "models" / "org" / "gated-moe" / "model.lmc", reference)


def test_offline_mode_serves_the_store_and_refuses_to_download(pulled, hub, tmp_path):
    home, _, _ = pulled
    assert pull(hub, home, REPO, env={"HF_HUB_OFFLINE": "1"}).returncode == 0
    assert_clean_failure(pull(hub, tmp_path / "home", REPO, env={"HF_HUB_OFFLINE": "1"}), "HF_HUB_OFFLINE")
    assert hub.log == []


def test_ctrl_c_mid_pull_leaves_no_model_and_the_next_pull_resumes(hub, tmp_path, shards, reference, monkeypatch):
    home, k = tmp_path / "home", 5
    arrived, release = hub.hold(shards[k].name)
    p = start_pull(hub, home, REPO)
    try:
        assert arrived.wait(60)
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 130
    finally:
        release.set()
        if p.poll() is None:
            p.kill()
    assert_not_runnable(home, REPO, monkeypatch)
    r = pull(hub, home, REPO)
    assert r.returncode == 0, r.stderr
    assert [hub.downloads(s.name) for s in shards[:k]] == [1] * k
    assert_same_model(home / "models" / "org" / "tiny-moe" / "model.lmc", reference)


def test_two_pulls_at_once_make_one_good_model(hub, tmp_path, shards, reference):
    home = tmp_path / "home"
    arrived, release = hub.hold(shards[2].name)
    a = start_pull(hub, home, REPO)
    try:
        assert arrived.wait(60)
        b = start_pull(hub, home, REPO)
        deadline = time.monotonic() + 30
        while sum(e["path"].startswith("/api/models/") for e in hub.log) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # b has asked the Hub and now waits for a's lock
    finally:
        release.set()
    out_a, err_a = a.communicate(timeout=60)
    out_b, err_b = b.communicate(timeout=60)
    assert (a.returncode, b.returncode) == (0, 0), err_a + err_b
    assert out_a == out_b
    assert [hub.downloads(s.name) for s in shards] == [1] * len(shards)
    assert_same_model(home / "models" / "org" / "tiny-moe" / "model.lmc", reference)


# --- disk -------------------------------------------------------------------------------------------


def test_a_disk_too_small_is_refused_before_any_shard_is_downloaded(hub, small_disk, shards):
    home = small_disk(96 << 10) / "home"
    r = pull(hub, home, REPO)
    assert_clean_failure(r, "not enough disk space")
    assert snapshot(home) == ["models"]
    assert sum(hub.downloads(s.name) for s in shards) == 0


def test_a_disk_filling_up_mid_pull_fails_cleanly_and_the_pull_resumes(hub, small_disk, shards, reference,
                                                                       monkeypatch):
    disk, k = small_disk(1 << 20), 5
    home = disk / "home"
    arrived, release = hub.hold(shards[k].name)
    p = start_pull(hub, home, REPO)
    try:
        assert arrived.wait(60)
        filler = disk / "filler"  # something else fills the disk meanwhile
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - 8192))
    finally:
        release.set()
    p.wait(60)
    assert_clean_failure(p, "full")
    assert_not_runnable(home, REPO, monkeypatch)
    filler.unlink()
    r = pull(hub, home, REPO)
    assert r.returncode == 0, r.stderr
    assert [hub.downloads(s.name) for s in shards[:k]] == [1] * k
    assert_same_model(home / "models" / "org" / "tiny-moe" / "model.lmc", reference)


# The peak is sampled by an audit hook just before every unlink and rename (when a shard has just been converted
# and is about to be deleted, or a download is about to be renamed into place).
PEAK_PROBE = """
import os, sys
home, peak, busy = os.environ["LMCLI_HOME"], [0], [False]
def usage():
    return sum(os.lstat(os.path.join(r, f)).st_blocks * 512 for r, _, fs in os.walk(home) for f in fs)
def hook(event, args):
    if event in ("os.remove", "os.rename") and not busy[0]:
        busy[0] = True
        try:
            peak[0] = max(peak[0], usage())
        except OSError:
            pass
        finally:
            busy[0] = False
sys.addaudithook(hook)
from lmcli.cli import main
code = main(sys.argv[1:])
open(os.environ["PEAK_FILE"], "w").write(str(peak[0]))
sys.exit(code)
"""

# Stated margin over container + largest shard: the small source files (config, tokenizer, index), each rounded
# up to a 4 KiB block, plus 96 KiB for the checkpoint, the cached shard headers and huggingface_hub's notes (a
# few KiB each; measured here: peak 516 KB = container 397 KB + largest shard 49 KB + 70 KB of those).
MARGIN = 96 << 10


def test_peak_disk_stays_below_the_output_plus_the_largest_shard(hub, tmp_path, model_dir, shards):
    home, peak_file = tmp_path / "home", tmp_path / "peak"
    env = env_for(hub, home, PEAK_FILE=str(peak_file))
    r = subprocess.run([sys.executable, "-c", PEAK_PROBE, "pull", REPO], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    peak = int(peak_file.read_text())
    out = (home / "models" / "org" / "tiny-moe" / "model.lmc").stat().st_blocks * 512
    largest = max(s.stat().st_size for s in shards)
    small = sum(-(-p.stat().st_size // 4096) * 4096 for p in model_dir.iterdir() if p.suffix != ".safetensors")
    assert largest < peak <= out + largest + small + MARGIN, (peak, out, largest, small)
    assert peak < out + sum(s.stat().st_size for s in shards) // 2  # far from downloading everything first


# --- GGUF repos ---------------------------------------------------------------------------------------


def test_a_gguf_repo_file_is_picked_by_its_quant_tag_and_imported(hub, tmp_path, gguf_files):
    from quant.gguf_io import import_gguf

    home = tmp_path / "home"
    r = pull(hub, home, "hf.co/org/tiny-GGUF:q4_0")
    assert r.returncode == 0, r.stderr
    assert hub.downloads("tiny-Q4_0.gguf") == 1 and hub.downloads("tiny-Q8_0.gguf") == 0
    (tmp_path / "tiny-Q4_0.gguf").write_bytes(gguf_files["tiny-Q4_0.gguf"])
    ref = import_gguf(tmp_path / "tiny-Q4_0.gguf", tmp_path / "ref.lmc")
    assert_same_model(home / "models" / "org" / "tiny-GGUF:Q4_0" / "model.lmc", ref)


# --- the store's library functions (for list --json, show --json, cp, rm) --------------------------------


def test_list_show_copy_and_remove(pulled, tmp_path, monkeypatch):
    from lmcli import store

    home, _, _ = pulled
    work = tmp_path / "home"
    shutil.copytree(home, work)
    (work / "models" / "half" / ".partial").mkdir(parents=True)  # an interrupted pull
    monkeypatch.setenv("LMCLI_HOME", str(work))
    assert [m["name"] for m in store.list_models()] == [REPO]
    with pytest.raises(store.ModelNotFound, match="interrupted"):
        store.resolve("half")
    info = store.show_info(REPO)
    assert info["architecture"] == "qwen2_moe"
    assert info["experts"] == {"n_expert": 8, "n_expert_used": 2, "n_expert_shared": 1}
    assert 0 < info["parameters"]["active"] < info["parameters"]["total"]
    assert info["formats"]["experts"] == ["q4_0"] and info["formats"]["router"] == ["f32"]
    assert 0 < info["bytes_per_token"] < info["file_size"]
    assert info["context_length"] == 256 and info["chat_template"] == tiny_models.CHATML
    json.dumps(info)
    store.copy_model(REPO, "copy")
    assert [m["name"] for m in store.list_models()] == ["copy", REPO]
    assert store.show_info("copy")["parameters"] == info["parameters"]
    with pytest.raises(store.StoreError, match="exists"):
        store.copy_model(REPO, "copy")
    store.remove_model("copy")
    store.remove_model("half")
    with pytest.raises(store.ModelNotFound):  # an organisation's directory is not a model
        store.remove_model("org")
    assert sorted(p.name for p in (work / "models").iterdir()) == ["org"]
    store.remove_model(REPO)
    assert list((work / "models").iterdir()) == []  # the emptied organisation goes too


def test_spec_parsing():
    from lmcli.errors import UsageError
    from lmcli.hub import parse_spec

    s = parse_spec("mixtral")
    assert (s.repo, s.revision, s.name, s.qtype) == ("mistralai/Mixtral-8x7B-Instruct-v0.1", "main", "mixtral", "q4_0")
    s = parse_spec("Org/Some-Model@v1.0", qtype="q8_0")
    assert (s.repo, s.revision, s.name, s.qtype) == ("Org/Some-Model", "v1.0", "Org/Some-Model", "q8_0")
    s = parse_spec("hf.co/Org/Some-Model-GGUF:q4_k_m")  # named as pulled (issue 18), the tag as the Hub writes it
    assert (s.repo, s.gguf_tag, s.name) == ("Org/Some-Model-GGUF", "q4_k_m", "Org/Some-Model-GGUF:Q4_K_M")
    for bad in [dict(spec="a/b@x", revision="y"), dict(spec="hf.co/a/b:Q4_0", qtype="q4_0"),
                dict(spec="a/b", qtype="q3"), dict(spec="hf.co/a/b")]:
        with pytest.raises(UsageError):
            parse_spec(bad.pop("spec"), **bad)


def test_on_a_terminal_the_cli_hands_its_progress_display_to_the_pull(hub, tmp_path, reference):
    """The CLI chooses the display (Rich progress on a terminal) and passes it in, as quantize passes its bar."""
    import pexpect

    home = tmp_path / "home"
    c = pexpect.spawn(sys.executable, ["-m", "lmcli.cli", "pull", REPO], env=env_for(hub, home), encoding="utf-8",
                      timeout=120, dimensions=(40, 160))
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0, c.before
    assert "pulled" in c.before and "Traceback" not in c.before
    (stored,) = [p for p in (home / "models").rglob("model.lmc")]
    assert stored == home / "models" / REPO / "model.lmc"
    assert_same_model(stored, reference)


# --- GGUF headers read before any download (issue 17) ----------------------------------------------------------


def test_a_gguf_lmcli_cannot_import_is_refused_from_its_header_before_its_weights_are_downloaded(hub, tmp_path):
    """The refusal names every unsupported type with its count and what to do; the header came by Range requests
    (several: it is longer than the first), and the bytes served stop at the header (plus the stated read-ahead,
    quant.gguf_header.SLACK), far from the 4 MB of weights after it."""
    from gguf import GGUFReader

    from quant.gguf_header import SLACK

    data = hub.repos["org/odd-GGUF"].files["odd-IQX.gguf"]
    (tmp_path / "odd.gguf").write_bytes(data)
    data_offset = GGUFReader(str(tmp_path / "odd.gguf")).data_offset
    a, b = unsupported_types()
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    r = pull(hub, home, "hf.co/org/odd-GGUF:IQX")
    assert_clean_failure(r, "odd-IQX.gguf", f"{a.name} x3, {b.name} x2", "odd-Q8_0.gguf", "nothing was downloaded")
    assert snapshot(home) == ["models"]
    reqs = hub.requests("odd-IQX.gguf")
    assert len(reqs) >= 2 and all(e["range"] is not None for e in reqs)
    assert data_offset <= hub.sent("odd-IQX.gguf") <= data_offset + SLACK
    assert data_offset + SLACK < len(data) // 4


def test_a_remote_header_read_by_ranges_is_the_gguf_readers_and_stops_at_the_weights(smol_gguf):
    """On the real SmolLM2 file (a 49k-token vocabulary: a 1.8 MB header): the tensors and data offset the gguf
    package's reader finds, in a few requests that end no further than SLACK bytes into the weights."""
    from gguf import GGUFReader

    from quant.gguf_header import SLACK, read_header, read_remote_header

    data, calls = smol_gguf.read_bytes(), []

    def fetch(a: int, b: int) -> bytes:
        calls.append((a, b))
        return data[a:b]

    h = read_remote_header(fetch, len(data), "smol")
    r = GGUFReader(str(smol_gguf))
    assert h == read_header(smol_gguf) and h.data_offset == r.data_offset
    assert [(t.name, t.dims, t.ggml_type, h.data_offset + t.offset) for t in h.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset)) for t in r.tensors]
    assert h.values["general.architecture"] == "llama" and h.values["llama.block_count"] == 30
    assert 2 <= len(calls) <= 16 and h.data_offset <= max(b for _, b in calls) <= h.data_offset + SLACK
    assert sum(b - a for a, b in calls) <= h.data_offset + SLACK  # no byte asked for twice


TIMED_PULL = """
import sys, time
# the modules the pull uses, imported before the clock starts: the figure is the pull's own, not Python's start-up
import gguf, httpx2, numpy
from huggingface_hub import HfApi, hf_hub_url, errors
from huggingface_hub.utils import get_session
from lmcli import hub, store
from lmcli.errors import LmcliError
from quant import gguf_header, gguf_io
t = time.perf_counter()
try:
    hub.pull(sys.argv[1])
except LmcliError as e:
    print(f"{time.perf_counter() - t:.3f}")
    print(e)
"""


def test_the_header_refusal_takes_under_a_second(hub, tmp_path):
    """From the pull's start (the Hub's model info, the header's Range requests, the census) to its refusal."""
    r = subprocess.run([sys.executable, "-c", TIMED_PULL, "hf.co/org/odd-GGUF:IQX"], env=env_for(hub, tmp_path / "h"),
                       capture_output=True, text=True, timeout=120)
    seconds, message = r.stdout.splitlines()
    assert "cannot import" in message and float(seconds) < 1.0, r.stdout
    assert hub.downloads("odd-IQX.gguf") == 0


def test_a_local_gguf_is_refused_from_its_header_before_the_reader_or_a_repack(tmp_path):
    """The same census for a file on disk, from its header alone: under a second, nothing written."""
    import time

    from quant.errors import GGUFError
    from quant.gguf_io import import_gguf

    a, b = unsupported_types()
    src = tmp_path / "odd.gguf"
    src.write_bytes(odd_gguf())
    t = time.perf_counter()
    with pytest.raises(GGUFError, match=f"{a.name} x3, {b.name} x2"):
        import_gguf(src, tmp_path / "out.lmc")
    assert time.perf_counter() - t < 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.gguf"]


def test_a_gguf_pull_shows_the_header_census_on_a_terminal(hub, tmp_path):
    import pexpect

    c = pexpect.spawn(sys.executable, ["-m", "lmcli.cli", "pull", "hf.co/org/tiny-GGUF:Q8_0"],
                      env=env_for(hub, tmp_path / "home"), encoding="utf-8", timeout=120, dimensions=(40, 200))
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0, c.before
    assert "tiny-Q8_0.gguf: llama," in c.before and "Q8_0 x" in c.before and "F32 x" in c.before, c.before


# --- split GGUF files -----------------------------------------------------------------------------------


def test_a_split_gguf_imports_as_one_model_with_the_unsplit_files_logits(split_parts, tmp_path):
    import lmcli
    from quant.gguf_io import import_gguf

    whole, parts = split_parts
    one = import_gguf(whole, tmp_path / "whole.lmc")
    split = import_gguf(parts[0], tmp_path / "split.lmc")
    a, b = Container(one), Container(split)
    assert a.tensors.keys() == b.tensors.keys()
    assert all(np.array_equal(a.raw(n), b.raw(n)) for n in a.tensors)
    ids = [1, 5, 17, 42, 99, 200, 7, 3]
    assert np.array_equal(lmcli.load(str(split)).logits(ids), lmcli.load(str(one)).logits(ids))


def test_llama_cpp_reads_the_test_split_as_the_same_model(split_parts):
    """The reference for the split fixture: llama.cpp loads it (its gguf-split format) with the unsplit logits."""
    from test_gguf_export import llama_logits

    whole, parts = split_parts
    ids = [1, 5, 17, 42, 99, 200, 7, 3]
    assert np.array_equal(llama_logits(parts[0], ids), llama_logits(whole, ids))


def run_cli(*args, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LMCLI_"))}
    return subprocess.run([sys.executable, "-m", "lmcli.cli", *args], env={**env, "LMCLI_HOME": str(home)},
                          capture_output=True, text=True, timeout=300)


def test_a_split_gguf_runs_by_its_first_part_under_the_models_name(split_parts, tmp_path):
    _, parts = split_parts
    r = run_cli("run", str(parts[0]), "hello", "--raw", "-n", "2", "--temp", "0", home=tmp_path / "home")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
    assert [p.name for p in (tmp_path / "home" / "models").iterdir()] == ["tiny-Q8_0"]


@pytest.mark.parametrize("fault, words", [
    ("missing", ["tiny-Q8_0-00002-of-00003.gguf: no such file", "part 2 of the 3-part GGUF"]),
    ("truncated", ["tiny-Q8_0-00003-of-00003.gguf: tensor", "past the end of the file", "truncated"]),
    ("swapped", ["tiny-Q8_0-00002-of-00003.gguf is not part 2 of 3"]),
    ("not first", ["part 2 of a split GGUF", "give its first part, tiny-Q8_0-00001-of-00003.gguf"]),
])
def test_a_missing_or_damaged_part_is_one_clear_line(split_parts, tmp_path, fault, words):
    _, parts = split_parts
    d = tmp_path / "parts"
    shutil.copytree(parts[0].parent, d)
    given = d / parts[0].name
    if fault == "missing":
        (d / parts[1].name).unlink()
    elif fault == "truncated":
        data = (d / parts[2].name).read_bytes()
        (d / parts[2].name).write_bytes(data[:-100])
    elif fault == "swapped":
        shutil.copy(d / parts[2].name, d / parts[1].name)
    else:
        given = d / parts[1].name
    home = tmp_path / "home"
    r = run_cli("run", str(given), "hello", "-n", "1", home=home)
    assert_clean_failure(r, *words)
    assert not (home / "models").exists() or not list((home / "models").iterdir())


def test_a_split_gguf_pull_downloads_every_part_and_imports_one_model(hub, tmp_path, split_parts):
    from quant.gguf_io import import_gguf

    whole, parts = split_parts
    home = tmp_path / "home"
    r = pull(hub, home, "hf.co/org/split-GGUF:Q8_0")
    assert r.returncode == 0, r.stderr
    assert [hub.downloads(p.name) for p in parts] == [1, 1, 1]
    d = home / "models" / "org" / "split-GGUF:Q8_0"
    assert_same_model(d / "model.lmc", import_gguf(whole, tmp_path / "ref.lmc"))
    man = json.loads((d / "manifest.json").read_text())
    assert sorted(man["source"]["files"]) == [p.name for p in parts]
    assert man["source_size"] == sum(p.stat().st_size for p in parts)


def test_an_interrupted_split_gguf_pull_resumes_without_fetching_finished_parts(hub, tmp_path, split_parts,
                                                                               monkeypatch):
    from quant.gguf_io import import_gguf

    whole, parts = split_parts
    home = tmp_path / "home"
    hub.faults.cut[parts[1].name] = 1000
    hub.faults.fail_after_cut = True
    assert_clean_failure(pull(hub, home, "hf.co/org/split-GGUF:Q8_0"), "503")
    assert_not_runnable(home, "org/split-GGUF:Q8_0", monkeypatch)
    hub.faults = Faults()
    r = pull(hub, home, "hf.co/org/split-GGUF:Q8_0")
    assert r.returncode == 0, r.stderr
    assert hub.downloads(parts[0].name) == 1  # the first pull's, verified and kept in the checkpoint
    assert_same_model(home / "models" / "org" / "split-GGUF:Q8_0" / "model.lmc",
                      import_gguf(whole, tmp_path / "ref.lmc"))


def test_a_repo_missing_a_part_of_a_split_gguf_is_refused_before_any_download(hub, tmp_path, split_parts):
    _, parts = split_parts
    hub.add_repo("org/half-GGUF", {p.name: p.read_bytes() for p in parts[:2]})
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    assert_clean_failure(pull(hub, home, "hf.co/org/half-GGUF:Q8_0"), "2 of the 3 parts",
                         "tiny-Q8_0-00003-of-00003.gguf missing")
    assert snapshot(home) == ["models"] and sum(hub.sent(p.name) for p in parts) == 0


# --- a 404 from a server without the Hub's error codes (issue 18, point 4) ------------------------------------


@pytest.mark.parametrize("spec, gone", [("org/missing", None), ("hf.co/org/tiny-GGUF:Q8_0", "tiny-Q8_0.gguf")])
def test_a_bare_404_says_the_repo_or_file_does_not_exist_or_needs_hf_token(hub, tmp_path, spec, gone):
    """A mirror or a proxy answers 404 without X-Error-Code: it used to advise running the same command again."""
    hub.faults.bare_errors = True
    if gone:
        hub.faults.gone.add(gone)
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    r = pull(hub, home, spec)
    assert_clean_failure(r, "does not exist", "HF_TOKEN")
    assert "again" not in r.stderr
    assert snapshot(home) == ["models"]
