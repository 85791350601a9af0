"""`doctor`, `plan` and `show` print readable tables (units, sections, no Python reprs); --json stays the dict."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lmcli.view import SECTIONS, label, sections, show_value


def test_values_are_shown_in_units_by_their_key():
    assert show_value("file_bytes", 98_312_192) == "98.31 MB"
    assert show_value("kv_cache_bytes", 1_500) == "1.50 KB"
    assert show_value("expert_bundle_bytes", 0) == "0 B"
    assert show_value("store_free_bytes", 66_850_000_000) == "66.85 GB"
    assert show_value("read_bandwidth_gbps", 39.71) == "39.7 GB/s"
    assert show_value("expected_hit_rate", 0.875) == "88%"
    assert show_value("expected_decode_tokens_per_s", 368.44) == "368.4 tok/s"
    assert show_value("fits_in_memory", True) == "yes" and show_value("avx512", False) == "no"
    assert show_value("trace", None) == "-"
    assert show_value("parameters", {"total": 134515008, "active": 1000}) == "total=134,515,008, active=1,000"
    assert show_value("manifest", {"source": {"kind": "gguf", "size": 2_000_000}}) == "source=(kind=gguf, size=2.00 MB)"
    assert show_value("assumptions", ["a", "b"]) == "a; b"
    assert label("ram_total_bytes") == "ram total" and label("read_bandwidth_gbps") == "read bandwidth"


def test_every_report_key_lands_in_a_section_once():
    report = {"model": "m", "file_bytes": 10, "something_new": 3}
    rows = sections(report, "plan")
    keys = [k for _, rs in rows for k, _ in rs]
    assert sorted(keys) == sorted(report)  # the unknown key is shown too, in the last section
    assert rows[-1] == ("Other", [("something_new", "3")])
    for spec in SECTIONS.values():
        named = [k for keys in spec.values() for k in keys]
        assert len(named) == len(set(named))


def _lmcli(*args, home):
    env = dict(os.environ, LMCLI_HOME=str(home), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "lmcli.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_plan_and_show_print_tables_and_json(lmcli_home):
    plan_json = json.loads(_lmcli("plan", "smollm2", "--json", home=lmcli_home).stdout)
    r = _lmcli("plan", "smollm2", home=lmcli_home)
    assert r.returncode == 0, r.stderr
    for title in ("Model", "Per token", "Where the weights live", "Expected speed"):
        assert title in r.stdout
    assert f"{plan_json['file_bytes'] / 1e6:.2f} MB" in r.stdout
    assert "{" not in r.stdout and "None" not in r.stdout and "True" not in r.stdout
    r = _lmcli("show", "smollm2", home=lmcli_home)
    assert r.returncode == 0, r.stderr
    assert "q4_1" in r.stdout and "{" not in r.stdout and "'" not in r.stdout
    assert "present (--template prints it)" in r.stdout
    assert "{%" in _lmcli("show", "smollm2", "--template", home=lmcli_home).stdout  # the template itself


def test_doctor_prints_tables(tmp_path):
    r = _lmcli("doctor", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "CPU and kernels" in r.stdout and "kernel path" in r.stdout and "GB/s" in r.stdout
    assert "ram_total_bytes" not in r.stdout and "None" not in r.stdout and "[" not in r.stdout
