"""Readable tables for the reports of `doctor`, `plan` and `show` (their --json prints the dicts unchanged).

How to show a value is decided by its key (data, not code per command): sizes in bytes as KB/MB/GB, rates as
GB/s, shares as percentages, None as a dash, lists and small dicts inline. Sections group related keys; keys a
section does not name go to the last one, so a new report field is shown without a change here.
"""

from __future__ import annotations

SECTIONS = {
    "doctor": {
        "CPU and kernels": ["cpu", "arch", "avx2", "avx512", "vnni", "kernel_path", "kernel_multiply_add",
                            "kernel_speed", "kernel_fp16_scales", "cores", "cores_usable", "lmcli_threads"],
        "Memory and disk": ["ram_total_bytes", "ram_available_bytes", "cgroup_memory_limit_bytes", "store",
                            "store_free_bytes", "read_bandwidth_gbps", "read_bandwidth_threads"],
        "Other": [],
    },
    "plan": {
        "Model": ["model", "source", "path", "arch", "n_layer", "n_expert", "n_expert_used", "file_bytes"],
        "Per token": ["bytes_per_token", "dense_bytes_per_token", "expert_bytes_per_token", "n_ctx",
                      "kv_cache_bytes"],
        "Where the weights live": ["memory_budget_bytes", "memory_budget_from", "fits_in_memory", "weights",
                                   "weights_why", "expert_cache_bytes", "resident_expert_share"],
        "Expert cache": ["routing", "trace", "trace_tokens", "expert_bundle_bytes", "expert_cache_bundles",
                         "expert_cache_policy", "expected_hit_rate", "policy_hit_rates", "belady_hit_rate",
                         "disk_bytes_per_token", "belady_disk_bytes_per_token"],
        "Expected speed": ["read_bandwidth_gbps", "disk_read_gbps", "expected_decode_tokens_per_s",
                           "belady_decode_tokens_per_s", "assumptions"],
        "Other": [],
    },
    "show": {
        "Model": ["name", "path", "architecture", "parameters", "experts", "layers", "n_embd", "vocab_size",
                  "context_length"],
        "Weights": ["quant", "formats", "tensors", "file_size", "bytes_per_token"],
        "Source": ["source", "manifest", "chat_template"],
        "Other": [],
    },
}

_SHARE_KEYS = ("hit_rate", "share")


def human_bytes(n: int | float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def label(key: str) -> str:
    """A report key as a row label: the unit suffix goes (the value shows its unit), underscores become spaces."""
    for suffix in ("_bytes", "_gbps"):
        if key.endswith(suffix) and key != suffix[1:]:
            key = key[: -len(suffix)]
    return key.replace("_", " ")


def show_value(key: str, v, nested: bool = False) -> str:
    """One report value as a person reads it, chosen by the key's name."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, dict):
        inner = ", ".join(f"{k}={show_value(k, x, True)}" for k, x in v.items()) or "-"
        return f"({inner})" if nested else inner
    if isinstance(v, (list, tuple)):
        return "; ".join(show_value(key, x) for x in v) or "-"
    if isinstance(v, (int, float)):
        if key.endswith(("_bytes", "bytes_per_token")) or key in ("file_size", "size"):
            return human_bytes(v)
        if key.endswith("_gbps"):
            return f"{v:.1f} GB/s"
        if key.endswith(_SHARE_KEYS) and isinstance(v, float):
            return f"{v:.0%}"
        if key.endswith("tokens_per_s"):
            return f"{v:.1f} tok/s"
        if key == "total" or key == "active":
            return f"{v:,}"
    return str(v)


def sections(report: dict, kind: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(title, [(key, shown value)])]: the report's keys in the kind's sections, unknown keys in the last."""
    spec = SECTIONS[kind]
    named = {k for keys in spec.values() for k in keys}
    out = []
    for title, keys in spec.items():
        keys = keys or [k for k in report if k not in named]
        rows = [(k, show_value(k, report[k])) for k in keys if k in report]
        if rows:
            out.append((title, rows))
    return out


def print_report(report: dict, kind: str) -> None:
    """The report as Rich tables on stdout (plain text without colour when stdout is not a terminal)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=False)
    for title, rows in sections(report, kind):
        t = Table(title=title, title_justify="left", box=box.SIMPLE, show_header=False, pad_edge=False)
        t.add_column(style="bold")
        t.add_column(overflow="fold")
        for k, v in rows:
            t.add_row(label(k), v)
        console.print(t)
