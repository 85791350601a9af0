"""The CLI end to end in subprocesses: answers, JSON, stdin, and bad input (one line, non-zero, nothing written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter


def lmcli(*args, home, stdin=None, env=None):
    e = dict(os.environ, LMCLI_HOME=str(home), **(env or {}))
    return subprocess.run([sys.executable, "-m", "lmcli.cli", *args], input=stdin, capture_output=True,
                          text=True, env=e, timeout=600)


def assert_clean_failure(r, code=None):
    assert r.returncode != 0 if code is None else r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def snapshot(d: Path):
    return sorted((str(p.relative_to(d)), p.stat().st_size) for p in d.rglob("*")) if d.exists() else []


def test_run_smollm2_answers_the_capital_of_france(lmcli_home):
    r = lmcli("run", "smollm2", "What is the capital of France?", "--temp", "0", "-n", "24", home=lmcli_home)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert r.stderr == ""


def test_run_json_reports_text_tokens_usage_and_speed(lmcli_home):
    r = lmcli("run", "smollm2", "Say hello.", "--temp", "0", "-n", "8", "--json", home=lmcli_home)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["completion_tokens"] == len(obj["tokens"]) <= 8
    assert obj["prompt_tokens"] > 5 and obj["finish_reason"] in ("stop", "length")
    assert obj["prefill_tokens_per_s"] > 0 and isinstance(obj["text"], str) and obj["text"]


def test_run_reads_the_prompt_from_stdin_and_is_deterministic_with_a_seed(lmcli_home):
    a = lmcli("run", "smollm2", "-", "--seed", "7", "-n", "12", home=lmcli_home, stdin="Tell me a story.")
    b = lmcli("run", "smollm2", "--seed", "7", "-n", "12", home=lmcli_home, stdin="Tell me a story.")
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


def test_stop_string_ends_the_reply_before_it(lmcli_home):
    r = lmcli("run", "smollm2", "Count from 1 to 10, separated by commas.", "--temp", "0", "-n", "40",
              "--stop", "5", "--json", home=lmcli_home)
    obj = json.loads(r.stdout)
    assert obj["finish_reason"] == "stop" and "5" not in obj["text"] and "4" in obj["text"]


def test_unknown_model_name(lmcli_home):
    before = snapshot(lmcli_home)
    assert_clean_failure(lmcli("run", "no-such-model", "hi", home=lmcli_home))
    assert snapshot(lmcli_home) == before


def test_missing_file(lmcli_home, tmp_path):
    before = snapshot(lmcli_home)
    assert_clean_failure(lmcli("run", str(tmp_path / "nope.gguf"), "hi", home=lmcli_home))
    assert snapshot(lmcli_home) == before


def test_negative_temperature_is_a_usage_error(lmcli_home):
    assert_clean_failure(lmcli("run", "smollm2", "hi", "--temp", "-1", home=lmcli_home), code=2)


def test_truncated_container(lmcli_home, tmp_path):
    src = lmcli_home / "models" / "smollm2" / "model.lmc"
    bad = tmp_path / "cut.lmc"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 3])
    before = snapshot(lmcli_home)
    r = lmcli("run", str(bad), "hi", home=lmcli_home)
    assert_clean_failure(r)
    assert "truncated" in r.stderr
    assert snapshot(lmcli_home) == before


def _as_version(src: Path, dst: Path, version: int) -> None:
    data = bytearray(src.read_bytes())
    data[8:12] = version.to_bytes(4, "little")
    dst.write_bytes(bytes(data))


def test_a_container_from_an_older_lmcli_is_refused_with_what_to_do(lmcli_home, tmp_path):
    old = tmp_path / "old.lmc"
    _as_version(lmcli_home / "models" / "smollm2" / "model.lmc", old, 1)
    r = lmcli("run", str(old), "hi", home=lmcli_home)
    assert_clean_failure(r)
    assert "container version 1" in r.stderr and "convert it again" in r.stderr


def test_a_packaged_model_imported_by_an_older_lmcli_is_imported_again(lmcli_home, tmp_path):
    import shutil

    from quant.container import VERSION

    home = tmp_path / "home"
    shutil.copytree(lmcli_home / "models" / "smollm2", home / "models" / "smollm2")
    stored = home / "models" / "smollm2" / "model.lmc"
    _as_version(lmcli_home / "models" / "smollm2" / "model.lmc", stored, VERSION - 1)
    r = lmcli("run", "smollm2", "What is the capital of France?", "--temp", "0", "-n", "12", home=home)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert int.from_bytes(stored.read_bytes()[8:12], "little") == VERSION


def test_out_of_range_offset_in_a_container(lmcli_home, tmp_path):
    src = lmcli_home / "models" / "smollm2" / "model.lmc"
    raw = bytearray(src.read_bytes())
    hlen = int.from_bytes(raw[16:24], "little")
    header = raw[24 : 24 + hlen].decode()
    import re

    m = max(re.finditer(r'"offset":(\d+)', header), key=lambda m: int(m.group(1)))  # most digits
    new = str((10 ** len(m.group(1)) - 1) // 4096 * 4096)  # same digit count, aligned, far past the end
    header = header[: m.start(1)] + new + header[m.end(1) :]
    assert len(header) == hlen
    bad = tmp_path / "off.lmc"
    bad.write_bytes(bytes(raw[:24]) + header.encode() + bytes(raw[24 + hlen :]))
    r = lmcli("run", str(bad), "hi", home=lmcli_home)
    assert_clean_failure(r)
    assert "past the end" in r.stderr


def test_gguf_with_an_unsupported_tensor_type(lmcli_home, tmp_path):
    src = tmp_path / "k.gguf"
    w = GGUFWriter(str(src), "llama")
    w.add_block_count(1)
    w.add_embedding_length(256)
    w.add_feed_forward_length(256)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 82), np.uint8), raw_dtype=QT.IQ2_S)  # a type not read yet
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    before = snapshot(lmcli_home)
    r = lmcli("run", str(src), "hi", home=lmcli_home)
    assert_clean_failure(r)
    assert "IQ2_S" in r.stderr
    assert snapshot(lmcli_home) == before


def test_prompt_longer_than_the_context_is_an_error(lmcli_home):
    r = lmcli("run", "smollm2", "word " * 200, "-c", "64", home=lmcli_home)
    assert_clean_failure(r)
    assert "context" in r.stderr


def test_import_refuses_to_overwrite_without_force(lmcli_home, smol_gguf):
    r = lmcli("import", str(smol_gguf), "smollm2", home=lmcli_home)
    assert_clean_failure(r)
    assert "--force" in r.stderr


def test_run_a_gguf_path_imports_it_once_and_answers(lmcli_home, smol_gguf, tmp_path):
    src = tmp_path / "my-model.gguf"
    src.symlink_to(smol_gguf)
    r = lmcli("run", str(src), "What is 2+2?", "--temp", "0", "-n", "16", home=lmcli_home)
    assert r.returncode == 0, r.stderr
    assert "4" in r.stdout
    # the store already holds these bytes (smollm2, imported from the same packaged file): no second copy
    assert "same bytes as the store's model 'smollm2'" in r.stderr
    assert not (lmcli_home / "models" / "my-model").exists()
    man = lmcli_home / "models" / "smollm2" / "manifest.json"
    first = man.stat().st_mtime_ns
    r = lmcli("run", str(src), "Hi", "--temp", "0", "-n", "2", home=lmcli_home)
    assert r.returncode == 0 and man.stat().st_mtime_ns == first  # not imported again


def test_system_message_goes_into_the_chat_prompt_and_raw_skips_the_template(lmcli_home):
    def usage(*extra):
        r = lmcli("run", "smollm2", "Hello", "-n", "1", "--temp", "0", "--json", *extra, home=lmcli_home)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["prompt_tokens"]

    # longer than SmolLM2's built-in default system message, which the template adds when none is given
    pirate = "You are a pirate captain who sails the seven seas and answers every question in rhyming couplets. " * 2
    plain, with_sys, raw = usage(), usage("-sys", pirate), usage("--raw")
    assert with_sys > plain > raw == 1


def test_stream_json_pieces_join_to_the_json_text(lmcli_home):
    args = ("run", "smollm2", "Name three fruits.", "--temp", "0", "-n", "20")
    whole = json.loads(lmcli(*args, "--json", home=lmcli_home).stdout)
    r = lmcli(*args, "--stream-json", home=lmcli_home)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert lines[-1]["done"] is True and lines[-1]["completion_tokens"] == whole["completion_tokens"]
    assert "".join(x["text"] for x in lines[:-1]) == whole["text"]
    assert lines[-1]["tokens"] == whole["tokens"]


def test_each_line_answers_every_stdin_line_in_order(lmcli_home):
    qs = ["What is the capital of France?", "What is the capital of Germany?"]
    r = lmcli("run", "smollm2", "--each-line", "--json", "--temp", "0", "-n", "16", home=lmcli_home,
              stdin="\n".join(qs) + "\n\n")
    assert r.returncode == 0, r.stderr
    objs = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(objs) == 2
    assert "Paris" in objs[0]["text"] and "Berlin" in objs[1]["text"]


def test_usage_errors_exit_2_and_unknown_flags_are_one_line(lmcli_home):
    r = lmcli("run", "smollm2", "hi", "--no-such-flag", home=lmcli_home)
    assert_clean_failure(r, code=2)
    r = lmcli("run", "smollm2", "hi", "--json", "--stream-json", home=lmcli_home)
    assert_clean_failure(r, code=2)


def test_run_chat_serve_and_bench_offer_the_same_engine_flags(lmcli_home):
    flags = ("--moe-topk", "--kv-type", "--expert-cache-mib", "--mmap")
    for cmd in ("run", "chat", "serve", "bench"):
        r = lmcli(cmd, "--help", home=lmcli_home, env={"COLUMNS": "200"})
        assert r.returncode == 0, r.stderr
        want = flags + (("--threads", "--ctx-size") if cmd != "bench" else ())  # bench sweeps threads itself
        assert all(f in r.stdout for f in want), (cmd, r.stdout)
    # serve applies them: a dense model refuses --moe-topk before the server listens (on a port that is taken,
    # so that a server that did not refuse fails too instead of serving)
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        r = lmcli("serve", "smollm2", "--moe-topk", "2", "--port", str(taken.getsockname()[1]), home=lmcli_home)
    assert_clean_failure(r, code=2)
    assert "--moe-topk applies to Mixture-of-Experts models" in r.stderr


def test_ctrl_c_exits_130(lmcli_home):
    import signal
    import time

    e = dict(os.environ, LMCLI_HOME=str(lmcli_home))
    p = subprocess.Popen([sys.executable, "-m", "lmcli.cli", "run", "smollm2", "Tell me a very long story.",
                          "--ignore-eos", "-n", "2000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e)
    p.stdout.read(1)  # generation has started
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and b"Traceback" not in err


def test_show_list_cp_rm_round_trip(lmcli_home):
    info = json.loads(lmcli("show", "smollm2", "--json", home=lmcli_home).stdout)
    assert info["architecture"] == "llama" and info["layers"] == 30 and info["vocab_size"] == 49152
    assert info["bytes_per_token"] < info["file_size"]
    r = lmcli("cp", "smollm2", "smol-copy", home=lmcli_home)
    assert r.returncode == 0, r.stderr
    names = [m["name"] for m in json.loads(lmcli("list", "--json", home=lmcli_home).stdout)]
    assert {"smollm2", "smol-copy"} <= set(names)
    assert_clean_failure(lmcli("cp", "smollm2", "smol-copy", home=lmcli_home))  # exists, no --force
    assert lmcli("rm", "smol-copy", home=lmcli_home).returncode == 0
    names = [m["name"] for m in json.loads(lmcli("list", "--json", home=lmcli_home).stdout)]
    assert "smol-copy" not in names
    assert_clean_failure(lmcli("rm", "../etc", home=lmcli_home))


def test_wrong_types_in_a_container_config_are_one_clear_line(lmcli_home, tmp_path):
    """Issue 19 (7): a container whose config holds wrong types (written by hand or another tool) is refused by the
    schema, naming the field, in every command that reads it; never a TypeError or a Numba error."""
    from quant.container import Container, ContainerWriter

    md = Container(lmcli_home / "models" / "smollm2" / "model.lmc").metadata
    for field, value in [("rope_theta", {}), ("rope_interleaved", []), ("n_layer", True), ("norm_eps", "1e-5")]:
        bad = tmp_path / f"{field}.lmc"
        with ContainerWriter(bad) as w:
            w.begin({**md, "config": {**md["config"], field: value}})
            w.finish()
        for args in (["run", str(bad), "hi"], ["show", str(bad)]):
            r = lmcli(*args, home=lmcli_home)
            assert_clean_failure(r)
            assert f"model config: {field} = " in r.stderr, r.stderr


def test_a_container_header_nested_100000_deep_is_one_clear_line(lmcli_home, tmp_path):
    """Issue 19 (6): json.loads' RecursionError used to surface as `internal error: RecursionError`."""
    src = (lmcli_home / "models" / "smollm2" / "model.lmc").read_bytes()
    header = b'{"metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    bad = tmp_path / "deep.lmc"
    bad.write_bytes(src[:16] + len(header).to_bytes(8, "little") + header)
    for args in (["run", str(bad), "hi"], ["show", str(bad)], ["plan", str(bad)]):
        r = lmcli(*args, home=lmcli_home)
        assert_clean_failure(r)
        assert "corrupt header" in r.stderr


def test_two_imports_under_one_name_make_one_model_and_one_clear_refusal(lmcli_home, tmp_path, smol_gguf):
    """Issue 19 (9): import took no store lock; two at once replaced each other silently without --force."""
    home = tmp_path / "home"
    env = dict(os.environ, LMCLI_HOME=str(home))
    procs = [subprocess.Popen([sys.executable, "-m", "lmcli.cli", "import", str(smol_gguf), "twin"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stderr.read()) for p in procs)
    assert [rc for rc, _ in results] == [0, 1], results
    assert "already exists" in results[1][1] and results[1][1].count("\n") == 1
    assert sorted(p.name for p in (home / "models" / "twin").iterdir()) == [".lock", "manifest.json", "model.lmc"]


def test_a_full_disk_during_import_is_one_line_and_leaves_nothing(small_disk, smol_gguf):
    """Issue 19 (10): a full disk during import gave `internal error: OSError` and left an empty directory."""
    home = small_disk(8 << 20) / "home"  # the container needs about 100 MB
    for args in (["import", str(smol_gguf), "small"], ["run", "smollm2", "hi"]):
        r = lmcli(*args, home=home)
        assert_clean_failure(r)
        assert "disk holding" in r.stderr and "is full" in r.stderr, r.stderr
        assert not (home / "models").exists() or list((home / "models").iterdir()) == []


def test_an_invalid_store_name_is_a_usage_error(lmcli_home, smol_gguf):
    """Issue 19: bad names exited 1; like every bad argument they exit 2, with one line."""
    for args in (["import", str(smol_gguf), "a/b/c"], ["cp", "smollm2", "..x"], ["rm", "bad name"]):
        r = lmcli(*args, home=lmcli_home)
        assert_clean_failure(r, code=2)
        assert "invalid model name" in r.stderr


def test_first_hour_names_and_notes(lmcli_home, tmp_path):
    """Issue 18 (4): --version; a Hugging Face checkpoint given to run says what it is and how to convert it; a
    container written by quantize imports under a name; a context beyond the training one is run with a note."""
    from lmcli import __version__

    r = lmcli("--version", home=lmcli_home)
    assert r.returncode == 0 and r.stdout == f"lmcli {__version__}\n"
    hf = tmp_path / "hf-checkpoint"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    r = lmcli("run", str(hf), "hi", home=lmcli_home)
    assert_clean_failure(r)
    assert "is a Hugging Face checkpoint" in r.stderr and f"lmcli quantize {hf} model.lmc" in r.stderr
    home = tmp_path / "home"
    r = lmcli("import", str(lmcli_home / "models" / "smollm2" / "model.lmc"), "mine", home=home)
    assert r.returncode == 0, r.stderr
    r = lmcli("run", "mine", "What is the capital of France?", "--temp", "0", "-n", "12", "-c", "9000", home=home)
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    assert r.stderr == "note: a context of 9000 tokens is beyond the 8192 this model was trained for: what it " \
                       "writes past that point may degrade\n"


def test_the_first_run_on_a_terminal_says_it_is_compiling_within_a_second(lmcli_home, tmp_path):
    """Issue 18 (2): the first run was silent for about a minute while Numba compiled."""
    import time

    import pexpect

    env = dict(os.environ, LMCLI_HOME=str(lmcli_home), NUMBA_CACHE_DIR=str(tmp_path / "empty-cache"))
    t = time.monotonic()
    c = pexpect.spawn(sys.executable, ["-m", "lmcli.cli", "run", "smollm2", "hi", "-n", "1"], env=env,
                      encoding="utf-8", timeout=30)
    c.expect("compiling lmcli's kernels for this CPU")
    assert time.monotonic() - t < 5  # the interpreter's own start included
    # then the worker processes' progress (lmcli.warm), to the last kernel, and the answer
    c.expect(r"compiling kernels for this model: (\d+)/\1", timeout=300)
    assert int(c.match.group(1)) >= 5
    c.expect(pexpect.EOF, timeout=120)
    c.close()
    assert c.exitstatus == 0
    r = lmcli("run", "smollm2", "hi", "-n", "1", home=lmcli_home)  # not a terminal: nothing extra on stderr
    assert r.returncode == 0 and r.stderr == ""


def test_the_compile_line_keeps_a_clock_while_one_kernel_takes_long():
    """A MoE's largest kernel compiles for about 20 s, and a count that stands still that long looks hung: the line
    is redrawn with the seconds so far, ends with a newline at the last kernel, and draws nothing after that or
    after stop() (an interrupted compile)."""
    import io
    import re
    import time

    from lmcli.cli import CompileLine

    out = io.StringIO()
    line = CompileLine(out, every=0.05)
    line(0, 3)

    def draws() -> int:
        return len(re.findall(r"\rcompiling kernels for this model: 0/3 \(\d+ s\)", out.getvalue()))

    end = time.monotonic() + 10  # a busy machine may run the redrawing thread late, not never
    while draws() < 4 and time.monotonic() < end:
        time.sleep(0.05)
    assert draws() >= 4  # the first draw, then redrawn while nothing is done yet
    line(1, 3)
    line(3, 3)
    text = out.getvalue()
    assert re.search(r"\rcompiling kernels for this model: 3/3 \(\d+ s\)\n$", text) and "\n" not in text[:-1]
    time.sleep(0.2)
    line(2, 3)  # after the end: nothing
    assert out.getvalue() == text
    line(0, 2)  # the next model's compile: a line of its own
    line.stop()
    text = out.getvalue()
    assert re.search(r"0/2 \(\d+ s\)$", text)
    time.sleep(0.2)
    assert out.getvalue() == text
    slow = CompileLine(out := io.StringIO(), every=0.05)
    slow(0, 2)
    time.sleep(1.2)
    slow(2, 2)
    assert int(re.search(r"2/2 \((\d+) s\)\n$", out.getvalue()).group(1)) >= 1  # the seconds count
