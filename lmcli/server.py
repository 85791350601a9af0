"""An OpenAI-compatible HTTP server (Starlette + uvicorn): one model in memory; up to --parallel generations
decode together, one batched forward pass per step (continuous batching)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as _dt
import hmac
import ipaddress
import json
import math
import queue
import re
import secrets
import socket
import threading
import time
import traceback
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from quant import jsonio

from .errors import ContextOverflow, LmcliError, ModelNotFound, TemplateError, UsageError
from .prefix_cache import DEFAULT_SIZE as DEFAULT_PREFIX_CACHE, PrefixCache

if TYPE_CHECKING:
    from .engine.options import EngineOptions

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
ROLES = ("system", "user", "assistant", "tool")  # "developer" (OpenAI's newer name) is read as "system"
MAX_STOP = 4  # OpenAI's limit on stop strings
MAX_STOP_LEN = 256
MAX_TOKENS_LIMIT = 1 << 20  # the largest context lmcli.api accepts
RETRY_AFTER_S = 2
DEFAULT_PARALLEL = 4  # sequences decoding together (llama-server's -np)
RECENT_REQUESTS = 256  # per-request counters kept in app.state.stats
# Request fields lmcli cannot honour: refused rather than silently ignored.
UNSUPPORTED = ("functions", "logit_bias", "suffix")
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_LEGACY_LOGPROBS = 5  # OpenAI's limit for /v1/completions


# --- errors in OpenAI's shape ---------------------------------------------------------------

class ApiError(LmcliError):
    """An error for an HTTP client: status code and OpenAI's {message, type, param, code}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _show(v: Any) -> str:
    """A client's value for an error message, short (never echo a megabyte back)."""
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


# --- request parsing: JSON body -> plain data, every field validated ------------------------------

@dataclass(frozen=True)
class GenRequest:
    """A validated completion request (chat: messages; text: prompt)."""

    kind: str  # "chat" or "text"
    model: str | None
    messages: list[dict] | None
    prompt: str | None
    max_tokens: int | None  # None: as many as the context leaves after the prompt
    stop: list[str]
    sampling: dict  # SamplerParams fields the request set
    stream: bool
    include_usage: bool
    ignore_eos: bool  # an extension llama.cpp's and vLLM's servers share
    json_schema: dict | None = None  # constrained decoding: the answer is a document this schema accepts
    top_logprobs: int | None = None  # None: no logprobs; else alternatives per token (chat's logprobs: true)
    tools: list[dict] | None = None  # OpenAI tools the model may call (lmcli.tools)
    call_schema: dict | None = None  # tool_choice required or named: the call itself is constrained to this


def _number(body: dict, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
          and (lo < v if lo_open else lo <= v) and v <= hi)
    if not ok:
        raise _bad(f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {_show(v)}", name)
    return float(v)


def _integer(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _bad(f"{name} must be an integer in [{lo}, {hi}], got {_show(v)}", name)
    return v


def _flag(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(f"{name} must be true or false, got {_show(v)}", name)
    return v


def _content(v: Any, where: str) -> str:
    """Message content: a string, null, or a list of text parts (images and audio are refused)."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        texts = []
        for part in v:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"{where}: only text content parts are supported", where)
            texts.append(part["text"])
        return "\n".join(texts)
    raise _bad(f"{where} must be a string or a list of text parts", where)


def _messages(v: Any) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise _bad("messages must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object", f"messages[{i}]")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {_show(m.get('role'))}",
                       f"messages[{i}].role")
        msg = {"role": role, "content": _content(m.get("content"), f"messages[{i}].content")}
        if role == "assistant" and m.get("tool_calls"):  # a call the model made earlier, and (role tool) its result
            msg["tool_calls"] = m["tool_calls"]
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def _stop(v: Any) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) for s in stops) \
            or any(len(s) > MAX_STOP_LEN for s in stops):
        raise _bad(f"stop must be a string or a list of at most {MAX_STOP} strings of at most {MAX_STOP_LEN} "
                   "characters", "stop")
    return [s for s in stops if s]


def checked_schema(schema: Any, param: str) -> dict | bool:
    """A JSON schema constrained decoding can follow (compiled once here to tell the client at once); else 400."""
    from .structured import schema_grammar

    if not isinstance(schema, (dict, bool)):
        raise _bad(f"{param} must be a JSON schema object", param)
    try:
        schema_grammar(schema)
    except UsageError as e:
        raise _bad(f"{param}: {e}", param) from None
    return schema


def _response_format(v: Any) -> dict | bool | None:
    """OpenAI's response_format: text (no constraint), json_object, or json_schema with its schema."""
    from .structured import JSON_OBJECT

    if v is None:
        return None
    kind = v.get("type") if isinstance(v, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT
    if kind == "json_schema":
        js = v.get("json_schema")
        if not isinstance(js, dict):
            raise _bad("response_format.json_schema must be an object", "response_format")
        return JSON_OBJECT if js.get("schema") is None else checked_schema(js["schema"], "response_format")
    raise _bad("response_format.type must be text, json_object or json_schema", "response_format")


def _top_logprobs(body: dict, kind: str) -> int | None:
    """Chat: logprobs true (with top_logprobs alternatives); text completions: logprobs, the alternatives' count."""
    if kind != "chat":
        if body.get("top_logprobs") is not None:
            raise _bad("top_logprobs is a chat field (completions take logprobs: N)", "top_logprobs")
        return _integer(body, "logprobs", 0, MAX_LEGACY_LOGPROBS)
    on = _flag(body, "logprobs")
    n = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if n is not None and not on:
        raise _bad("top_logprobs requires logprobs to be true", "top_logprobs")
    return (n or 0) if on else None


def parse_request(body: dict, kind: str) -> GenRequest:
    """Validate a /v1/chat/completions (kind "chat") or /v1/completions ("text") body; ApiError 400 if wrong."""
    for name in UNSUPPORTED:
        if body.get(name) not in (None, [], {}, ""):
            raise _bad(f"{name} is not supported by this server", name)
    if body.get("echo") not in (None, False):
        raise _bad("echo is not supported by this server", "echo")
    for name in ("n", "best_of"):
        if _integer(body, name, 1, 1 << 20) not in (None, 1):
            raise _bad(f"{name} must be 1 (one choice per request)", name)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model must be a string", "model")
    messages = prompt = None
    if kind == "chat":
        messages = _messages(body.get("messages"))
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1:
            p = p[0]
        if not isinstance(p, str) or not p:
            raise _bad("prompt must be a non-empty string", "prompt")
        prompt = p
    max_tokens = _integer(body, "max_tokens", 1, MAX_TOKENS_LIMIT)
    mct = _integer(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT)
    if mct is not None:
        max_tokens = mct
    sampling = {
        "temp": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, lo_open=True),
        "min_p": _number(body, "min_p", 0.0, 1.0),
        "repeat_penalty": _number(body, "repeat_penalty", 0.0, 10.0, lo_open=True),
        "top_k": _integer(body, "top_k", 0, MAX_TOKENS_LIMIT),
        "seed": _integer(body, "seed", 0, 2**64 - 1),
        "presence_penalty": _number(body, "presence_penalty", -2.0, 2.0),
        "frequency_penalty": _number(body, "frequency_penalty", -2.0, 2.0),
    }
    stream = _flag(body, "stream")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise _bad("stream_options must be an object", "stream_options")
    include_usage = _flag(so or {}, "include_usage")
    if include_usage and not stream:
        raise _bad("stream_options is only allowed when stream is true", "stream_options")
    tools, call_schema = _tools(body, kind)
    # chat_template (and chat_template_kwargs) in a request are ignored: templates come only from the model.
    return GenRequest(tools=tools, call_schema=call_schema, kind=kind, model=model, messages=messages, prompt=prompt, max_tokens=max_tokens,
                      stop=_stop(body.get("stop")), sampling={k: v for k, v in sampling.items() if v is not None},
                      stream=stream, include_usage=include_usage, ignore_eos=_flag(body, "ignore_eos"),
                      json_schema=_response_format(body.get("response_format")),
                      top_logprobs=_top_logprobs(body, kind))


def _tools(body: dict, kind: str) -> tuple[list[dict] | None, dict | None]:
    """(tools, call schema) of a request: tool_choice auto (the default) lets the model answer or call, the
    calls parsed from its family's format; required or a named function makes the answer one call, as a JSON
    object {name, arguments} constrained to the tools' schemas; none leaves the tools out."""
    from .tools import ToolCallError, check_tools

    raw, choice = body.get("tools"), body.get("tool_choice")
    if raw in (None, []):
        if choice not in (None, "none", "auto"):
            raise _bad("tool_choice needs tools", "tool_choice")
        return None, None
    if kind != "chat":
        raise _bad("tools are for chat completions", "tools")
    try:
        tools = check_tools(raw)
    except ToolCallError as e:
        raise _bad(str(e), "tools") from None
    if choice in (None, "auto"):
        return tools, None
    if choice == "none":
        return None, None
    names = [t["function"]["name"] for t in tools]
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise _bad(f"tool_choice names {_show(name)}, which is not among the tools", "tool_choice")
        names = [name]
    elif choice != "required":
        raise _bad("tool_choice must be none, auto, required or {type: function, function: {name}}", "tool_choice")
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               "arguments": t["function"]["parameters"]},
              "required": ["name", "arguments"], "additionalProperties": False}
             for t in tools if t["function"]["name"] in names]
    return tools, checked_schema(calls[0] if len(calls) == 1 else {"anyOf": calls}, "tools")


# --- the Ollama API: its bodies translated to the same requests, its answers NDJSON ------------------------

_OLLAMA_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "seed": "seed", "repeat_penalty": "repeat_penalty", "num_predict": "max_tokens", "stop": "stop",
                   "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}


def ollama_request(body: dict, kind: str) -> GenRequest:
    """An Ollama /api/chat (kind "chat") or /api/generate ("text") body as a GenRequest: its options become the
    OpenAI fields they mean; streaming is Ollama's default. Unknown options are refused as the OpenAI side does."""
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise _bad("options must be an object", "options")
    unknown = sorted(set(opts) - set(_OLLAMA_OPTIONS) - {"num_ctx"})
    if unknown:
        raise _bad(f"option {unknown[0]!r} is not supported by this server", f"options.{unknown[0]}")
    for name in ("images",):
        if body.get(name) not in (None, [], ""):
            raise _bad(f"{name} is not supported by this server", name)
    oa = {_OLLAMA_OPTIONS[k]: v for k, v in opts.items() if k in _OLLAMA_OPTIONS}
    fmt = body.get("format")
    if fmt == "json":
        oa["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        oa["response_format"] = {"type": "json_schema", "json_schema": {"schema": checked_schema(fmt, "format")}}
    elif fmt not in (None, ""):
        raise _bad('format must be "json" or a JSON schema object', "format")
    if oa.get("max_tokens") in (-1, -2):
        oa.pop("max_tokens")  # Ollama's "until the context is full"
    oa.update(model=body.get("model"), stream=body.get("stream", True), tools=body.get("tools"))
    if kind == "chat":
        oa["messages"] = body.get("messages")
    else:
        prompt, system = body.get("prompt"), body.get("system")
        if not isinstance(prompt, str) or not prompt:
            raise _bad("prompt must be a non-empty string", "prompt")
        if body.get("raw") not in (None, False, True) or (system is not None and not isinstance(system, str)):
            raise _bad("raw must be true or false and system a string", "raw")
        if body.get("raw"):
            oa["prompt"] = prompt
        else:  # Ollama's /api/generate applies the chat template unless raw
            kind = "chat"
            oa["messages"] = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt}]
    req = parse_request(oa, kind)
    on = _flag(body, "logprobs")  # Ollama's: top-level logprobs and top_logprobs, for chat and generate alike
    n = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    return replace(req, top_logprobs=(n or 0) if on else None)


def ollama_line(shape: str, model: str, piece: str = "", done: bool = False, finish: str | None = None,
                use: dict | None = None, seconds: float = 0.0, logprobs: list[dict] | None = None,
                calls: list[dict] | None = None) -> dict:
    """One NDJSON object of an Ollama answer: a piece of text, or (done) the last with the counts."""
    obj = {"model": model, "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z")}
    if shape == "chat":
        obj["message"] = {"role": "assistant", "content": piece}
        if calls:  # Ollama's tool calls carry their arguments as an object
            obj["message"]["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                                          "arguments": json.loads(c["function"]["arguments"])}}
                                            for c in calls]
    else:
        obj["response"] = piece
    if logprobs is not None:
        obj["logprobs"] = logprobs
    obj["done"] = done
    if done:
        use = use or {}
        obj.update(done_reason="stop" if finish == "tool_calls" else finish, total_duration=int(seconds * 1e9),
                   prompt_eval_count=use.get("prompt_tokens", 0), eval_count=use.get("completion_tokens", 0))
    return obj


# --- responses in OpenAI's shape ------------------------------------------------------------------

def completion_body(kind: str, rid: str, created: int, model: str, text: str, finish: str, use: dict,
                    logprobs: list[dict] | None = None, calls: list[dict] | None = None) -> dict:
    """A whole (non-streamed) chat.completion or text_completion object; logprobs: chat's content entries;
    calls: the tool calls the answer made (OpenAI's shape, lmcli.tools)."""
    if kind == "chat":
        message = {"role": "assistant", "content": text or (None if calls else "")}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message,
                  "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                  "finish_reason": finish}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [choice], "usage": use}
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish,
                         "logprobs": None if logprobs is None else legacy_logprobs(logprobs)}], "usage": use}


def legacy_logprobs(entries: list[dict], offset: int = 0) -> dict:
    """/v1/completions' logprobs from chat-shaped entries: parallel lists, alternatives as {text: logprob}, and
    each token's character offset in the completion (offset: the characters before these tokens)."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def chunk_body(kind: str, rid: str, created: int, model: str, *, delta: dict | None = None, text: str = "",
               finish: str | None = None, use: dict | None = None, usage_slot: bool = False,
               logprobs: list[dict] | None = None, offset: int = 0) -> dict:
    """One streamed chunk; with use (and no delta) the final usage chunk, whose choices are empty."""
    obj = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
           "created": created, "model": model}
    if use is not None:
        obj["choices"] = []
    elif kind == "chat":
        obj["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish,
                           "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None}}]
    else:
        obj["choices"] = [{"index": 0, "text": text, "finish_reason": finish,
                           "logprobs": None if logprobs is None else legacy_logprobs(logprobs, offset)}]
    if use is not None or usage_slot:
        obj["usage"] = use
    return obj


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


# --- the worker: one thread loads models and runs generations, batched step by step -------------------

@dataclass
class RequestStat:
    """What one request did; the worker updates tokens after every token, so a test can watch it."""

    id: str
    kind: str
    model: str
    prompt_tokens: int = 0
    tokens: int = 0  # completion tokens generated so far
    finish_reason: str | None = None  # stop | length | cancelled (the client went away) | error | rejected
    done: bool = False  # the worker is finished with it
    tokens_at_cancel: int | None = None  # tokens when the cancel came (the client left): how late the stop was


class Cancel(threading.Event):
    """A request's cancel flag; notes how many tokens were out when it was first set."""

    def __init__(self, stat: RequestStat):
        super().__init__()
        self.stat = stat

    def set(self) -> None:
        if not self.is_set():
            self.stat.tokens_at_cancel = self.stat.tokens
        super().set()


@dataclass
class Stats:
    """Server counters (app.state.stats): queue depth and the most recent requests by id."""

    waiting: int = 0  # admitted, not started
    running: int = 0  # generating now (at most --parallel)
    rejected: int = 0  # answered 503
    tokens: int = 0  # completion tokens generated since start
    requests: OrderedDict = field(default_factory=OrderedDict)  # id -> RequestStat
    # totals since start for /metrics: requests by how they ended, prompt tokens, seconds of prefill and decode
    finished: dict = field(default_factory=dict)  # finish_reason -> requests
    prompt_tokens: int = 0  # prefilled (fed to the model)
    cached_tokens: int = 0  # prompt tokens a kept KV cache already held (prefix reuse): not prefilled again
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0  # completion tokens that came from decode steps (the first comes from the prefill)
    last_decode_tps: float = 0.0
    steps: int = 0  # batched forward passes over single tokens (one per decoding sequence)
    step_tokens: int = 0  # tokens those passes computed: step_tokens / steps is the mean batch
    max_batch: int = 0  # the largest batch so far

    def ended(self, st: RequestStat, timings=None) -> None:
        """Count a finished request (the worker's thread), with its timings when it ran."""
        self.finished[st.finish_reason] = self.finished.get(st.finish_reason, 0) + 1
        if timings is not None:
            self.prompt_tokens += timings.prompt_tokens
            self.prefill_s += timings.prefill_s
            self.decode_s += timings.decode_s
            self.decode_tokens += max(timings.completion_tokens - 1, 0)
            if timings.decode_tps:
                self.last_decode_tps = timings.decode_tps

    def new(self, kind: str, model: str) -> RequestStat:
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        st = self.requests[rid] = RequestStat(rid, kind, model)
        while len(self.requests) > RECENT_REQUESTS:
            self.requests.popitem(last=False)
        return st


@dataclass(frozen=True)
class Target:
    """A model as clients name it (id) and what the worker loads (spec: a store path, a name or a path)."""

    id: str
    spec: str


@dataclass
class Job:
    req: GenRequest
    target: Target
    stat: RequestStat
    cancel: threading.Event
    emit: Callable[[tuple], None]  # thread-safe: hands an item to the request's event loop


class Engine:
    """The single worker thread: Numba's thread count is per thread and the engine is not thread-safe.

    Continuous batching: up to `parallel` generations are active; each step runs one chunk of a waiting prompt
    (lmcli.engine.model.PREFILL_CHUNK tokens) and one batched forward over the next token of every decoding
    sequence (Transformer.forward_batch). Requests join between steps and leave as soon as they end or their
    client goes away. Other work (loading a model, embeddings, a request for another model) waits until no
    generation is active, so it never changes the model under them.
    """

    def __init__(self, stats: Stats, *, queue_size: int, options: EngineOptions | None,
                 load: Callable[..., Any], log: Callable[[str], None], prefix_cache: int = DEFAULT_PREFIX_CACHE,
                 parallel: int = DEFAULT_PARALLEL):
        self.stats, self.queue_size, self.options, self.parallel = stats, queue_size, options, parallel
        self.prefix = PrefixCache(prefix_cache)  # recent requests' KV caches, reused by a prompt they begin
        self._load, self._log = load, log
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._active: set[threading.Event] = set()
        self.model = None
        self.model_id: str | None = None

    def submit(self, fn: Callable[[], None] | Job, cancel: threading.Event | None = None, *,
               force: bool = False) -> bool:
        """Queue fn (or a generation Job) for the worker; False (and nothing queued) when `parallel` run and
        queue_size wait already."""
        with self._lock:
            if not force and self.stats.waiting + self.stats.running >= self.queue_size + self.parallel:
                return False
            self.stats.waiting += 1
            if cancel is not None:
                self._active.add(cancel)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="lmcli-engine", daemon=True)
                self._thread.start()
        self._jobs.put((fn, cancel))
        return True

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the worker thread and return its result (or raise its error); used to preload."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller's thread
                fut.set_exception(e)
        self.submit(run, force=True)
        return fut.result()

    def close(self) -> None:
        """Cancel every queued and running generation and stop the thread."""
        with self._lock:
            for ev in self._active:
                ev.set()
        if self._thread is not None:
            self._jobs.put(None)

    def _take(self, waiting: deque, block: bool) -> bool:
        """Move what has arrived into waiting (first waiting for one item when block); False once closed."""
        try:
            item = self._jobs.get() if block else self._jobs.get_nowait()
            while True:
                if item is None:
                    return False
                waiting.append(item)
                item = self._jobs.get_nowait()
        except queue.Empty:
            return True

    def _loop(self) -> None:
        waiting: deque = deque()  # (fn or Job, cancel) taken from the queue, not started
        active: dict = {}  # sequence coroutine -> [job, its Step, prompt ids done]
        while True:
            if not self._take(waiting, block=not active and not waiting):
                for co in list(active):
                    self._resume(active, co, None)
                return
            while waiting:  # admit in arrival order
                item, cancel = waiting[0]
                if isinstance(item, Job):
                    if active and (len(active) >= self.parallel or item.target.id != self.model_id):
                        break
                    waiting.popleft()
                    with self._lock:
                        self.stats.waiting -= 1
                    self._start(active, item)
                else:
                    if active:
                        break
                    waiting.popleft()
                    with self._lock:
                        self.stats.waiting -= 1
                        self.stats.running = 1
                    try:
                        item()
                    except BaseException:  # fn reports its own errors; never let the worker die
                        self._log("lmcli: worker error: " + traceback.format_exc().strip().replace("\n", " | "))
                    finally:
                        with self._lock:
                            self.stats.running = 0
                            self._active.discard(cancel)
            if active:
                self._step(active)

    def _start(self, active: dict, job: Job) -> None:
        co = self._sequence(job)
        with self._lock:
            self.stats.running = len(active) + 1
        try:
            active[co] = [job, next(co), 0]
        except StopIteration:
            self._finished(active, job)

    def _finished(self, active: dict, job: Job) -> None:
        with self._lock:
            self.stats.running = len(active)
            self._active.discard(job.cancel)

    def _resume(self, active: dict, co, logits) -> None:
        """Send co its step's logits (None: stop, its client left); keep its next step, or let it go."""
        job = active[co][0]
        try:
            active[co] = [job, co.send(logits), 0]
        except StopIteration:
            del active[co]
            self._finished(active, job)

    def _step(self, active: dict) -> None:
        """One step: up to PREFILL_CHUNK tokens of the prompts still prefilling (oldest first), then every other
        sequence's next token in one batched forward pass."""
        from .engine.model import PREFILL_CHUNK
        from .generate import run_steps

        for co, (job, _, _) in list(active.items()):
            if job.cancel.is_set():  # gone while waiting for its step: leave now
                self._resume(active, co, None)
        model = self.model
        if not active or model is None:
            return
        tr, pol = model.transformer, model.thread_policy
        ready: list = []  # (coroutine, logits)
        # a prompt starts from the CPUs other programs left free (ThreadPolicy.begin, which judges every count
        # afresh) only when nothing decodes: a request joining mid-decode leaves the others' measured count alone
        decoding = any(len(st.ids) == 1 for _, st, _ in active.values())
        try:
            budget = PREFILL_CHUNK  # a long prompt delays the others' next token by one chunk at most
            for co, (_, st, done) in list(active.items()):
                if len(st.ids) > 1 and budget > 0:
                    chunk = st.ids[done : done + budget]
                    budget -= len(chunk)
                    if not decoding:
                        pol.begin()
                    logits = tr.forward(chunk, st.cache)[-1]
                    if done + len(chunk) < len(st.ids):
                        active[co][2] = done + len(chunk)
                    else:
                        ready.append((co, logits))
            ones = [(co, st) for co, (_, st, _) in active.items() if len(st.ids) == 1]
            if ones:
                ready += zip([co for co, _ in ones], run_steps(tr, [st for _, st in ones], pol))
                self.stats.steps += 1
                self.stats.step_tokens += len(ones)
                self.stats.max_batch = max(self.stats.max_batch, len(ones))
        except Exception as e:  # a bug or a broken model file: every sequence of the step ends with the error
            self._log(f"lmcli: error in a batched step: {type(e).__name__}: {e}")
            for co in list(active):
                try:
                    co.throw(e)
                except StopIteration:
                    pass
                except BaseException:
                    pass
                job = active.pop(co)[0]
                self._finished(active, job)
            return
        for co, logits in ready:
            self._resume(active, co, logits)

    def get_model(self, target: Target):
        """The model for target, loading it (and dropping the previous one first) when it is another."""
        if self.model_id != target.id:
            self.model, self.model_id = None, None  # one model in memory: release the old mapping first
            self.prefix.drop()
            t0 = time.perf_counter()
            self.model = self._load(target.spec, self.options)
            self.model_id = target.id
            self._log(f"lmcli: loaded {target.id} in {time.perf_counter() - t0:.1f} s (context {self.model.n_ctx})")
        return self.model

    def warm_up(self, target: Target) -> float:
        """Load target and run one tiny generation (a 2-token prefill and a decode step), so that the first
        request does not pay for compiling kernels or faulting in pages; returns its seconds."""
        from .sampling import SamplerParams

        model = self.get_model(target)
        t0 = time.perf_counter()
        bos = model.tokenizer.bos_id
        ids = [bos if bos is not None else 0, 1 if bos != 1 else 2]
        cache = model.transformer.new_cache(8)
        for _ in model.generate(ids, max_tokens=2, sampler=SamplerParams(temp=0.0), cache=cache, ignore_eos=True):
            pass
        return time.perf_counter() - t0

    def _sequence(self, job: Job):
        """Generate for job, emitting ("start", n_prompt), ("text", piece, logprob entries)..., ("end", finish,
        usage). A coroutine: yields the Steps (forward passes) its generation needs and is sent their logits, or
        None to stop (its client left); the worker runs the steps of all active sequences together."""
        from .generate import Step

        st = job.stat
        timings = None  # the run's, once it has run
        try:
            if job.cancel.is_set():
                st.finish_reason = "cancelled"
                return
            model = self.get_model(job.target)
            req = job.req
            ids = model.chat_ids(req.messages, tools=req.tools) if req.kind == "chat" else model.tokenize(req.prompt)
            param = "messages" if req.kind == "chat" else "prompt"
            n_ctx = model.n_ctx
            if not ids:
                raise _bad("the prompt is empty", param)
            if len(ids) >= n_ctx:
                raise _bad(f"the prompt has {len(ids)} tokens; this model's context holds {n_ctx}, "
                           "with room for at least one generated token", param, "context_length_exceeded")
            if req.max_tokens is not None and req.max_tokens > n_ctx:
                raise _bad(f"max_tokens must be at most the context size {n_ctx}, got {req.max_tokens}", "max_tokens")
            limit = min(req.max_tokens or n_ctx, n_ctx - len(ids))  # capped by the context left after the prompt
            params = _sampler(job.target.id, req.sampling)
            st.prompt_tokens = len(ids)
            job.emit(("start", len(ids)))
            cache, reuse = self.prefix.take(job.target.id, ids, model.new_cache)  # prefill only what is new
            self.stats.cached_tokens += reuse
            held = list(ids)  # what the cache will hold: the prompt, then each token fed back
            events = model.generate(ids[reuse:], cache=cache, max_tokens=limit, stop=req.stop, sampler=params, ignore_eos=req.ignore_eos,
                                    json_schema=req.call_schema or req.json_schema, top_logprobs=req.top_logprobs)
            split = _CallSplit(model, req)
            lps: list[dict] = []  # logprob entries of tokens whose text is not out yet
            raw = events.raw()
            try:
                item = next(raw)
                while True:
                    if type(item) is Step:
                        logits = yield item
                        if logits is None or job.cancel.is_set():  # the client went away
                            st.finish_reason = "cancelled"
                            break
                        item = raw.send(logits)
                        continue
                    ev, item = item, None
                    if job.cancel.is_set():  # checked between tokens: the client went away
                        st.finish_reason = "cancelled"
                        break
                    if ev.finish_reason is not None:
                        rest, calls = split.finish()
                        if lps or rest:
                            job.emit(("text", rest, lps))
                        if calls:
                            job.emit(("tools", calls))
                        self.stats.tokens += ev.timings.completion_tokens - st.tokens
                        st.tokens = ev.timings.completion_tokens
                        timings = ev.timings
                        st.finish_reason = "tool_calls" if calls else ev.finish_reason
                        job.emit(("end", st.finish_reason, _usage(ev.stats.usage(), len(ids), reuse)))
                        break
                    if ev.token is not None:
                        st.tokens += 1
                        self.stats.tokens += 1
                        held.append(ev.token)
                    if ev.logprobs is not None:
                        lps.append(logprob_entry(model.tokenizer, ev.token, ev.logprobs))
                    piece = split.push(ev.text) if ev.text else ""
                    if piece:
                        job.emit(("text", piece, lps))
                        lps = []
                    item = next(raw)
            finally:
                events.close()
                timings = timings or events.stats().timings
                self.prefix.give(job.target.id, held, cache)
        except ApiError as e:
            st.finish_reason = "error"
            job.emit(("error", e))
        except ModelNotFound:
            st.finish_reason = "error"
            job.emit(("error", _not_found(job.target.id)))
        except (TemplateError, UsageError, ContextOverflow) as e:
            st.finish_reason = "error"
            job.emit(("error", _bad(str(e))))
        except Exception as e:  # a bug or a broken model file: details go to the log, never to the client
            st.finish_reason = "error"
            self._log(f"lmcli: error in {st.id} ({job.target.id}): {type(e).__name__}: {e}")
            job.emit(("error", ApiError(500, "the server failed to complete the request (see its log)",
                                        type="server_error")))
        finally:
            self.stats.ended(st, timings)
            st.done = True


def _usage(use: dict, n_prompt: int, reused: int) -> dict:
    """OpenAI's usage of a run that fed only the prompt's new tokens: the whole prompt counts, the reused prefix
    is prompt_tokens_details.cached_tokens (as OpenAI reports its prompt caching)."""
    c = use["completion_tokens"]
    return {**use, "prompt_tokens": n_prompt, "total_tokens": n_prompt + c,
            "prompt_tokens_details": {"cached_tokens": reused}}


class _CallSplit:
    """A chat answer's text as it streams, with any tool calls held back and parsed at the end (lmcli.tools): in
    the model family's call format (tool_choice auto), or the whole answer one JSON call (required / named)."""

    def __init__(self, model, req: GenRequest):
        from .tools import StreamSplitter, call_format

        self.req = req
        self.split = StreamSplitter(call_format(model.chat_template)) if req.tools and not req.call_schema else None
        self.text = ""

    def push(self, piece: str) -> str:
        if self.req.call_schema is not None:
            self.text += piece
            return ""
        return self.split.push(piece) if self.split is not None else piece

    def finish(self) -> tuple[str, list[dict]]:
        from .tools import call_from_json

        if self.req.call_schema is not None:
            call = call_from_json(self.text)
            return ("", [call]) if call is not None else (self.text, [])
        return self.split.finish() if self.split is not None else ("", [])


def logprob_entry(tokenizer, token: int, lp: tuple) -> dict:
    """OpenAI's logprobs.content item for one token: its text, log-probability, UTF-8 bytes, alternatives."""
    def one(t: int, v: float) -> dict:
        text = tokenizer.decode([t])
        return {"token": text, "logprob": v, "bytes": list(text.encode("utf-8"))}
    return {**one(token, lp[0]), "top_logprobs": [one(t, v) for t, v in lp[1]]}


def _sampler(model_id: str, sampling: dict):
    """The request's sampling fields over the registry's defaults for the model over SamplerParams' own."""
    from .registry import load_registry
    from .sampling import SamplerParams

    entry = load_registry().get(model_id)
    defaults = dict(entry.defaults or {}) if entry is not None else {}
    return SamplerParams(**{**defaults, **sampling}).validate()


MAX_EMBED_INPUTS = 2048  # OpenAI's own cap on inputs per embeddings request


def embedding_inputs(value: Any, param: str) -> list[str | list[int]]:
    """An embeddings request's input: a string, a list of strings, a list of token ids or a list of such lists."""
    def ids(v):
        return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
    if isinstance(value, str):
        items = [value]
    elif ids(value):
        items = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) or ids(v) for v in value):
        items = list(value)
    else:
        raise _bad(f"{param} must be a string, a list of strings, or token ids (a list of integers, or lists of "
                   f"them), got {_show(value)}", param)
    if len(items) > MAX_EMBED_INPUTS:
        raise _bad(f"{param} holds {len(items)} inputs; at most {MAX_EMBED_INPUTS} per request", param)
    if any(isinstance(v, str) and not v for v in items):
        raise _bad(f"{param} holds an empty string", param)
    return items


def _not_found(name: str | None) -> ApiError:
    return ApiError(404, f"The model {_show(name)} does not exist" if name else "The model does not exist",
                    param="model", code="model_not_found")


# --- models: ids clients see, never a path -------------------------------------------------------

def _is_name(s: str) -> bool:
    """A store or registry name (ORG/REPO[:TAG] of a pull included), not a path."""
    from .store import hub_name, is_name

    return (is_name(s) or hub_name(s) is not None) and not s.endswith((".gguf", ".lmc"))


def model_id(spec: str) -> str:
    """The id clients see for a model given by name or path (a path's stem: a path reveals the file system)."""
    if _is_name(spec):
        return spec
    p = Path(spec)
    stem = p.parent.name if p.name == "model.lmc" else p.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.")[:64] or "model"


def store_models() -> list[dict]:
    """(id, created) of the models in the store."""
    from .store import list_models

    out = []
    for m in list_models():
        try:
            created = int(_dt.datetime.fromisoformat(m.get("created", "")).timestamp())
        except (TypeError, ValueError):
            created = 0
        out.append({"id": m["name"], "created": created})
    return out


def _target(requested: str | None, default: Target | None) -> Target:
    """The model a request names: the default, a store entry or a packaged registry model; else 404."""
    from .registry import load_registry
    from .store import CONTAINER, hub_name, in_store, is_name, models_dir

    if not requested:
        if default is None:
            raise _bad("you must provide a model parameter (the server has no default model)", "model")
        return default
    if default is not None and requested == default.id:
        return default
    if not _is_name(requested):
        raise _not_found(None)
    if not is_name(requested):  # hf.co/ORG/REPO:tag as a client may write it: the store's ORG/REPO:TAG
        requested = hub_name(requested)
    if in_store(requested):
        return Target(requested, str(models_dir() / requested / CONTAINER))
    entry = load_registry().get(requested)
    if entry is not None and entry.packaged:
        return Target(requested, requested)  # lmcli.load imports the packaged GGUF on first use
    raise _not_found(requested)


# --- /metrics: Prometheus' text format, read from the counters at each scrape ------------------------------

class Metrics:
    """A prometheus_client collector over Stats and the loaded model (no second copy of any count)."""

    def __init__(self, stats: Stats, engine: Engine):
        self.stats, self.engine = stats, engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.stats
        req = CounterMetricFamily("lmcli_requests", "Completion requests by how they ended", labels=["finish_reason"])
        for reason, n in sorted({**st.finished, "rejected": st.rejected}.items(), key=lambda kv: str(kv[0])):
            req.add_metric([str(reason)], n)
        yield req
        yield CounterMetricFamily("lmcli_prompt_tokens", "Prompt tokens prefilled", value=st.prompt_tokens)
        yield CounterMetricFamily("lmcli_prompt_cached_tokens", "Prompt tokens reused from a kept KV cache",
                                  value=st.cached_tokens)
        yield CounterMetricFamily("lmcli_completion_tokens", "Completion tokens generated", value=st.tokens)
        yield CounterMetricFamily("lmcli_prefill_seconds", "Seconds spent in prefill", value=st.prefill_s)
        yield CounterMetricFamily("lmcli_decode_seconds", "Seconds spent in decode steps", value=st.decode_s)
        yield CounterMetricFamily("lmcli_decode_tokens", "Tokens from decode steps", value=st.decode_tokens)
        yield GaugeMetricFamily("lmcli_decode_tokens_per_second", "Decode speed of the last request that decoded",
                                value=st.last_decode_tps)
        yield CounterMetricFamily("lmcli_batch_steps", "Batched forward passes over one token of each decoding "
                                  "request", value=st.steps)
        yield CounterMetricFamily("lmcli_batch_tokens", "Tokens those passes computed (over steps: the mean batch)",
                                  value=st.step_tokens)
        yield GaugeMetricFamily("lmcli_queue_waiting", "Requests admitted and waiting", value=st.waiting)
        yield GaugeMetricFamily("lmcli_requests_running", "Requests generating now", value=st.running)
        model = self.engine.model
        ec = model.transformer.expert_cache_stats() if model is not None else None
        if ec is not None:
            yield GaugeMetricFamily("lmcli_expert_cache_hit_ratio", "Expert cache hits over lookups since load",
                                    value=ec["hit_rate"])
            yield CounterMetricFamily("lmcli_expert_cache_read_bytes", "Bytes the expert cache read from the file",
                                      value=ec["bytes_read"])


# --- the Ollama API's model views ---------------------------------------------------------------------

def _size_label(n: int) -> str:
    """Ollama's parameter_size: 135M, 1.5B."""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def ollama_show(info: dict, model: str) -> dict:
    """Ollama's /api/show answer from lmcli.store.show_info: details, GGUF-style model_info, the template."""
    arch = info["architecture"]
    details = {"parent_model": "", "format": "lmcli", "family": arch, "families": [arch],
               "parameter_size": _size_label(info["parameters"]["total"]), "quantization_level": info["quant"] or ""}
    ex = info["experts"]
    model_info = {"general.architecture": arch, "general.parameter_count": info["parameters"]["total"],
                  f"{arch}.context_length": info["context_length"], f"{arch}.embedding_length": info["n_embd"],
                  f"{arch}.block_count": info["layers"], f"{arch}.expert_count": ex["n_expert"],
                  f"{arch}.expert_used_count": ex["n_expert_used"], "tokenizer.ggml.vocab_size": info["vocab_size"]}
    return {"modelfile": f"FROM {model}\n", "parameters": "", "template": info.get("chat_template") or "",
            "details": details, "model_info": model_info, "capabilities": ["completion"]}


# --- HTTP plumbing: guards, body, log ---------------------------------------------------------------

def _host_name(value: str) -> str | None:
    """The host part of a Host header, lowercased ("[::1]" keeps its brackets); None if malformed."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        name, rest = (v[: end + 1], v[end + 1:]) if end > 0 else (v, "")
    else:
        name, sep, port = v.partition(":")
        rest = sep + port
    if rest and not (rest[0] == ":" and rest[1:].isdigit()):
        return None
    return name or None


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v.decode("latin-1")
    return None


class HostGuard:
    """403 unless the Host header names a loopback host or an allowed one (a DNS-rebinding defence)."""

    def __init__(self, app, allowed: frozenset[str] | None):
        self.app, self.allowed = app, allowed  # allowed None: any host (a wildcard bind behind a key)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.allowed is not None:
            host = _host_name(_header(scope, b"host") or "")
            if host not in self.allowed:
                err = ApiError(403, "this Host is not allowed", type="permission_error", code="forbidden_host")
                return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


class KeyGuard:
    """401 unless Authorization is "Bearer KEY" (compared in constant time); /health stays open."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            auth = (_header(scope, b"authorization") or "").encode("latin-1")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                msg = "Incorrect API key provided" if auth else "no API key given (send Authorization: Bearer KEY)"
                err = ApiError(401, msg, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)


def _client(scope) -> str:
    c = scope.get("client")
    return f"{c[0]}:{c[1]}" if c else "-"


class AccessLog:
    """One line per request: UTC time, client address, method, path, status, tokens, duration (uvicorn's own access
    log is off)."""

    def __init__(self, app, log: Callable[[str], None]):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [None]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            st = scope.get("lmcli.stat")
            path = "".join(c if c.isprintable() and c != " " else "?" for c in scope["path"])[:200]
            now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            self.log(f"{now} {_client(scope)} {scope['method']} {path} {status[0] or 500} {st.tokens if st else 0} "
                     f"tokens {(time.perf_counter() - t0) * 1000:.0f} ms")


async def read_json(request: Request, max_body: int) -> dict:
    """The request's JSON object, read at most max_body bytes (413 beyond, by Content-Length or streamed)."""
    too_big = ApiError(413, f"the request body is larger than {max_body} bytes", code="request_too_large",
                       headers={"Connection": "close"})
    cl = request.headers.get("content-length")
    if cl is not None:
        if not cl.strip().isdigit():
            raise _bad("Content-Length is not a number")
        if int(cl) > max_body:
            raise too_big
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > max_body:
            raise too_big
    try:
        body = jsonio.loads(bytes(buf))
    except (ValueError, RecursionError):
        raise _bad("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    return body


class _Gone(Exception):
    """The client disconnected."""


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _next_item(q: asyncio.Queue, watcher: asyncio.Future) -> tuple:
    getter = asyncio.ensure_future(q.get())
    done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    raise _Gone()


# --- the app -----------------------------------------------------------------------------------------

class Api:
    """The endpoints; state lives here and in app.state (stats, engine)."""

    def __init__(self, default: Target | None, engine: Engine, stats: Stats, max_body: int):
        from prometheus_client import CollectorRegistry

        self.default, self.engine, self.stats, self.max_body = default, engine, stats, max_body
        self.registry = CollectorRegistry(auto_describe=False)  # this app's own: no process-wide state
        self.registry.register(Metrics(stats, engine))

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.engine.model_id, "waiting": self.stats.waiting,
                             "running": self.stats.running})

    def _models(self) -> list[dict]:
        rows = {m["id"]: m for m in store_models()}
        if self.default is not None:
            rows.setdefault(self.default.id, {"id": self.default.id, "created": 0})
        return [{"id": m["id"], "object": "model", "created": m["created"], "owned_by": "lmcli"}
                for m in sorted(rows.values(), key=lambda m: m["id"])]

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": self._models()})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        for m in self._models():
            if m["id"] == name:
                return JSONResponse(m)
        raise _not_found(name if _is_name(name) else None)

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, "chat")

    async def text(self, request: Request) -> Response:
        return await self._complete(request, "text")

    async def ollama_chat(self, request: Request) -> Response:
        return await self._complete(request, "chat", ollama="chat")

    async def ollama_generate(self, request: Request) -> Response:
        return await self._complete(request, "text", ollama="generate")

    async def ollama_tags(self, request: Request) -> Response:
        from .store import list_models

        sizes = {m["name"]: m.get("size", 0) for m in list_models()}
        rows = []
        for m in self._models():
            when = _dt.datetime.fromtimestamp(m["created"], _dt.timezone.utc).isoformat().replace("+00:00", "Z")
            rows.append({"name": m["id"], "model": m["id"], "modified_at": when, "size": sizes.get(m["id"], 0),
                         "digest": "", "details": {"format": "lmcli", "family": "", "parameter_size": "",
                                                   "quantization_level": ""}})
        return JSONResponse({"models": rows})

    async def ollama_show(self, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        from .store import show_info

        body = await read_json(request, self.max_body)
        name = body.get("model") or body.get("name")  # "name" is the older field
        if not isinstance(name, str) or not name:
            raise _bad("model must be a non-empty string", "model")
        target = _target(name, self.default)
        try:
            info = await run_in_threadpool(show_info, target.spec)
        except ModelNotFound:
            raise _not_found(name) from None
        return JSONResponse(ollama_show(info, target.id))

    async def ollama_ps(self, request: Request) -> Response:
        model, mid = self.engine.model, self.engine.model_id
        rows = []
        if model is not None and mid is not None:
            size = model.path.stat().st_size
            arch = model.config.arch
            rows.append({"name": mid, "model": mid, "size": size, "digest": "", "size_vram": 0,
                         "details": {"parent_model": "", "format": "lmcli", "family": arch, "families": [arch],
                                     "parameter_size": "", "quantization_level": ""},
                         "expires_at": "2999-12-31T00:00:00Z",  # kept until another model is asked for
                         "context_length": model.n_ctx})
        return JSONResponse({"models": rows})

    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def _embed(self, model_name, items: list, normalize: bool, param: str) -> tuple[list, int, str, float]:
        """Embeddings of items on the engine's thread -> (float32 vectors, tokens, model id, load seconds)."""
        from starlette.concurrency import run_in_threadpool

        target = _target(model_name, self.default)

        def work():
            t0 = time.perf_counter()
            try:
                model = self.engine.get_model(target)
            except ModelNotFound:
                raise _not_found(model_name) from None
            loaded = time.perf_counter() - t0
            vecs, n = [], 0
            for item in items:
                ids = model.tokenize(item) if isinstance(item, str) else item
                try:
                    vecs.append(model.embed(ids, normalize=normalize))
                except UsageError as e:
                    raise _bad(str(e), param, "context_length_exceeded" if "context" in str(e) else None) from None
                n += len(ids)
            return vecs, n, target.id, loaded
        return await run_in_threadpool(self.engine.call, work)

    async def embeddings(self, request: Request) -> Response:
        """OpenAI's /v1/embeddings: mean-pooled final hidden states, unit length; encoding_format float or base64
        (little-endian float32, what the openai package asks for by default)."""
        import base64

        body = await read_json(request, self.max_body)
        items = embedding_inputs(body.get("input"), "input")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise _bad(f"encoding_format must be float or base64, got {_show(fmt)}", "encoding_format")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise _bad("model must be a string", "model")
        vecs, n, mid, _ = await self._embed(model, items, True, "input")
        dims = body.get("dimensions")
        if dims is not None and dims != len(vecs[0]):
            raise _bad(f"dimensions: this model's embeddings have {len(vecs[0])}, got {_show(dims)}", "dimensions")
        data = [{"object": "embedding", "index": i,
                 "embedding": (base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64"
                               else [float(x) for x in v])} for i, v in enumerate(vecs)]
        return JSONResponse({"object": "list", "data": data, "model": mid,
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    async def ollama_embed(self, request: Request) -> Response:
        """Ollama's /api/embed (input: a string or strings; unit vectors) and the older /api/embeddings (prompt:
        one string; the vector as the model gives it)."""
        t0 = time.perf_counter()
        body = await read_json(request, self.max_body)
        legacy = request.url.path.endswith("/embeddings")
        param = "prompt" if legacy else "input"
        value = body.get(param)
        if legacy and not isinstance(value, str):
            raise _bad(f"prompt must be a string, got {_show(value)}", "prompt")
        items = embedding_inputs(value, param)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise _bad("model must be a string", "model")
        vecs, n, mid, loaded = await self._embed(model, items, not legacy, param)
        if legacy:
            return JSONResponse({"embedding": [float(x) for x in vecs[0]]})
        return JSONResponse({"model": mid, "embeddings": [[float(x) for x in v] for v in vecs],
                             "total_duration": int((time.perf_counter() - t0) * 1e9),
                             "load_duration": int(loaded * 1e9), "prompt_eval_count": n})

    async def ollama_version(self, request: Request) -> Response:
        from . import __version__

        return JSONResponse({"version": __version__})

    async def _complete(self, request: Request, kind: str, ollama: str | None = None) -> Response:
        arrived = time.time()  # Ollama's total_duration counts from here
        body = await read_json(request, self.max_body)
        req = ollama_request(body, kind) if ollama else parse_request(body, kind)
        target = _target(req.model, self.default)
        st = self.stats.new(kind, target.id)
        request.scope["lmcli.stat"] = st
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancel = Cancel(st)

        def emit(item: tuple) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the event loop is closed: the server stopped
                cancel.set()
        job = Job(req, target, st, cancel, emit)
        if not self.engine.submit(job, cancel):
            self.stats.rejected += 1
            st.finish_reason, st.done = "rejected", True
            raise ApiError(503, "the server is busy: too many requests are waiting; retry later",
                           type="server_error", code="server_overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        watcher = asyncio.ensure_future(_until_disconnect(request.receive))
        streaming = False
        try:
            item = await _next_item(q, watcher)
            if item[0] == "error":
                raise item[1]
            created = int(time.time())
            if req.stream:
                streaming = True
                watcher.cancel()  # from here StreamingResponse watches for the disconnect
                if ollama:
                    return EventStream(self._ndjson(q, job, ollama, arrived), cancel,
                                       media_type="application/x-ndjson")
                return EventStream(self._events(q, job, created), cancel)
            pieces, lps, calls = [], [], []
            while True:
                item = await _next_item(q, watcher)
                if item[0] == "error":
                    raise item[1]
                if item[0] == "text":
                    pieces.append(item[1])
                    lps += item[2]
                elif item[0] == "tools":
                    calls = item[1]
                elif item[0] == "end":
                    _, finish, use = item
                    if ollama:
                        lp = lps if req.top_logprobs is not None else None
                        return JSONResponse(ollama_line(ollama, target.id, "".join(pieces), True, finish, use,
                                                        time.time() - arrived, lp, calls))
                    return JSONResponse(completion_body(kind, st.id, created, target.id, "".join(pieces), finish,
                                                        use, lps if req.top_logprobs is not None else None, calls))
        except _Gone:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        finally:
            watcher.cancel()
            if not streaming:
                cancel.set()

    async def _events(self, q: asyncio.Queue, job: Job, created: int):
        """Server-sent events for a streamed completion; leaving early (a disconnect) cancels the generation."""
        kind, st, mid, inc = job.req.kind, job.stat, job.target.id, job.req.include_usage
        chunk = partial(chunk_body, kind, st.id, created, mid, usage_slot=inc)
        offset = 0  # characters of the tokens streamed so far (text completions' text_offset)
        try:
            if kind == "chat":
                yield sse(chunk(delta={"role": "assistant", "content": ""}))
            while True:
                item = await q.get()
                if item[0] == "text":
                    lp = item[2] if job.req.top_logprobs is not None else None
                    yield sse(chunk(delta={"content": item[1]}, text=item[1], logprobs=lp, offset=offset))
                    offset += sum(len(e["token"]) for e in lp or [])
                elif item[0] == "tools":  # each call whole in one delta, as OpenAI's stream may send it
                    yield sse(chunk(delta={"tool_calls": [{"index": i, **c} for i, c in enumerate(item[1])]}))
                elif item[0] == "end":
                    _, finish, use = item
                    yield sse(chunk(delta={}, finish=finish))
                    if inc:
                        yield sse(chunk_body(kind, st.id, created, mid, use=use))
                    yield sse("[DONE]")
                    return
                elif item[0] == "error":
                    yield sse(item[1].body())
                    return
        finally:
            job.cancel.set()


    async def _ndjson(self, q: asyncio.Queue, job: Job, shape: str, arrived: float):
        """Ollama's streamed answer: one JSON object per line, the last with done and the counts."""
        mid = job.target.id
        try:
            while True:
                item = await q.get()
                if item[0] == "text":
                    lp = item[2] if job.req.top_logprobs is not None else None
                    yield (json.dumps(ollama_line(shape, mid, item[1], logprobs=lp), ensure_ascii=False)
                           + "\n").encode()
                elif item[0] == "tools":
                    yield (json.dumps(ollama_line(shape, mid, "", calls=item[1]), ensure_ascii=False) + "\n").encode()
                elif item[0] == "end":
                    _, finish, use = item
                    last = ollama_line(shape, mid, "", True, finish, use, time.time() - arrived)
                    yield (json.dumps(last, ensure_ascii=False) + "\n").encode()
                    return
                elif item[0] == "error":
                    yield (json.dumps({"error": item[1].body()["error"]["message"]}) + "\n").encode()
                    return
        finally:
            job.cancel.set()


class EventStream(StreamingResponse):
    """A streamed response (server-sent events, or Ollama's NDJSON) that cancels its generation however it ends
    (even before it starts)."""

    def __init__(self, content, cancel: threading.Event, media_type: str = "text/event-stream"):
        super().__init__(content, media_type=media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.cancel = cancel

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.cancel.set()


def _endpoint(fn):
    """Wrap an endpoint: ApiError -> its response; anything else -> a 500 without a traceback."""
    async def wrapped(request: Request) -> Response:
        try:
            return await fn(request)
        except ApiError as e:
            return e.response()
        except ClientDisconnect:  # gone while sending its body
            return Response(status_code=499)
        except Exception as e:
            request.app.state.log(f"lmcli: internal error on {request.url.path}: {type(e).__name__}: {e}")
            return ApiError(500, "internal server error (see the server log)", type="server_error").response()
    return wrapped


async def _http_error(request: Request, exc: HTTPException) -> Response:
    msg = {404: "no such endpoint", 405: "method not allowed"}.get(exc.status_code, "request failed")
    return ApiError(exc.status_code, msg, headers=exc.headers).response()


async def _crash(request: Request, exc: Exception) -> Response:
    return ApiError(500, "internal server error", type="server_error").response()


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _check_options(api_key: str | None, cors_origin: str | None, max_body: int, queue_size: int,
                   prefix_cache: int = 0, parallel: int = 1) -> None:
    if api_key is not None and (not api_key or not all(33 <= ord(c) < 127 for c in api_key)):
        raise UsageError("--api-key must be non-empty printable ASCII without spaces")
    if cors_origin is not None:
        if cors_origin == "*":
            if api_key is None:
                raise UsageError("--cors-origin '*' lets any web page use the server",
                                 hint="name one origin (e.g. http://localhost:5173), or also set --api-key")
        elif not re.fullmatch(r"https?://[A-Za-z0-9.\-]+(:\d{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:\d{1,5})?",
                              cors_origin):
            raise UsageError(f"--cors-origin must be an origin like http://localhost:5173, got {_show(cors_origin)}")
    for name, v, lo in (("max_body", max_body, 1), ("queue_size", queue_size, 0), ("prefix_cache", prefix_cache, 0),
                        ("parallel", parallel, 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise UsageError(f"{name} must be an integer of at least {lo}, got {_show(v)}")


def create_app(default_model: str | None, *, api_key: str | None = None, cors_origin: str | None = None,
               max_body: int = 1 << 20, queue_size: int = 8, options: EngineOptions | None = None,
               log: Callable[[str], None] = print, host: str = "127.0.0.1", prefix_cache: int = DEFAULT_PREFIX_CACHE,
               parallel: int = DEFAULT_PARALLEL, **engine) -> Starlette:
    """The Starlette app; host is the address it is bound to (allowed in Host when not loopback, with a key).
    parallel: generations decoding together (1: one at a time); queue_size: requests waiting beyond those.

    options: how to run the models (EngineOptions); engine: single fields over it (n_ctx=..., threads=...).
    """
    from .api import load
    from .engine.options import EngineOptions

    _check_options(api_key, cors_origin, max_body, queue_size, prefix_cache, parallel)
    stats = Stats()
    engine = Engine(stats, queue_size=queue_size, options=EngineOptions.of(options, **engine), load=load, log=log,
                    prefix_cache=prefix_cache, parallel=parallel)
    default = Target(model_id(default_model), default_model) if default_model else None
    api = Api(default, engine, stats, max_body)
    allowed: frozenset[str] | None = LOOPBACK_HOSTS
    if api_key is not None and not _is_loopback(host):
        allowed = None if _is_wildcard(host) else LOOPBACK_HOSTS | {
            f"[{host.strip('[]').lower()}]" if ":" in host else host.lower()}
    middleware = [Middleware(AccessLog, log=log), Middleware(HostGuard, allowed=allowed)]
    if cors_origin is not None:
        middleware.append(Middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"], max_age=600))
    if api_key is not None:
        middleware.append(Middleware(KeyGuard, key=api_key))
    routes = [
        Route("/health", _endpoint(api.health), methods=["GET"]),
        Route("/v1/models", _endpoint(api.models), methods=["GET"]),
        Route("/v1/models/{model:path}", _endpoint(api.model), methods=["GET"]),
        Route("/v1/chat/completions", _endpoint(api.chat), methods=["POST"]),
        Route("/v1/completions", _endpoint(api.text), methods=["POST"]),
        Route("/v1/embeddings", _endpoint(api.embeddings), methods=["POST"]),
        Route("/api/embed", _endpoint(api.ollama_embed), methods=["POST"]),
        Route("/api/embeddings", _endpoint(api.ollama_embed), methods=["POST"]),
        # the Ollama API beside OpenAI's (Open WebUI and many plugins speak only this one)
        Route("/api/chat", _endpoint(api.ollama_chat), methods=["POST"]),
        Route("/api/generate", _endpoint(api.ollama_generate), methods=["POST"]),
        Route("/api/tags", _endpoint(api.ollama_tags), methods=["GET"]),
        Route("/api/version", _endpoint(api.ollama_version), methods=["GET"]),
        Route("/api/show", _endpoint(api.ollama_show), methods=["POST"]),
        Route("/api/ps", _endpoint(api.ollama_ps), methods=["GET"]),
        Route("/metrics", _endpoint(api.metrics), methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            engine.close()

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _crash})
    app.state.stats, app.state.engine, app.state.log = stats, engine, log
    app.state.default = default
    return app


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (UsageError when the address is taken or unknown)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}", hint="check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                         hint="another server may be using the port; pick one with --port") from None
    return sock


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 11435, api_key: str | None = None,
          cors_origin: str | None = None, *, max_body: int = 1 << 20, queue_size: int = 8,
          prefix_cache: int = DEFAULT_PREFIX_CACHE, parallel: int = DEFAULT_PARALLEL,
          options: EngineOptions | None = None, log: Callable[[str], None] = print, **engine) -> None:
    """Serve the OpenAI API until interrupted; refuses a non-loopback address without an API key.

    options, engine: how to run the models, as create_app takes them."""
    if not _is_loopback(host) and api_key is None:
        raise UsageError(f"refusing to listen on {host} without an API key: anyone who can reach it could use it",
                         hint="pass --api-key KEY (clients send Authorization: Bearer KEY), or use --host 127.0.0.1")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {_show(port)}")
    import uvicorn

    app = create_app(model, api_key=api_key, cors_origin=cors_origin, max_body=max_body, queue_size=queue_size,
                     options=options, log=log, host=host, prefix_cache=prefix_cache, parallel=parallel, **engine)
    engine: Engine = app.state.engine
    if app.state.default is not None:  # a bad model fails here, before listening
        seconds = engine.call(partial(engine.warm_up, app.state.default))
        log(f"lmcli: warmed up {app.state.default.id} in {seconds:.1f} s")
    sock = _bind(host, port)
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    what = app.state.default.id if app.state.default else "models from the store"
    log(f"lmcli: serving {what} on http://{shown}:{sock.getsockname()[1]}/v1")
    config = uvicorn.Config(app, access_log=False, log_level="warning", lifespan="on", proxy_headers=False,
                            server_header=False, timeout_graceful_shutdown=5, limit_concurrency=128)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
