"""Memory, decided once: what this process may still use (cgroup aware), the context size, and the rule that says
where a model's weights live. The engine (engine/model.py) follows residency() and `lmcli plan` (doctor.py) reports
it for the memory it is given, so plan says what run will do."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from quant.schema import DEFAULT_KV_TYPE, KV_TYPES

from .errors import UsageError

FIT_SHARE = 0.6  # the file and its KV cache are read into RAM when they take at most this share of what is available
HEADROOM = 256 << 20  # bytes kept free beside the dense weights and the expert cache (at least; 1/8 of available)
DEFAULT_CTX = 4096
MAX_CTX = 1 << 20
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a huge number near 2**63
_ROOT, _PROC = Path("/sys/fs/cgroup"), Path("/proc/self/cgroup")


def meminfo(text: str) -> tuple[int | None, int | None]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo text."""
    vals = {}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        parts = val.split()
        if parts and parts[0].isdigit():
            vals[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return vals.get("MemTotal"), vals.get("MemAvailable")


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[tuple[Path, str, str]]:
    """(directory, limit file, usage file): this process's own cgroup (v2, then the v1 memory controller), then
    the hierarchy's root."""
    out = []
    try:
        for line in proc_cgroup.read_text().splitlines():
            hid, _, rest = line.partition(":")
            ctrls, _, rel = rest.partition(":")
            rel = rel.strip().lstrip("/")
            if hid == "0" and ctrls == "":
                out.append((root / rel, "memory.max", "memory.current"))
            elif "memory" in ctrls.split(","):
                out.append((root / "memory" / rel, "memory.limit_in_bytes", "memory.usage_in_bytes"))
    except OSError:
        pass
    return out + [(root, "memory.max", "memory.current"), (root / "memory", "memory.limit_in_bytes",
                                                          "memory.usage_in_bytes")]


def cgroup_memory(root: Path = _ROOT, proc_cgroup: Path = _PROC) -> tuple[int | None, int | None]:
    """(limit, usage) in bytes of this process's memory cgroup; (None, None) without a limit."""
    for d, limit_f, usage_f in _cgroup_dirs(root, proc_cgroup):
        try:
            v = (d / limit_f).read_text().strip()
        except OSError:
            continue
        if v == "max" or (v.isdigit() and int(v) >= _NO_LIMIT):
            return None, None
        if v.isdigit():
            try:
                used = int((d / usage_f).read_text().strip())
            except (OSError, ValueError):
                used = None
            return int(v), used
    return None, None


def cgroup_memory_limit(root: Path = _ROOT, proc_cgroup: Path = _PROC) -> int | None:
    return cgroup_memory(root, proc_cgroup)[0]


def available() -> int:
    """Bytes this process may still use: MemAvailable, capped by the memory cgroup's limit less its usage;
    0 when neither can be read."""
    try:
        _, avail = meminfo(Path("/proc/meminfo").read_text())
    except OSError:
        avail = None
    avail = avail or 0
    limit, used = cgroup_memory()
    if limit is not None:
        avail = min(avail or 1 << 62, max(limit - (used or 0), 0))
    return avail


def env_int(name: str) -> int | None:
    """An integer environment variable (None when unset or empty); anything else is a UsageError naming it."""
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise UsageError(f"{name} must be an integer, got {v!r}") from None


def kv_cache_type(kv_type: str | None) -> str:
    """The KV cache's number type: kv_type, else LMCLI_KV_TYPE, else quant.schema.DEFAULT_KV_TYPE."""
    t = kv_type if kv_type is not None else os.environ.get("LMCLI_KV_TYPE") or DEFAULT_KV_TYPE
    if t not in KV_TYPES:
        raise UsageError(f"the KV cache type must be one of {', '.join(KV_TYPES)}, got {t!r}")
    return t


def context_size(n_ctx: int | None, n_ctx_train: int) -> int:
    """--ctx-size, else LMCLI_CTX_SIZE, else the smaller of DEFAULT_CTX and the model's training context."""
    n = n_ctx if n_ctx is not None else env_int("LMCLI_CTX_SIZE")
    if n is None:
        n = min(DEFAULT_CTX, n_ctx_train)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CTX:
        raise UsageError(f"--ctx-size must be between 1 and {MAX_CTX}, got {n}")
    return n


@dataclass(frozen=True)
class Residency:
    """Where the weights live: read into RAM (resident), or mapped from the file, then with an expert cache of
    expert_cache_bytes (None: none; the page cache over the mapping serves every read)."""

    resident: bool
    expert_cache_bytes: int | None
    why: str

    def describe(self) -> str:
        if self.resident:
            return "read into RAM"
        if self.expert_cache_bytes is None:
            return "mapped from the file"
        return f"mapped, with an expert cache of {self.expert_cache_bytes / (1 << 20):.1f} MiB"


def residency(*, file_bytes: int, kv_bytes: int, dense_bytes: int, avail: int, is_moe: bool,
              use_mmap: bool | None = None, expert_cache_mib: int | None = None) -> Residency:
    """The rule. Weights are read into RAM (huge pages, as llama.cpp does) when the file and its full-context KV
    cache take at most FIT_SHARE of available memory, unless mapping is asked for (--mmap) or an expert cache is;
    use_mmap=False insists on RAM. A Mixture-of-Experts file larger than FIT_SHARE of available memory gets an
    expert cache automatically: the dense weights stay resident (page cache over the mapping), and what is left
    after them and a margin for activations, the allocator and the KV cache as the context fills holds expert
    bundles. expert_cache_mib sets its size; 0 turns it off."""
    if expert_cache_mib is not None and (isinstance(expert_cache_mib, bool) or expert_cache_mib < 0):
        raise UsageError(f"--expert-cache-mib must be 0 or more, got {expert_cache_mib}")
    if use_mmap is False:
        if expert_cache_mib:
            raise UsageError("the expert cache reads from the file mapping: drop use_mmap=False")
        if avail and file_bytes + kv_bytes > avail:
            raise UsageError(f"the model file ({file_bytes >> 20} MiB) and its KV cache do not fit in the "
                             f"{avail >> 20} MiB available", hint="keep the file mapped (the default)")
        return Residency(True, None, "asked for (no mmap)")
    if use_mmap is None and not expert_cache_mib and avail and file_bytes + kv_bytes <= FIT_SHARE * avail:
        return Residency(True, None, f"the file and its KV cache take at most {FIT_SHARE:.0%} of available memory")
    if not is_moe or expert_cache_mib == 0:
        return Residency(False, None, "mapped: the page cache serves the reads")
    if expert_cache_mib:
        return Residency(False, int(expert_cache_mib * (1 << 20)), "expert cache size asked for")
    if not avail or file_bytes <= FIT_SHARE * avail:
        return Residency(False, None, "mapped: the file fits beside the rest, the page cache is the cheapest cache")
    budget = max(avail - dense_bytes - max(HEADROOM, avail // 8, kv_bytes), 0)
    return Residency(False, budget, f"the file is larger than {FIT_SHARE:.0%} of available memory")
