"""The command line (Typer): parses flags, calls the library, prints results and errors. Nothing else."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Optional

import click
import typer

from .errors import LmcliError, LmcliWarning, UsageError

if TYPE_CHECKING:
    from .engine.options import EngineOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run Mixture-of-Experts language models locally on your CPU from 4-bit weights.")


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"lmcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print lmcli's version and exit")):
    pass

# Flags declared once, in groups: parameter -> (type, option). A command offers a group (flag_group) and receives
# it as one value.
ENGINE_FLAGS = {  # -> EngineOptions; the parameters are its fields
    "threads": (Optional[int], typer.Option(None, "-t", "--threads",
                                            help="fix the thread count (default: LMCLI_THREADS, else chosen "
                                                 "while decoding from what the machine gives)")),
    "n_ctx": (Optional[int], typer.Option(None, "-c", "--ctx-size", help="default: LMCLI_CTX_SIZE or 4096")),
    "moe_topk": (Optional[int], typer.Option(None, "--moe-topk", help="experts per token (MoE models)")),
    "expert_cache_mib": (Optional[int], typer.Option(None, "--expert-cache-mib",
                                                     help="expert cache size (default: automatic when the model "
                                                          "does not fit in memory; 0: off)")),
    "kv_type": (Optional[str], typer.Option(None, "--kv-type", help="KV cache numbers, f16 or f32 "
                                            "(default: LMCLI_KV_TYPE or f32)")),
    "use_mmap": (bool, typer.Option(False, "--mmap", help="keep the weights in the file mapping instead of reading "
                                    "them into RAM (starts faster, decodes slower)")),
}
SAMPLING_FLAGS = {  # -> {parameter: value or None (not given)}, which _sampling puts over the registry's defaults
    "temp": (Optional[float], typer.Option(None, "--temp", help="temperature; 0 is greedy [default: 0.8]")),
    "top_k": (Optional[int], typer.Option(None, "--top-k", help="[default: 40]")),
    "top_p": (Optional[float], typer.Option(None, "--top-p", help="[default: 0.95]")),
    "min_p": (Optional[float], typer.Option(None, "--min-p", help="[default: 0.05]")),
    "seed": (Optional[int], typer.Option(None, "-s", "--seed")),
    "repeat_penalty": (Optional[float], typer.Option(None, "--repeat-penalty", help="[default: 1.0]")),
    "presence_penalty": (Optional[float], typer.Option(None, "--presence-penalty",
                                                       help="OpenAI's, -2..2, over the reply's tokens [default: 0]")),
    "frequency_penalty": (Optional[float], typer.Option(None, "--frequency-penalty",
                                                        help="OpenAI's, -2..2, per repeat in the reply [default: 0]")),
}


def flag_group(param: str, group: dict, build: Callable[..., Any], *names: str):
    """Offer the flags `names` of group (default: all of them) on a command, in the place of its parameter
    `param`, which receives build(**their values) instead."""
    names = names or tuple(group)

    def decorate(fn):
        sig = inspect.signature(fn)
        params = []
        for p in sig.parameters.values():
            params += [p.replace(name=n, default=group[n][1], annotation=group[n][0]) for n in names] \
                if p.name == param else [p]

        @functools.wraps(fn)
        def command(**kw):
            value = build(**{n: kw.pop(n) for n in names})
            return fn(**kw, **{param: value})

        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {**{k: v for k, v in fn.__annotations__.items() if k not in (param, "return")},
                                   **{n: group[n][0] for n in names}}
        return command
    return decorate


def _engine_options(use_mmap: bool = False, **fields) -> EngineOptions:
    from .engine.options import EngineOptions

    return EngineOptions(use_mmap=use_mmap or None, **fields)  # no --mmap: the engine decides, not "never map"


def engine_flags(*names: str):
    return flag_group("engine", ENGINE_FLAGS, _engine_options, *names)


def _sampling(model: str, **flags):
    """Sampler parameters: flags given, else the registry entry's defaults, else llama.cpp's defaults."""
    from .registry import load_registry
    from .sampling import SamplerParams

    entry = load_registry().get(model)
    dflt = dict(entry.defaults or {}) if entry is not None else {}
    kw = {k: (v if v is not None else dflt.get(k)) for k, v in flags.items()}
    return SamplerParams(**{k: v for k, v in kw.items() if v is not None}).validate()


MAX_SCHEMA_BYTES = 1 << 20


def _read_prompt(prompt: Optional[str]) -> str:
    if prompt is None or prompt == "-":
        if sys.stdin is None or (prompt is None and sys.stdin.isatty()):
            raise UsageError("no prompt given", hint="pass PROMPT, or pipe it on stdin")
        return sys.stdin.read()
    return prompt


@app.command()
@flag_group("sampling", SAMPLING_FLAGS, dict)
@engine_flags()
def run(
    model: str = typer.Argument(..., help="model name, store entry, .gguf or .lmc path"),
    prompt: Optional[str] = typer.Argument(None, help="the prompt; '-' or absent reads stdin"),
    sampling: dict = None,
    max_tokens: int = typer.Option(-1, "-n", "--max-tokens", help="-1: until end of text or a full context"),
    stop: List[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    system: Optional[str] = typer.Option(None, "-sys", "--system", help="system message"),
    raw: bool = typer.Option(False, "--raw", help="no chat template: the prompt is the raw text"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="never stop at end-of-text tokens"),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="answer with JSON this schema (a JSON "
                                               "file) accepts, by constrained decoding"),
    engine: EngineOptions = None,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object with text, ids, usage and timings"),
    stream_json: bool = typer.Option(False, "--stream-json", help="one JSON line per text piece, then a summary line"),
    each_line: bool = typer.Option(False, "--each-line", help="answer each stdin line as its own prompt, in order"),
    routing_trace: Optional[Path] = typer.Option(None, "--routing-trace", help="write one JSON line per (token, layer)"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="timings on stderr"),
):
    """Generate a reply to PROMPT and print it."""
    from dataclasses import replace

    from .api import load

    params = _sampling(model, **sampling)
    if max_tokens < -1:
        raise UsageError(f"--max-tokens must be -1 or more, got {max_tokens}")
    if engine.threads is not None and engine.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {engine.threads}")
    if engine.n_ctx is not None and engine.n_ctx < 1:
        raise UsageError(f"--ctx-size must be at least 1, got {engine.n_ctx}")
    if as_json and stream_json:
        raise UsageError("--json and --stream-json exclude each other")
    if each_line and prompt not in (None, "-"):
        raise UsageError("--each-line reads prompts from stdin; drop the PROMPT argument")
    schema = _read_schema(json_schema) if json_schema is not None else None
    prompts = _read_lines() if each_line else [_read_prompt(prompt)]
    m = load(model, replace(engine, routing_trace=routing_trace is not None))
    if raw and system is not None:
        raise UsageError("--system needs the chat template (drop --raw)")
    if routing_trace is not None and routing_trace.exists() and routing_trace.is_dir():
        raise UsageError(f"--routing-trace {routing_trace} is a directory")
    mode = "json" if as_json else "stream-json" if stream_json else "text"
    trace: list = []
    for text in prompts:
        trace += _answer(m, model, text, mode=mode, raw=raw, system=system, max_tokens=max_tokens, stop=stop,
                         params=params, ignore_eos=ignore_eos, verbose=verbose, schema=schema)
    if routing_trace is not None:
        _write_trace(routing_trace, trace)


def _read_lines() -> list[str]:
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("--each-line reads prompts from stdin, which is a terminal", hint="pipe the prompts in")
    return [line.rstrip("\r\n") for line in sys.stdin if line.strip()]


def _read_schema(path: Path) -> dict:
    """The JSON schema in a file, checked (a grammar compiled from it) before any model loads."""
    from quant import jsonio

    from .structured import schema_grammar

    try:
        if path.stat().st_size > MAX_SCHEMA_BYTES:
            raise UsageError(f"--json-schema {path} is larger than {MAX_SCHEMA_BYTES} bytes")
        schema = jsonio.loads(path.read_bytes())
    except OSError as e:
        raise UsageError(f"--json-schema {path}: cannot read it: {e.strerror or e}") from None
    except (ValueError, RecursionError):
        raise UsageError(f"--json-schema {path} is not valid JSON") from None
    try:
        schema_grammar(schema)
    except UsageError as e:
        raise UsageError(f"--json-schema {path}: {e}") from None
    return schema


def _answer(m, model: str, text: str, *, mode: str, raw: bool, system, max_tokens: int, stop, params, ignore_eos,
            verbose: bool, schema: dict | None = None) -> list:
    """Generate one reply and print it as text, one JSON object, or a stream of JSON lines; returns its routing
    trace (empty unless the model traces routing)."""
    if raw:
        ids = m.tokenize(text)
    else:
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": text}]
        ids = m.chat_ids(msgs)
    limit = m.n_ctx if max_tokens == -1 else max_tokens
    pieces: list[str] = []
    final = None
    for ev in m.generate(ids, max_tokens=limit, stop=stop, sampler=params, ignore_eos=ignore_eos, json_schema=schema):
        if ev.finish_reason is not None:
            final = ev
            break
        pieces.append(ev.text)
        if mode == "text" and ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        elif mode == "stream-json" and ev.text:
            sys.stdout.write(json.dumps({"text": ev.text, "token": ev.token}, ensure_ascii=False) + "\n")
            sys.stdout.flush()
    summary = final.stats.summary(model, m.load_s)
    if mode == "json":
        obj = {"model": model, "text": "".join(pieces), "tokens": final.tokens, **summary}
        sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    elif mode == "stream-json":
        sys.stdout.write(json.dumps({"done": True, "tokens": final.tokens, **summary}) + "\n")
    elif not "".join(pieces).endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose:
        prompt_speed, gen_speed = final.timings.speeds()
        sys.stderr.write(f"prompt: {prompt_speed} | generation: {gen_speed} | load {m.load_s:.2f} s | "
                         f"threads: {m.thread_policy.describe()} | finish: {final.finish_reason}\n")
    return final.stats.trace


def _write_trace(path: Path, trace: list) -> None:
    """One JSON line per (token position, layer): expert ids and weights; written atomically."""
    from .store import write_text_atomic

    lines = []
    for pos0, layer, ids, wts in trace:
        for t in range(ids.shape[0]):
            lines.append(json.dumps({"pos": pos0 + t, "layer": layer, "experts": ids[t].tolist(),
                                     "weights": [round(float(x), 6) for x in wts[t]]}))
    write_text_atomic(path, "".join(line + "\n" for line in lines))


@app.command()
@flag_group("sampling", SAMPLING_FLAGS, dict)
@engine_flags()
def chat(
    model: str = typer.Argument(..., help="model name, store entry, .gguf or .lmc path"),
    system: Optional[str] = typer.Option(None, "-sys", "--system", help="system message"),
    sampling: dict = None,
    max_tokens: int = typer.Option(-1, "-n", "--max-tokens", help="per reply; -1: until end of text"),
    engine: EngineOptions = None,
):
    """Chat with a model in the terminal (/help lists the commands)."""
    from .repl import run_chat

    params = _sampling(model, **sampling)
    if max_tokens < -1:
        raise UsageError(f"--max-tokens must be -1 or more, got {max_tokens}")
    code = run_chat(model, system=system, sampling=params, max_tokens=max_tokens, engine=engine)
    if code:
        raise typer.Exit(code)


@app.command()
@engine_flags()
def serve(
    model: Optional[str] = typer.Argument(None, help="default model (requests may name another)"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(11435, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LMCLI_API_KEY",
                                          help="required as a Bearer token; needed for a non-loopback host"),
    cors_origin: Optional[str] = typer.Option(None, "--cors-origin", help="allow this browser origin"),
    queue_size: int = typer.Option(8, "--queue-size", help="requests that may wait; more get 503"),
    prefix_cache: int = typer.Option(4, "--prefix-cache", help="KV caches of recent requests kept for a prompt "
                                                               "that continues one (0: off)"),
    parallel: int = typer.Option(4, "--parallel", help="requests decoding together, one batched forward pass "
                                                       "per token (1: one at a time)"),
    engine: EngineOptions = None,
):
    """Serve the OpenAI API (chat completions, completions, models) and the Ollama API on a local port."""
    from .server import serve as _serve

    if not 0 < port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {port}")
    _serve(model, host=host, port=port, api_key=api_key, cors_origin=cors_origin, queue_size=queue_size,
           prefix_cache=prefix_cache, parallel=parallel, options=engine)


@app.command()
def ps(
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(11435, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LMCLI_API_KEY"),
    as_json: bool = typer.Option(False, "--json", help="print the server's /api/ps answer"),
):
    """Show the model a running `lmcli serve` holds in memory (its Ollama-style /api/ps)."""
    import urllib.error
    import urllib.request

    from .errors import LmcliError

    if not 0 < port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {port}")
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    url = f"http://{shown}:{port}/api/ps"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            body = json.loads(r.read(1 << 20))
        rows = body["models"]
    except urllib.error.HTTPError as e:
        raise LmcliError(f"the server at {url} answered {e.code}", hint="pass --api-key" if e.code == 401 else None)
    except (OSError, ValueError, KeyError, TypeError):
        raise LmcliError(f"no lmcli server answers at {url}", hint="start one with lmcli serve, or pass --port")
    if as_json:
        typer.echo(json.dumps(body))
        return
    typer.echo(f"{'NAME':<32} {'SIZE':>10} {'CONTEXT':>8}")
    for m in rows:
        typer.echo(f"{m['name']:<32} {m['size'] / 2**20:>6.0f} MiB {m['context_length']:>8}")


@app.command()
def pull(
    spec: str = typer.Argument(..., help="NAME (models.toml), ORG/REPO[@REVISION], or hf.co/ORG/REPO:QUANT (GGUF)"),
    name: Optional[str] = typer.Option(None, "--name", help="store name (default: the short name or repo name)"),
    revision: Optional[str] = typer.Option(None, "--revision", help="branch, tag or commit to pin"),
    qtype: Optional[str] = typer.Option(None, "--type", help="q4_0 | q4_1 | q8_0 | f16 | q4_k | q5_k | q6_k | q4_k_m | "
                                        "q5_k_m (default: the registry's)"),
    mix: Optional[str] = typer.Option(None, "--mix", help="uniform | moe (MoE: routed experts at --type, the rest "
                                      "at q8_0)"),
    keep_source: bool = typer.Option(False, "--keep-source", help="keep the downloaded source files"),
    force: bool = typer.Option(False, "--force", help="replace an existing model of that name"),
):
    """Download a model from the Hugging Face Hub and convert it shard by shard into the store."""
    from .hub import pull as _pull
    from .pull_ui import PullProgress

    path = _pull(spec, name=name, revision=revision, qtype=qtype, keep_source=keep_source, force=force,
                 ui=PullProgress() if sys.stderr.isatty() else None, mix=mix)
    typer.echo(f"pulled {spec} -> {path}")


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json")):
    """CPU features, cores, memory, store disk space, Numba cache state and measured read bandwidth."""
    from .doctor import report

    _print_report(report(), as_json, "doctor")


@app.command()
# what run would be given: plan says what run will do
@engine_flags("n_ctx", "kv_type", "expert_cache_mib", "use_mmap")
def plan(
    model: str = typer.Argument(..., help="model name (a registry name works before download) or path"),
    memory: Optional[str] = typer.Option(None, "--memory", help="memory budget, e.g. 8G (default: available)"),
    trace: Optional[Path] = typer.Option(None, "--trace", help="a routing trace (lmcli run --routing-trace FILE): "
                                                              "replay it through the expert cache instead of "
                                                              "assuming uniform routing"),
    as_json: bool = typer.Option(False, "--json"),
    engine: EngineOptions = None,
):
    """Expected size, bytes read per token, where run keeps the weights, and decode tokens/s, without loading it."""
    from .doctor import plan as _plan

    _print_report(_plan(model, memory=memory, trace=trace, options=engine), as_json, "plan")


def _print_report(r: dict, as_json: bool, kind: str) -> None:
    """--json: the report as one JSON object for scripts; otherwise readable tables (lmcli.view)."""
    if as_json:
        typer.echo(json.dumps(r))
    else:
        from .view import print_report

        print_report(r, kind)


@app.command()
# the thread count is swept; the context fits the run
@engine_flags("moe_topk", "kv_type", "expert_cache_mib", "use_mmap")
def bench(
    model: str = typer.Argument(..., help="model name or path"),
    prompt_tokens: int = typer.Option(128, "-p", help="prompt length for prefill"),
    gen_tokens: int = typer.Option(64, "-n", help="tokens to decode"),
    threads: str = typer.Option("1,2", "-t", "--threads", help="comma-separated thread counts to sweep"),
    reps: int = typer.Option(3, "-r", "--reps", help="repetitions (medians are reported)"),
    engine: EngineOptions = None,
    as_json: bool = typer.Option(False, "--json"),
):
    """Measure prefill and decode tokens/s against the machine's read bandwidth, per phase and thread count."""
    from .bench import format_bench, run_bench

    try:
        ths = [int(t) for t in threads.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--threads must be comma-separated integers, got {threads!r}") from None
    if not ths or min(ths) < 1 or prompt_tokens < 1 or gen_tokens < 1 or reps < 1:
        raise UsageError("-p, -n, -r and every --threads value must be at least 1")
    r = run_bench(model, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, threads=ths, reps=reps, engine=engine)
    typer.echo(json.dumps(r) if as_json else format_bench(r))


@app.command("import")
def import_cmd(
    file: Path = typer.Argument(..., help="a .gguf file, or a container (.lmc) that `lmcli quantize` wrote"),
    name: Optional[str] = typer.Argument(None, help="store name (default: the file name)"),
    force: bool = typer.Option(False, "--force", help="replace an existing model of that name"),
):
    """Import a GGUF file (a lossless repack into lmcli's layout) or a container into the model store."""
    from .errors import ModelNotFound
    from .store import _gguf_store_name, copy_model, import_gguf_file, locate

    if not file.is_file():
        raise ModelNotFound(f"{file}: no such file")
    name = name or _gguf_store_name(file)
    if locate(str(file)).kind == "container":
        out = copy_model(str(file), name, force=force)  # a hard link where the file system allows
    else:
        out = import_gguf_file(file, name, force=force)
    typer.echo(f"imported {file.name} as {name} ({out.stat().st_size / 1e6:.1f} MB)")


@app.command()
def quantize(
    src: Path = typer.Argument(..., help="a local Hugging Face model directory (safetensors)"),
    out: Path = typer.Argument(..., help="the container to write (.lmc)"),
    qtype: str = typer.Option("q4_0", "--type", help="q4_0 | q4_1 | q8_0 | f16 | q4_k | q5_k | q6_k, or llama.cpp's "
                              "q4_k_m | q5_k_m (its per-tensor types)"),
    mix: str = typer.Option("uniform", "--mix", help="uniform | moe (MoE: routed experts at --type, attention, "
                            "shared experts and dense layers at q8_0)"),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="importance matrix from `lmcli imatrix`: 4-, 5- and "
                                           "6-bit rounding weighted by it, as llama.cpp's"),
    force: bool = typer.Option(False, "--force", help="replace an existing OUT"),
    as_json: bool = typer.Option(False, "--json", help="print a summary with per-tensor RMS quantization error"),
):
    """Convert a Hugging Face checkpoint to a 4-bit container, streaming one tensor at a time."""
    from quant.convert import convert_hf, skipped_line

    from .errors import model_file_errors

    if out.suffix == ".gguf":
        raise UsageError("the container is not a GGUF file; name it .lmc (use `lmcli export` for GGUF)")
    if out.exists() and not force:
        raise UsageError(f"{out} exists", hint="pass --force to replace it")
    imp = None
    if imatrix is not None:
        from quant.imatrix import load as load_imatrix

        with model_file_errors():
            imp = load_imatrix(imatrix)
    progress = None
    bar = None
    if sys.stderr.isatty() and not as_json:
        from .ui import progress_bar

        bar = progress_bar(f"quantizing {src.name}")
        progress = bar.update
    try:
        with model_file_errors():
            summary = convert_hf(src, out, qtype, overwrite=force, progress=progress, mix=mix, imatrix=imp)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        typer.echo(f"wrote {out} ({summary['output_bytes'] / 1e6:.1f} MB from {summary['input_bytes'] / 1e6:.1f} MB "
                   f"in {summary['seconds']:.1f} s)")
        for (was, now), kept in _fallbacks(summary).items():
            names = ", ".join(kept[:3]) + (f" and {len(kept) - 3} more" if len(kept) > 3 else "")
            typer.echo(f"{len(kept)} matrices kept at {now}, their rows not whole {was} blocks: {names}")
        if summary["skipped"]:
            typer.echo(skipped_line(summary["skipped"]))
        if imp is not None:
            typer.echo(f"{summary['imatrix']} matrices rounded with the importance matrix")


def _fallbacks(summary: dict) -> dict[tuple[str, str], list[str]]:
    """(format chosen, format written) -> the matrices that fell back, sorted by name."""
    out: dict[tuple[str, str], list[str]] = {}
    for name in sorted(summary["fallback"]):
        out.setdefault((summary["fallback_from"][name], summary["fallback"][name]), []).append(name)
    return out


@app.command()
def imatrix(
    model: str = typer.Argument(..., help="the model to measure (name or path; best an f16 or q8_0 conversion)"),
    text: Path = typer.Argument(..., help="calibration text (a UTF-8 file)"),
    out: Path = typer.Option(..., "-o", "--out", help="the importance matrix to write (.npz)"),
    ctx: int = typer.Option(512, "--ctx", help="tokens per chunk"),
    chunks: int = typer.Option(0, "--chunks", help="at most this many chunks (0: the whole text)"),
    force: bool = typer.Option(False, "--force", help="replace an existing OUT"),
):
    """Measure each matrix's input activations on a text (for quantize --imatrix), with lmcli's forward pass."""
    from quant.imatrix import Collector

    from .api import load
    from .engine import weights
    from .engine.options import EngineOptions

    if ctx < 2:
        raise UsageError(f"--ctx must be at least 2, got {ctx}")
    if chunks < 0:
        raise UsageError(f"--chunks must be 0 or more, got {chunks}")
    if out.suffix != ".npz":
        raise UsageError(f"{out.name}: name the importance matrix .npz")
    if out.exists() and not force:
        raise UsageError(f"{out} exists", hint="pass --force to replace it")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent} is not a directory")
    try:
        body = text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {text}: {getattr(e, 'strerror', None) or e}") from None
    m = load(model, EngineOptions(n_ctx=ctx))
    ids = m.tokenize(body)
    parts = [ids[i:i + ctx] for i in range(0, len(ids) - 1, ctx)]
    parts = [p for p in parts if len(p) >= 2][: chunks or None]
    if not parts:
        raise UsageError(f"{text} is too short: it has {len(ids)} tokens")
    col = Collector()
    weights.OBSERVER = col
    try:
        for p in parts:
            m.transformer.forward(p, m.transformer.new_cache(len(p)))
    finally:
        weights.OBSERVER = None
    n = col.save(out)
    typer.echo(f"wrote {out}: {n} matrices from {sum(map(len, parts))} tokens in {len(parts)} chunks")


@app.command()
def export(
    model: str = typer.Argument(..., help="model name or container path"),
    out: Path = typer.Argument(..., help="the GGUF file to write"),
    force: bool = typer.Option(False, "--force", help="replace an existing OUT"),
):
    """Export a model as a GGUF file that llama.cpp and ollama run."""
    from quant.gguf_export import export_gguf

    from .errors import model_file_errors
    from .store import resolve

    if out.exists() and not force:
        raise UsageError(f"{out} exists", hint="pass --force to replace it")
    with model_file_errors():
        path = export_gguf(resolve(model), out, overwrite=force)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json")):
    """List the models in the store."""
    from .store import list_models

    rows = list_models()
    if as_json:
        typer.echo(json.dumps(rows))
        return
    if not rows:
        typer.echo("no models in the store")
        return
    for r in rows:
        typer.echo(f"{r['name']:<32} {r.get('size', 0) / 1e6:>10.1f} MB  {r.get('created', '')}")


@app.command()
def show(model: str = typer.Argument(...), template: bool = typer.Option(False, "--template"),
         as_json: bool = typer.Option(False, "--json")):
    """Show a model's architecture, parameters, experts, tensor formats, bytes per token and chat template."""
    from .store import show_info

    info = show_info(model)
    if as_json:
        typer.echo(json.dumps(info))
        return
    if template:
        typer.echo(info.get("chat_template") or "(no chat template: ChatML is used)")
        return
    info["chat_template"] = "present (--template prints it)" if info.get("chat_template") else "none: ChatML is used"
    _print_report(info, False, "show")


@app.command()
def cp(src: str = typer.Argument(...), dst: str = typer.Argument(...),
       force: bool = typer.Option(False, "--force", help="replace an existing DST")):
    """Copy a model in the store under a new name."""
    from .store import copy_model

    typer.echo(f"copied {src} -> {copy_model(src, dst, force=force)}")


@app.command()
def rm(name: str = typer.Argument(...)):
    """Remove a model (or an unfinished pull) from the store."""
    from .store import remove_model

    remove_model(name)
    typer.echo(f"removed {name}")


def _fail(msg: str, hint: str | None, code: int) -> int:
    line = f"error: {msg}" + (f" ({hint})" if hint else "")
    sys.stderr.write(line.replace("\n", " ") + "\n")
    return code


def _click_exceptions():
    """Typer >= 0.2x vendors click as typer._click; older ones use click itself. Match either."""
    mods = [click.exceptions]
    try:
        from typer._click import exceptions as vendored

        mods.append(vendored)
    except ImportError:
        pass
    aborts = tuple({a for a in (click.exceptions.Abort, getattr(typer, "Abort", None)) if a is not None})
    return (tuple(m.ClickException for m in mods), aborts,
            tuple(m.NoArgsIsHelpError for m in mods if hasattr(m, "NoArgsIsHelpError")))


_show_warning = warnings.showwarning


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    """lmcli's warnings (lmcli.errors.LmcliWarning) as one `note:` line on stderr; others as Python shows them."""
    if issubclass(category, LmcliWarning):
        sys.stderr.write(f"note: {message}\n")
    else:
        _show_warning(message, category, filename, lineno, file, line)


def _first_compile_note(args: list[str]) -> None:
    """On a terminal, before a command that runs a model: say so when Numba has no compiled kernels cached yet
    (the first run compiles them for this CPU, about a minute, silent otherwise)."""
    if not (args[:1] and args[0] in ("run", "chat", "serve", "bench") and sys.stderr.isatty()):
        return
    from .doctor import numba_cache_dirs, numba_cache_files

    from . import warm

    if numba_cache_files(numba_cache_dirs()) == 0:
        sys.stderr.write("compiling lmcli's kernels for this CPU: once, under a minute (later runs start at once)\n")
        sys.stderr.flush()
    warm.REPORT = CompileLine()


class CompileLine:
    """The line a first run shows while worker processes compile the model's kernels (lmcli.warm): kernels done of
    all and the seconds so far, redrawn every second, since one large kernel (a MoE's expert matmuls) can take 20 s
    and a count that stands still looks hung. Called with done=0 when a compile starts, done=total when it ends;
    stop() ends the redraws where they are (an interrupted compile)."""

    def __init__(self, out=None, every: float = 1.0):
        self.out, self.every = out, every
        self.t0 = 0.0
        self.done = self.total = 0
        self.lock = threading.Lock()
        self.gen, self.active = 0, False  # which compile is drawn (each start counts one), and whether one is

    def __call__(self, done: int, total: int) -> None:
        with self.lock:
            if done == 0:  # a compile starts: the line and its clock
                self.t0, self.gen, self.active = time.monotonic(), self.gen + 1, True
                threading.Thread(target=self._tick, args=(self.gen,), daemon=True).start()
            elif not self.active:
                return
            self.done, self.total = done, total
            ended = done >= total
            self._draw(ended)
            if ended:
                self.active = False

    def stop(self) -> None:
        with self.lock:
            self.active = False

    def _tick(self, run: int) -> None:
        while True:
            time.sleep(self.every)
            with self.lock:
                if not self.active or self.gen != run:
                    return
                self._draw(False)

    def _draw(self, ended: bool) -> None:
        out = self.out or sys.stderr
        out.write(f"\rcompiling kernels for this model: {self.done}/{self.total} ({time.monotonic() - self.t0:.0f} s)"
                  + ("\n" if ended else ""))
        out.flush()


def main(argv: list[str] | None = None) -> int:
    from .threads import configure_pool

    configure_pool()  # before anything loads libgomp
    warnings.showwarning = _note
    _first_compile_note(list(sys.argv[1:] if argv is None else argv))
    cmd = typer.main.get_command(app)
    click_errors, aborts, no_args = _click_exceptions()
    try:
        rv = cmd.main(args=argv, prog_name="lmcli", standalone_mode=False)
        if isinstance(rv, int) and rv == 130:
            sys.stderr.write("\ninterrupted\n")
        return rv if isinstance(rv, int) else 0  # typer returns Exit codes (130 on Ctrl+C) in this mode
    except LmcliError as e:
        return _fail(str(e), e.hint, e.exit_code)
    except no_args as e:
        sys.stderr.write(e.ctx.get_help() + "\n")
        return 2
    except click_errors as e:
        return _fail(e.format_message(), None, 2)
    except (KeyboardInterrupt, *aborts):
        sys.stderr.write("\ninterrupted\n")
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error of ours.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except Exception as e:  # a bug: one line, the traceback only on request
        if os.environ.get("LMCLI_DEBUG"):
            raise
        return _fail(f"internal error: {type(e).__name__}: {e}", "set LMCLI_DEBUG=1 for a traceback", 1)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
