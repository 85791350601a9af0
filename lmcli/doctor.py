"""`lmcli doctor` and `lmcli plan`: what this machine offers, and what a model will cost, without loading it."""

from __future__ import annotations

import os
import platform
import re
import shutil
import time
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from quant import jsonio
from quant.schema import DEFAULT_KV_TYPE

from .errors import ModelFileError, UsageError, model_file_errors
from .memory import available, cgroup_memory_limit, context_size, kv_cache_type, meminfo, residency

DISK_GBPS = 1.7  # whole-bundle expert reads from disk, measured here at 1.5-2.0 GB/s (DESIGN.md)
REGISTRY_BITS_PER_WEIGHT = 4.5  # Q4_0: 18 bytes per 32 weights
BANDWIDTH_BYTES = 256 << 20
BANDWIDTH_SECONDS = 0.3
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


# --- the machine ------------------------------------------------------------------------------


def cpu_info(text: str) -> dict:
    """CPU model name and the SIMD features the kernels care about, from /proc/cpuinfo text."""
    flags: set[str] = set()
    name = None
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(val.split())
        elif key == "model name" and name is None:
            name = val.strip()
    return {"cpu": name or platform.processor() or platform.machine(),
            "avx2": "avx2" in flags,
            "avx512": "avx512f" in flags,
            "vnni": bool({"avx512_vnni", "avx_vnni"} & flags)}


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _existing_parent(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def numba_cache_dirs() -> list[Path]:
    """Where Numba keeps the kernels' compiled code: NUMBA_CACHE_DIR, else __pycache__ beside each module."""
    env = os.environ.get("NUMBA_CACHE_DIR")
    if env:
        return [Path(env)]
    dirs = []
    for mod in ("quant.kernels", "lmcli.engine.ops"):
        spec = find_spec(mod)
        if spec is not None and spec.origin:
            dirs.append(Path(spec.origin).parent / "__pycache__")
    return dirs


def numba_cache_files(dirs: list[Path]) -> int:
    """Count of cached index (.nbi) and code (.nbc) files under dirs (0 means the next start compiles)."""
    n = 0
    for d in dirs:
        if d.is_dir():
            n += sum(1 for p in d.rglob("*") if p.suffix in (".nbi", ".nbc"))
    return n


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def measure_bandwidth(nbytes: int = BANDWIDTH_BYTES, seconds: float = BANDWIDTH_SECONDS,
                      threads: int | None = None) -> float:
    """Read bandwidth in GB/s with `threads` threads: passes of a parallel Numba OR-reduction over a resident
    array (one vector instruction per 64 bytes, so memory is the limit, not arithmetic)."""
    import numba

    from quant import kernels

    threads = threads or usable_cores()
    chunks = 16 * threads
    a = np.ones(max(nbytes // (256 * chunks), 1) * 32 * chunks, np.uint64)  # written, so its pages are real
    out = np.zeros(chunks, np.uint64)
    prev = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        kernels.read_probe(a, out)
        passes, t0 = 0, time.perf_counter()
        while True:
            kernels.read_probe(a, out)
            passes += 1
            dt = time.perf_counter() - t0
            if dt >= seconds:
                break
    finally:
        numba.set_num_threads(prev)
    return passes * a.nbytes / dt / 1e9


def report() -> dict:
    """The machine as lmcli sees it: CPU features, cores, memory, store disk, Numba cache, read bandwidth."""
    from .store import home

    cpu = cpu_info(_read("/proc/cpuinfo"))
    total, avail = meminfo(_read("/proc/meminfo"))
    store = home()
    try:
        free = shutil.disk_usage(_existing_parent(store)).free
    except OSError:
        free = None
    from quant.kernels import kernel_path

    dirs = numba_cache_dirs()
    threads = usable_cores()
    return {
        **cpu,
        **kernel_path(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "cores_usable": threads,
        "lmcli_threads": os.environ.get("LMCLI_THREADS") or None,
        "ram_total_bytes": total,
        "ram_available_bytes": avail,
        "cgroup_memory_limit_bytes": cgroup_memory_limit(),
        "store": str(store),
        "store_free_bytes": free,
        "numba_cache_dirs": [str(d) for d in dirs],
        "numba_cache_files": numba_cache_files(dirs),
        "read_bandwidth_gbps": round(measure_bandwidth(threads=threads), 2),
        "read_bandwidth_threads": threads,
    }


# --- a model's cost -----------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes from '8G', '512M', '1.5GiB', '2048' (binary units: K/M/G/T, KiB..TiB; KB..TB are decimal)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b?)\s*", str(text), re.IGNORECASE)
    if not m or (m.group(3) and m.group(3).lower() != "b" and not m.group(2)):
        raise UsageError(f"--memory must be a size such as 8G, 512M or 1.5GiB, got {text!r}")
    num, unit, suffix = float(m.group(1)), m.group(2).lower(), m.group(3).lower()
    mult = 10 ** (3 * " kmgt".index(unit)) if suffix == "b" and unit else _UNITS[unit]
    n = int(num * mult)
    if n <= 0:
        raise UsageError(f"--memory must be more than zero, got {text!r}")
    return n


def _memory_budget(memory: str | None) -> tuple[int, str]:
    """--memory, else what the engine will measure when it loads the model (lmcli.memory.available)."""
    if memory is not None:
        return parse_size(memory), "--memory"
    avail = available()
    if not avail:
        raise UsageError("cannot read the available memory on this system", hint="pass --memory, e.g. --memory 8G")
    return avail, "available memory (RAM, within the cgroup limit)"


def _parse_count(num: str, unit: str) -> float:
    return float(num) * (1e9 if unit.upper() == "B" else 1e6)


def registry_params(notes: str) -> tuple[float, float]:
    """(total, active) parameter counts from notes such as '46.7B total, 12.9B active' or '7.2B dense'."""
    num = r"(\d+(?:\.\d+)?)\s*([BM])\b"
    tot = re.search(num + r"\s+total", notes)
    act = re.search(num + r"\s+active", notes)
    if tot and act:
        return _parse_count(*tot.groups()), _parse_count(*act.groups())
    dense = re.search(num + r"\s+dense", notes)
    if dense:
        n = _parse_count(*dense.groups())
        return n, n
    raise ModelFileError(f"the registry notes give no parameter counts: {notes!r}")


def container_costs(path: Path, kv_type: str = DEFAULT_KV_TYPE) -> dict:
    """Sizes from a container's header and tensor index (nothing of the weights is read); the KV cache's with
    kv_type numbers."""
    from quant.container import Container
    from quant.schema import ModelConfig

    with model_file_errors():
        c = Container(path)
        try:
            cfg = ModelConfig.from_dict(c.metadata.get("config"))
            tensors = c.tensor_sizes()
            return _costs(cfg, tensors, c.file_size, kv_type)
        finally:
            c.close()


def gguf_costs(path: Path, kv_type: str = DEFAULT_KV_TYPE) -> dict:
    """Sizes from a GGUF file's header (a packaged or given .gguf not yet imported: no import just to plan)."""
    from quant.gguf_io import open_gguf, read_config
    from quant.schema import ModelConfig, TensorSize

    try:
        with model_file_errors():
            r = open_gguf(path)
            d = read_config(r, path)
            emb = next((t for t in r.tensors if t.name == "token_embd.weight"), None)
            d.setdefault("vocab_size", int(emb.shape[-1]) if emb is not None else 1)  # import sets it from the vocabulary
            cfg = ModelConfig.from_dict(d)
    except ModelFileError:
        raise
    except Exception as e:  # the reader raises assorted errors on a malformed file
        raise ModelFileError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    tensors = []
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        n_exp = shape[0] if len(shape) == 3 else 0
        tensors.append(TensorSize(t.name, shape, int(t.n_bytes) // max(n_exp, 1), n_exp, None, int(t.tensor_type)))
    return _costs(cfg, tensors, path.stat().st_size, kv_type)


def _costs(cfg, tensors, file_size: int, kv_type: str) -> dict:
    """plan's view of quant.schema.token_costs: bytes read per token, dense and expert bytes, the layers with
    routed experts and the bytes of one expert's bundle (what one expert cache miss reads)."""
    from quant.schema import repacked_ram, token_costs

    t = token_costs(cfg, tensors, kv_type=kv_type)
    ram_extra, dense_tiles = repacked_ram(tensors)
    return {"arch": cfg.arch, "n_layer": cfg.n_layer, "n_expert": cfg.n_expert, "n_expert_used": cfg.n_expert_used,
            "ram_extra": ram_extra, "dense_tiles": dense_tiles,
            "file_bytes": file_size, "dense_bytes": t.dense_bytes, "expert_bytes": t.expert_bytes,
            "dense_bytes_per_token": t.dense_bytes_per_token, "expert_bytes_per_token": t.expert_bytes_per_token,
            "bytes_per_token": t.bytes_per_token, "kv_bytes_per_token": t.kv_bytes_per_token,
            "n_ctx_train": cfg.n_ctx_train, "moe_layers": list(t.moe_layers), "bundle_bytes": t.bundle_bytes,
            "layer_bundle_bytes": list(t.layer_bundle_bytes)}


def registry_config_costs(entry, kv_type: str = DEFAULT_KV_TYPE) -> dict:
    """Sizes from the config.json keys a registry entry lists: the tensors the converter writes for that config, in
    the entry's quantization (quant.hf_tensors' policy), counted as a container's index counts them; the file's
    size as the container lays them out (page-aligned tensors and expert bundles), its header left out."""
    from quant.formats import ALIGN, align_up, matrix_nbytes, vector_nbytes
    from quant.hf_config import read_config
    from quant.hf_tensors import planned_formats, resolve_qtype
    from quant.schema import TensorSize, expected_tensors

    with model_file_errors():
        cfg = read_config({**entry.config, "model_type": entry.arch})
        formats = planned_formats(cfg, *resolve_qtype(entry.quant))
    tensors = []
    for name, shape in expected_tensors(cfg):
        if len(shape) == 1:
            tensors.append(TensorSize(name, shape, vector_nbytes(shape[0])))
        else:
            n = matrix_nbytes(formats[name][0], *shape[-2:])
            tensors.append(TensorSize(name, shape, n, shape[0] if len(shape) == 3 else 0))
    c = _costs(cfg, tensors, 0, kv_type)
    bundles = cfg.n_expert * sum(c["layer_bundle_bytes"])  # each layer's own (a K mix differs by layer)
    return {**c, "file_bytes": sum(align_up(t.nbytes, ALIGN) for t in tensors if not t.n_expert) + bundles}


def _registry_costs(entry, kv_type: str = DEFAULT_KV_TYPE) -> dict:
    if entry.config is not None:
        return registry_config_costs(entry, kv_type)
    total, active = registry_params(entry.notes)
    bpw = REGISTRY_BITS_PER_WEIGHT / 8
    m = re.search(r"(\d+) experts, top-(\d+)", entry.notes)
    n_expert, used = (int(m.group(1)), int(m.group(2))) if m else (0, 0) if "dense" in entry.notes else (None, None)
    return {"arch": entry.arch, "n_layer": None, "n_expert": n_expert, "n_expert_used": used,
            "file_bytes": int(total * bpw), "dense_bytes": None, "expert_bytes": None,
            "dense_bytes_per_token": None, "expert_bytes_per_token": None,
            "bytes_per_token": int(active * bpw), "kv_bytes_per_token": None, "n_ctx_train": None,
            "moe_layers": None, "bundle_bytes": None, "layer_bundle_bytes": None}


def _miss_bytes_per_token(c: dict, room: int) -> tuple[int, float]:
    """Bytes per token that come from disk when only `room` bytes of weights stay in memory, and the share
    of expert bytes that stays resident. Dense tensors are kept first; routing is taken as uniform, so
    the resident share of experts serves the same share of expert reads."""
    if c["dense_bytes"] is None:  # registry estimate: no split known, every byte equally likely resident
        share = min(1.0, max(room, 0) / c["file_bytes"])
        return int(c["bytes_per_token"] * (1 - share)), share
    dense_share = min(1.0, max(room, 0) / c["dense_bytes"]) if c["dense_bytes"] else 1.0
    room_exp = max(room - c["dense_bytes"], 0)
    share = min(1.0, room_exp / c["expert_bytes"]) if c["expert_bytes"] else 1.0
    miss = c["dense_bytes_per_token"] * (1 - dense_share) + c["expert_bytes_per_token"] * (1 - share)
    return int(miss), share


def _layer_span(layers: list[int]) -> str:
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
    return "layers " + ", ".join(map(str, layers))


def read_trace(path: Path, c: dict, model: str) -> tuple[list, int]:
    """A routing trace as `lmcli run --routing-trace` writes it (one JSON object per token and layer, with
    "layer" and "experts"), checked against the model: [(layer, [experts...])] in file order, and the number
    of tokens it covers. Anything else is a UsageError naming the file and line."""
    if c["moe_layers"] is None:
        raise UsageError(f"--trace needs the model's tensor index, and {model} is only a registry entry here",
                         hint=f"lmcli pull {model}, or give a .gguf or .lmc path")
    if not c["moe_layers"]:
        raise UsageError(f"{model} has no routed experts: a routing trace does not apply to it")
    moe, n_expert = set(c["moe_layers"]), c["n_expert"]
    span = _layer_span(c["moe_layers"])
    trace: list = []
    per_layer: dict[int, int] = {}
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise UsageError(f"--trace {path}: cannot read it ({e.strerror or e})") from None
    for no, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"--trace {path}, line {no}"
        try:
            obj = jsonio.loads(raw)
        except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError on bytes that are not UTF-8
            raise UsageError(f"{where} is not JSON ({getattr(e, 'msg', e)})") from None
        experts = obj.get("experts") if isinstance(obj, dict) else None
        layer = obj.get("layer") if isinstance(obj, dict) else None
        if (type(layer) is not int or not isinstance(experts, list) or not experts
                or any(type(e) is not int for e in experts)):
            raise UsageError(f'{where}: expected an object with an integer "layer" and a list of integer '
                             '"experts", as `lmcli run --routing-trace` writes')
        if layer not in moe:
            raise UsageError(f"{where}: layer {layer} has no routed experts in {model} (they are in {span})")
        bad = next((e for e in experts if not 0 <= e < n_expert), None)
        if bad is not None:
            raise UsageError(f"{where}: expert {bad} is out of range for {model} "
                             f"({n_expert} experts per layer, ids 0-{n_expert - 1})")
        if len(set(experts)) != len(experts):
            raise UsageError(f"{where}: an expert is listed twice in {experts}")
        trace.append((layer, experts))
        per_layer[layer] = per_layer.get(layer, 0) + 1
    if not trace:
        raise UsageError(f"--trace {path} is empty", hint=f"write one with lmcli run {model} PROMPT --routing-trace FILE")
    return trace, max(per_layer.values())


def _replay(trace: list, capacity: int) -> dict:
    """Hits per policy and Belady's optimum for `capacity` resident bundles (0 hits below one step's experts:
    the engine refuses an expert cache that small and every expert is read from the file)."""
    from .engine.expert_cache import POLICIES, belady_hits, replay_hits

    if capacity < max(len(e) for _, e in trace):
        return {**{k: 0 for k in POLICIES}, "belady": 0}
    return {**{k: replay_hits(trace, capacity, k) for k in POLICIES}, "belady": belady_hits(trace, capacity)}


def plan(model: str, memory: str | None = None, trace: Path | str | None = None, options=None) -> dict:
    """File size, bytes read per token, where `lmcli run` will keep the weights (the engine's own rule, for the
    memory given or measured now) and expected decode tokens/s, without loading the model. options: the
    EngineOptions run would get (context size, expert cache size, mmap). With `trace` (a file from `lmcli run --routing-trace`), expert
    reads come from replaying that routing through the expert cache instead of assuming uniform routing."""
    from .engine.expert_cache import DEFAULT_POLICY, POLICIES

    from .store import locate, resolve

    budget, budget_from = _memory_budget(memory)
    loc = locate(model)
    kind = "registry" if loc.kind == "partial" else loc.kind
    kv_type = kv_cache_type(getattr(options, "kv_type", None))  # as lmcli.api.Model decides it
    if kind == "container":
        c, source = container_costs(loc.path, kv_type), "container header"
    elif kind == "gguf":
        c, source = gguf_costs(loc.path, kv_type), "GGUF header (not imported yet)"
    elif loc.entry is not None:
        c = _registry_costs(loc.entry, kv_type)
        source = (f"registry config ({loc.entry.repo}, {loc.entry.quant}); not downloaded" if loc.entry.config
                  else f"registry notes ({loc.entry.notes}); not downloaded")
    else:
        resolve(model)  # an unfinished pull of an unlisted repo: resolve's error says how to resume it
    expert_cache_mib, use_mmap = getattr(options, "expert_cache_mib", None), getattr(options, "use_mmap", None)
    # the context run allocates (lmcli.memory.context_size, as lmcli.api.Model decides it)
    n_ctx = context_size(getattr(options, "n_ctx", None), c["n_ctx_train"]) if c["n_ctx_train"] else None
    steps, n_tokens = read_trace(Path(trace), c, model) if trace is not None else (None, None)
    kv = c["kv_bytes_per_token"] * n_ctx if c["kv_bytes_per_token"] is not None else 0
    need = c["file_bytes"] + c.get("ram_extra", 0) + kv
    # what `lmcli run` decides on a machine with `budget` available: the engine's own rule (lmcli.memory), with the
    # memory its load-time repack adds (quant.schema.repacked_ram), as the engine counts it
    decision = residency(file_bytes=c["file_bytes"] + c.get("ram_extra", 0), kv_bytes=kv,
                         dense_bytes=(c["dense_bytes"] or 0) + c.get("dense_tiles", 0), avail=budget,
                         is_moe=bool(c["n_expert"]), use_mmap=use_mmap, expert_cache_mib=expert_cache_mib)
    n_bundles = len(c["moe_layers"]) * c["n_expert"] if c["moe_layers"] else 0
    capacity = None
    if decision.expert_cache_bytes is not None and c["bundle_bytes"]:
        capacity = min(n_bundles, decision.expert_cache_bytes // c["bundle_bytes"])
        fits = capacity >= n_bundles
        room = c["dense_bytes"] + capacity * c["bundle_bytes"]  # the dense weights stay resident beside the cache
        if capacity < (c["n_expert_used"] or 0):  # ExpertCache refuses a cache smaller than one token's experts
            decision = replace(decision, why=f"{decision.why}; its {capacity} bundles are fewer than one token's "
                                             f"{c['n_expert_used']} experts: run refuses (raise --expert-cache-mib)")
    else:
        fits = decision.resident or need <= budget  # read into RAM, or mapped and held by the page cache
        room = max(budget - kv, 0)
        if c["bundle_bytes"]:
            capacity = n_bundles if fits else min(n_bundles, max(room - c["dense_bytes"], 0) // c["bundle_bytes"])
    bw = measure_bandwidth()
    assumptions = ["decode is memory-bound: tokens/s = read bandwidth / bytes read per token"]
    if kind == "registry" and c["dense_bytes"] is not None:
        assumptions.append(f"the tensors a {loc.entry.quant} conversion of the registry's config writes (the "
                           "container's header, a few MB, not counted)")
    elif kind == "registry":
        assumptions.append(f"{REGISTRY_BITS_PER_WEIGHT} bits per weight, active parameters read once per token; "
                           "KV cache not counted")
        if not fits:
            assumptions.append("no split of dense and expert weights is known before download: every weight byte "
                               "is taken as equally likely to stay in memory")
    rates = belady = None
    belady_miss = belady_tps = None
    if fits:
        miss, share = 0, 1.0
        tps = bw * 1e9 / c["bytes_per_token"]
        hit_rate = 1.0
        if steps is not None:
            rates, belady, belady_miss, belady_tps = {k: 1.0 for k in POLICIES}, 1.0, 0, tps
            assumptions.append("the model fits in memory: every expert stays resident once read, whatever the "
                               "routing, so the trace changes nothing")
    else:
        miss, share = _miss_bytes_per_token(c, room)
        hit_rate = share
        assumptions.append(f"the weights that do not fit in memory are read from disk at {DISK_GBPS} GB/s "
                           "(whole expert bundles; not measured on this disk)")
        if steps is None:
            hit = c["bytes_per_token"] - miss
            tps = 1.0 / (hit / (bw * 1e9) + miss / (DISK_GBPS * 1e9))
            assumptions.append("routing is uniform: the resident share of experts serves that share of expert reads")
        else:
            hits = _replay(steps, capacity)
            accesses = sum(len(e) for _, e in steps)
            dense_share = min(1.0, room / c["dense_bytes"]) if c["dense_bytes"] else 1.0
            dense_miss = c["dense_bytes_per_token"] * (1 - dense_share)

            def cost(h: int) -> tuple[int, float]:  # (disk bytes per token, tokens/s) with h hits over the trace
                mem = c["dense_bytes_per_token"] - dense_miss + h * c["bundle_bytes"] / n_tokens
                disk = dense_miss + (accesses - h) * c["bundle_bytes"] / n_tokens
                return int(disk), 1.0 / (mem / (bw * 1e9) + disk / (DISK_GBPS * 1e9))

            miss, tps = cost(hits[DEFAULT_POLICY])
            belady_miss, belady_tps = cost(hits["belady"])
            hit_rate = hits[DEFAULT_POLICY] / accesses
            rates = {k: round(v / accesses, 4) for k, v in hits.items() if k != "belady"}
            belady = hits["belady"] / accesses
            assumptions.append(f"routing is the trace's ({n_tokens} tokens, {accesses} expert uses), replayed through "
                               f"a {DEFAULT_POLICY} expert cache of {capacity} bundles of {c['bundle_bytes']} bytes "
                               "from a cold start; each miss reads one bundle")
            if capacity < max(len(e) for _, e in steps):
                assumptions.append("the budget holds fewer bundles than one token's experts in a layer, an expert "
                                   "cache the engine refuses to make: every expert use is counted as a read")
    return {
        "model": model,
        "source": source,
        "path": None if kind == "registry" else str(loc.path),
        **{k: c[k] for k in ("arch", "n_layer", "n_expert", "n_expert_used", "file_bytes", "dense_bytes",
                             "bytes_per_token", "dense_bytes_per_token", "expert_bytes_per_token")},
        "n_ctx": n_ctx,
        "kv_type": kv_type,
        "kv_bytes_per_token": c["kv_bytes_per_token"],
        "kv_cache_bytes": kv if c["kv_bytes_per_token"] is not None else None,
        "memory_budget_bytes": budget,
        "memory_budget_from": budget_from,
        "fits_in_memory": fits,
        "weights": decision.describe(),
        "weights_why": decision.why,
        "expert_cache_bytes": decision.expert_cache_bytes,
        "resident_expert_share": round(share, 4),
        "routing": "uniform" if steps is None else "trace",
        "trace": None if trace is None else str(trace),
        "trace_tokens": n_tokens,
        "expert_bundle_bytes": c["bundle_bytes"],
        "expert_cache_bundles": capacity,
        "expert_cache_policy": DEFAULT_POLICY,
        "expected_hit_rate": round(hit_rate, 4),
        "policy_hit_rates": rates,
        "belady_hit_rate": None if belady is None else round(belady, 4),
        "disk_bytes_per_token": miss,
        "belady_disk_bytes_per_token": belady_miss,
        "read_bandwidth_gbps": round(bw, 2),
        "disk_read_gbps": None if fits else DISK_GBPS,
        "expected_decode_tokens_per_s": round(tps, 2),
        "belady_decode_tokens_per_s": None if belady_tps is None else round(belady_tps, 2),
        "assumptions": assumptions,
    }
