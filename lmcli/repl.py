"""`lmcli chat`: a terminal REPL over one conversation whose KV cache persists between turns."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from quant import jsonio

from .errors import ContextOverflow, LmcliError, UsageError
from .generate import Event, RunStats
from .sampling import SamplerParams

if TYPE_CHECKING:
    from .engine.options import EngineOptions

PROMPT = ">>> "
CONTINUE = "... "
FENCE = '"""'
REPLY_RESERVE = 256  # tokens kept free for a reply when max-tokens is -1 (capped at a quarter of the context)
SAVE_FORMAT = "lmcli-chat"
SAVE_VERSION = 1
SPARK = "▁▂▃▄▅▆▇█"

HELP = """\
Commands:
  /help, /?                 this list
  /bye, /exit, Ctrl+D       leave
  /clear                    start over (the system message stays)
  /regen                    a new reply to the last message
  /undo                     remove the last exchange
  /set temp|top-k|top-p|min-p|repeat-penalty|seed|max-tokens VALUE
  /set system TEXT          set the system message (no TEXT removes it)
  /show info|template|parameters|system
  /stats                    the last reply: tokens, prefill and decode speed, expert bytes read
  /context                  tokens used of the context
  /save FILE [--force]      the conversation and settings as JSON
  /load FILE                restore a saved conversation
  /read FILE                send a file's text as the next message
  /experts                  routing histogram of the last reply, per layer
Type \"\"\" to begin and end a message of several lines. Ctrl+C stops a reply (the partial reply is kept;
/undo drops it); at the prompt, a second Ctrl+C leaves."""

# /set NAME -> (SamplerParams field or "max_tokens", parser)
_SETTABLE: dict[str, tuple[str, Callable[[str], object]]] = {
    "temp": ("temp", float), "top-k": ("top_k", int), "top-p": ("top_p", float), "min-p": ("min_p", float),
    "repeat-penalty": ("repeat_penalty", float), "seed": ("seed", int), "max-tokens": ("max_tokens", int),
}
_SAVED_SETTINGS = ("temp", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "max_tokens")


@dataclass
class Reply:
    """What the last reply cost: tokens reused, and the run's statistics (timings, finish, routing per layer)."""

    text: str
    reused_tokens: int  # conversation prefix whose keys and values were already in the cache
    stats: RunStats  # finish_reason "stop" | "length" | "interrupted"
    context_full: bool


# --- the conversation (no terminal I/O) --------------------------------------------------------


class Conversation:
    """Messages, settings and one KV cache; each turn feeds the model only the tokens the cache lacks."""

    def __init__(self, model, name: str, *, system: str | None, sampling: SamplerParams, max_tokens: int):
        self.model = model
        self.name = name
        self.system = system
        self.sampling = sampling.validate()
        self.max_tokens = _check_max_tokens(max_tokens)
        self.turns: list[dict] = []  # user and assistant messages, oldest first
        self.cache = model.new_cache()
        self.cached: list[int] = []  # token ids whose keys and values the cache holds, position by position
        self.last: Reply | None = None

    def messages(self) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system is not None else []
        return sys_msg + [dict(m) for m in self.turns]

    @property
    def n_ctx(self) -> int:
        return self.cache.n_ctx

    def prompt_ids(self) -> list[int]:
        return self.model.chat_ids(self.messages())

    def fit(self) -> tuple[list[int], int]:
        """Prompt ids for the conversation, dropping the oldest exchanges while it would overflow the context
        (leaving room for a reply); returns (ids, messages dropped). ContextOverflow if the last message alone
        leaves no room."""
        want = self.max_tokens if self.max_tokens >= 0 else REPLY_RESERVE
        reserve = max(1, min(want, self.n_ctx // 4))
        ids = self.prompt_ids()
        dropped = 0
        while len(ids) + reserve > self.n_ctx and len(self.turns) > 1:
            self.turns.pop(0)
            dropped += 1
            while len(self.turns) > 1 and self.turns[0]["role"] != "user":
                self.turns.pop(0)
                dropped += 1
            ids = self.prompt_ids()
        if len(ids) >= self.n_ctx:
            raise ContextOverflow(f"the conversation needs {len(ids)} tokens; the context holds {self.n_ctx}",
                                  hint="shorten the message or restart with a larger --ctx-size")
        return ids, dropped

    def say(self, text: str) -> None:
        self.turns.append({"role": "user", "content": text})

    def stream(self, ids: list[int]) -> Iterator[Event]:
        """Generate the assistant's reply to the conversation rendered as ids, reusing the cached prefix.

        The reply is appended to the conversation when the stream ends, also when it is closed or
        interrupted early (the partial reply is kept)."""
        from .prefix_cache import reusable

        m = self.model
        reuse = reusable(self.cached, ids)  # feeds at least one token: its logits start the reply
        self.cache.truncate(reuse)
        fed = ids[reuse:]
        limit = self.n_ctx if self.max_tokens == -1 else self.max_tokens
        seen: list[int] = []
        pieces: list[str] = []
        final: Event | None = None
        gen = None
        try:
            gen = m.generate(fed, max_tokens=limit, sampler=self.sampling, cache=self.cache)
            for ev in gen:
                if ev.finish_reason is not None:
                    final = ev
                    break
                if ev.token is not None:
                    seen.append(ev.token)
                pieces.append(ev.text)
                yield ev
        finally:
            self.cached = (ids + seen)[: self.cache.n_past]
            text = "".join(pieces)
            if final is None and not text:  # stopped before the reply began: take the message back
                if self.turns and self.turns[-1]["role"] == "user":
                    self.turns.pop()
            else:
                self.turns.append({"role": "assistant", "content": text})
            if gen is not None:  # the final event's figures, or (interrupted) those up to now
                gen.close()
                self.last = Reply(text, reuse, final.stats if final is not None else gen.stats(),
                                  self.cache.n_past >= self.n_ctx)

    def undo(self) -> int:
        """Remove the last exchange (a trailing reply and the message it answers); returns messages removed."""
        n = 0
        if self.turns and self.turns[-1]["role"] == "assistant":
            self.turns.pop()
            n += 1
        if self.turns and self.turns[-1]["role"] == "user":
            self.turns.pop()
            n += 1
        if not n:
            raise UsageError("nothing to undo")
        return n

    def drop_reply(self) -> None:
        """Remove the last reply so that the last message can be answered again (/regen)."""
        if self.turns and self.turns[-1]["role"] == "assistant":
            self.turns.pop()
        if not self.turns or self.turns[-1]["role"] != "user":
            raise UsageError("nothing to regenerate", hint="send a message first")

    def clear(self) -> None:
        self.turns = []
        self.last = None

    def set(self, name: str, value: str) -> str:
        """Change one setting from its text; returns how it now reads. UsageError for a bad name or value."""
        key = name.replace("_", "-").lower()
        if key == "system":
            self.system = value or None
            return "system message removed" if self.system is None else "system message set"
        if key not in _SETTABLE:
            raise UsageError(f"/set {name}: unknown setting", hint=f"one of {', '.join([*_SETTABLE, 'system'])}")
        field, conv = _SETTABLE[key]
        if key == "seed" and value.lower() in ("none", "random", "off"):
            v = None
        else:
            try:
                v = conv(value)
            except ValueError:
                kind = "an integer" if conv is int else "a number"
                raise UsageError(f"/set {key} needs {kind}, got {value!r}") from None
        if field == "max_tokens":
            self.max_tokens = _check_max_tokens(v)
        else:
            self.sampling = _checked_params(dataclasses.replace(self.sampling, **{field: v}))
        return f"{key} = {'random' if v is None else v}"

    def settings(self) -> dict:
        d = {k: getattr(self.sampling, k) for k in _SAVED_SETTINGS if k != "max_tokens"}
        d["max_tokens"] = self.max_tokens
        return d

    def to_json(self) -> dict:
        return {"format": SAVE_FORMAT, "version": SAVE_VERSION, "model": self.name,
                "messages": self.messages(), "settings": self.settings()}

    def load_json(self, obj) -> None:
        """Replace messages and settings with a saved conversation's, after checking all of it."""
        system, turns, sampling, max_tokens = _parse_saved(obj, self.sampling, self.max_tokens)
        self.system, self.turns, self.sampling, self.max_tokens = system, turns, sampling, max_tokens
        self.last = None


def _check_max_tokens(v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < -1:
        raise UsageError(f"max-tokens must be -1 (until end of text) or more, got {v!r}")
    return v


def _checked_params(p: SamplerParams) -> SamplerParams:
    try:
        return p.validate()
    except UsageError as e:  # the sampler words its errors as flags; here they are settings
        raise UsageError(str(e).replace("--", "", 1)) from None


def _parse_saved(obj, sampling: SamplerParams, max_tokens: int):
    """(system, turns, sampling, max_tokens) from a saved conversation; UsageError naming the first problem."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise UsageError("not a saved conversation (expected an object with a list of messages)")
    if obj.get("format", SAVE_FORMAT) != SAVE_FORMAT or obj.get("version", SAVE_VERSION) != SAVE_VERSION:
        raise UsageError(f"unsupported format {obj.get('format')!r} version {obj.get('version')!r}")
    system, turns = None, []
    for i, msg in enumerate(obj["messages"]):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise UsageError(f"message {i} must be an object with a string content")
        role = msg.get("role")
        if role == "system" and i == 0:
            system = msg["content"]
        elif role in ("user", "assistant"):
            turns.append({"role": role, "content": msg["content"]})
        else:
            raise UsageError(f"message {i} has role {role!r} (expected user or assistant, or system first)")
    settings = obj.get("settings", {})
    if not isinstance(settings, dict):
        raise UsageError("settings must be an object")
    unknown = sorted(set(settings) - set(_SAVED_SETTINGS))
    if unknown:
        raise UsageError(f"unknown settings: {', '.join(unknown)}")
    kw = {k: v for k, v in settings.items() if k != "max_tokens"}
    for k, v in kw.items():
        if isinstance(v, bool) or not (v is None and k == "seed" or isinstance(v, (int, float))):
            raise UsageError(f"setting {k} has a bad value {v!r}")
        if k in ("top_k", "seed") and isinstance(v, float):
            raise UsageError(f"setting {k} must be an integer, got {v!r}")
    sampling = _checked_params(dataclasses.replace(sampling, **kw))
    max_tokens = _check_max_tokens(settings.get("max_tokens", max_tokens))
    return system, turns, sampling, max_tokens


# --- reading lines -------------------------------------------------------------------------------


def _history_path() -> Path | None:
    """The history file, or None when LMCLI_NOHISTORY is set."""
    from .store import home

    if os.environ.get("LMCLI_NOHISTORY"):
        return None
    return home() / "history"


def line_reader() -> Callable[[str], str]:
    """A function prompt -> line (EOFError at end, KeyboardInterrupt on Ctrl+C): prompt_toolkit with line
    editing and a history file on a terminal, plain input() otherwise."""
    if sys.stdin.isatty() and sys.stdout.isatty():
        try:
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import FileHistory, InMemoryHistory
        except ImportError:
            pass
        else:
            path = _history_path()
            history = InMemoryHistory()
            if path is not None:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.touch(exist_ok=True)
                    history = FileHistory(str(path))
                except OSError:
                    pass  # an unwritable home: this session's history stays in memory
            session = PromptSession(history=history)
            return lambda prompt: session.prompt(prompt)
    show = sys.stdout.isatty()
    return lambda prompt: input(prompt if show else "")


def read_message(readline: Callable[[str], str]) -> str:
    """One line, or the lines between \"\"\" markers as one message."""
    line = readline(PROMPT)
    head = line.lstrip()
    if not head.startswith(FENCE):
        return line
    rest = head[len(FENCE):]
    if rest.rstrip().endswith(FENCE):
        return rest.rstrip()[: -len(FENCE)]
    parts = [rest]
    while True:
        nxt = readline(CONTINUE)
        if nxt.rstrip().endswith(FENCE):
            parts.append(nxt.rstrip()[: -len(FENCE)])
            return "\n".join(parts).strip("\n")
        parts.append(nxt)


# --- the terminal UI --------------------------------------------------------------------------


class ChatUI:
    """The REPL: reads lines, runs slash commands, streams replies with Rich, never dies on bad input."""

    def __init__(self, conv: Conversation, console, readline: Callable[[str], str]):
        self.conv = conv
        self.console = console
        self.readline = readline
        self.commands: dict[str, Callable[[str], bool | None]] = {
            "help": self.cmd_help, "?": self.cmd_help, "bye": self.cmd_bye, "exit": self.cmd_bye,
            "clear": self.cmd_clear, "regen": self.cmd_regen, "undo": self.cmd_undo, "set": self.cmd_set,
            "show": self.cmd_show, "stats": self.cmd_stats, "context": self.cmd_context, "save": self.cmd_save,
            "load": self.cmd_load, "read": self.cmd_read, "experts": self.cmd_experts,
        }

    # output
    def out(self, text: str, style: str | None = None) -> None:
        from rich.text import Text

        self.console.print(Text(text, style=style or ""), soft_wrap=True)

    def note(self, text: str) -> None:
        self.out(text, "dim")

    def error(self, e: LmcliError) -> None:
        line = f"error: {e}" + (f" ({e.hint})" if e.hint else "")
        self.out(line.replace("\n", " "), "red")

    # the loop
    def loop(self) -> int:
        interrupts = 0
        while True:
            try:
                line = read_message(self.readline)
            except EOFError:
                self.console.print()
                return 0
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts >= 2:
                    self.console.print()
                    return 0
                self.note("\n(Ctrl+C again or /bye to leave)")
                continue
            interrupts = 0
            try:
                if line.strip().startswith("/"):
                    if self.command(line.strip()):
                        return 0
                elif line.strip():
                    self.conv.say(line)
                    self.reply()
            except LmcliError as e:
                self.error(e)
            except KeyboardInterrupt:
                self.note("\n(interrupted)")

    def command(self, line: str) -> bool:
        """Run a slash command; True means leave."""
        name, _, arg = line[1:].partition(" ")
        fn = self.commands.get(name.lower())
        if fn is None:
            raise UsageError(f"unknown command {line.split()[0]}", hint="/? lists the commands")
        return bool(fn(arg.strip()))

    def reply(self) -> None:
        """Stream a reply to the conversation as it stands; a message that cannot fit is taken back."""
        conv = self.conv
        try:
            ids, dropped = conv.fit()
        except BaseException:  # it cannot be answered (or the user gave up waiting): take it back
            if conv.turns and conv.turns[-1]["role"] == "user":
                conv.turns.pop()
            raise
        if dropped:
            self.note(f"(the context of {conv.n_ctx} tokens is full: dropped the oldest {dropped} "
                      f"message{'s' if dropped > 1 else ''})")
        gen = conv.stream(ids)
        wrote = ""
        interrupted = False
        try:
            for ev in gen:
                if ev.text:
                    self.console.file.write(ev.text)
                    self.console.file.flush()
                    wrote += ev.text
        except KeyboardInterrupt:
            interrupted = True
        finally:
            gen.close()
        if not wrote.endswith("\n"):
            self.console.print()
        self.footer(interrupted)

    def footer(self, interrupted: bool) -> None:
        r = self.conv.last
        if r is None:
            return
        prompt_speed, gen_speed = r.stats.timings.speeds()
        line = f"{gen_speed} · prompt: {prompt_speed}"
        if interrupted and not r.text:
            line += " · stopped before the reply began: the message is taken back"
        elif interrupted:
            line += " · stopped: the partial reply is kept (/undo drops it, /regen redoes it)"
        elif r.context_full:
            line += f" · the context of {self.conv.n_ctx} tokens is full: the next turn drops the oldest messages"
        elif r.stats.finish_reason == "length":
            line += f" · cut at max-tokens {self.conv.max_tokens}"
        self.note(line)

    # commands
    def cmd_help(self, arg: str):
        self.out(HELP)

    def cmd_bye(self, arg: str):
        return True

    def cmd_clear(self, arg: str):
        self.conv.clear()
        self.note("(conversation cleared)")

    def cmd_regen(self, arg: str):
        self.conv.drop_reply()
        self.reply()

    def cmd_undo(self, arg: str):
        n = self.conv.undo()
        self.note(f"(removed the last {n} message{'s' if n > 1 else ''}; {len(self.conv.turns)} left)")

    def cmd_set(self, arg: str):
        name, _, value = arg.partition(" ")
        if not name or (not value.strip() and name.lower() != "system"):
            raise UsageError("/set needs a setting and a value", hint="e.g. /set temp 0")
        self.note(f"({self.conv.set(name, value.strip())})")

    def cmd_show(self, arg: str):
        conv, m = self.conv, self.conv.model
        what = arg.lower()
        if what == "info":
            cfg = m.config
            experts = f"{cfg.n_expert} experts, {m.transformer.router.top_k} per token" if cfg.is_moe else "dense"
            from .store import quantization

            q = quantization(m.metadata, m.container.tensors.values()) or "?"
            self.out(f"model: {conv.name}\npath: {m.path}\narchitecture: {cfg.arch}, {cfg.n_layer} layers, "
                     f"n_embd {cfg.n_embd}, {experts}\nquantization: {q}\nfile: {m.container.file_size / 1e6:.1f} MB\n"
                     f"context: {conv.n_ctx} tokens\nthreads: {m.thread_policy.describe()}\nloaded in {m.load_s:.2f} s")
        elif what == "template":
            self.out(m.chat_template or "(the model has no chat template: ChatML is used)")
        elif what == "parameters":
            self.out("\n".join(f"{k.replace('_', '-')}: {'random' if v is None else v}"
                               for k, v in conv.settings().items()))
        elif what == "system":
            self.out(conv.system if conv.system is not None else "(no system message)")
        else:
            raise UsageError(f"/show {arg}: unknown", hint="/show info|template|parameters|system")

    def cmd_stats(self, arg: str):
        r = self.conv.last
        if r is None:
            self.note("(no reply yet)")
            return
        t = r.stats.timings
        experts = (f"{t.expert_bytes_per_token / 1e6:.2f} MB read per generated token, "
                   f"{t.expert_bytes_prefill / 1e6:.2f} MB for the prompt" if r.stats.hist is not None
                   else "dense model")
        self.out(f"last reply: {t.completion_tokens} tokens, finish: {r.stats.finish_reason}\n"
                 f"prompt: {t.prompt_tokens} tokens processed, {r.reused_tokens} reused from the cache, "
                 f"{t.prefill_tps:.1f} tokens/s\n"
                 f"generation: {t.speeds()[1]}\n"
                 f"experts: {experts}")
        c = r.stats.expert_cache
        if c is not None:  # a model larger than memory: what the expert cache did since the session began
            self.out(f"expert cache: {c['slots']} bundles of {c['slot_bytes'] / 1e6:.1f} MB, "
                     f"hit rate {c['hit_rate']:.0%}, "
                     f"{c['bytes_read'] / 1e6:.1f} MB read from disk, {c['io_wait_s']:.2f} s waiting on reads, "
                     f"{c['prefetch_used']}/{c['prefetched']} prefetched bundles used")

    def cmd_context(self, arg: str):
        conv = self.conv
        n = len(conv.prompt_ids()) if conv.turns or conv.system is not None else 0
        self.out(f"context: {n} of {conv.n_ctx} tokens ({100 * n / conv.n_ctx:.0f}%) for {len(conv.turns)} "
                 f"messages{' and a system message' if conv.system is not None else ''}; "
                 f"{conv.cache.n_past} in the KV cache"
                 + ("; the next turn drops the oldest messages" if n >= conv.n_ctx else ""))

    def cmd_save(self, arg: str):
        from .store import write_text_atomic

        force = arg.endswith(" --force") or arg == "--force"
        name = arg[: -len("--force")].strip() if force else arg
        if not name:
            raise UsageError("/save needs a file name")
        path = Path(name).expanduser()
        if path.exists() and not force:
            raise UsageError(f"{path} exists", hint="/save FILE --force replaces it")
        if path.is_dir():
            raise UsageError(f"{path} is a directory")
        write_text_atomic(path, json.dumps(self.conv.to_json(), ensure_ascii=False, indent=2) + "\n")
        self.note(f"(saved {len(self.conv.turns)} messages to {path})")

    def cmd_load(self, arg: str):
        path, text = _read_file(arg, "/load", "cannot load {path}: not JSON ({e})")
        try:
            obj = jsonio.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"cannot load {path}: not JSON ({e})") from None
        try:
            self.conv.load_json(obj)
        except UsageError as e:
            raise UsageError(f"cannot load {path}: {e}") from None
        saved_with = obj.get("model")
        other = f"; it was saved with {saved_with}" if saved_with and saved_with != self.conv.name else ""
        self.note(f"(loaded {len(self.conv.turns)} messages from {path}{other})")

    def cmd_read(self, arg: str):
        path, text = _read_file(arg, "/read", "{path} is not UTF-8 text")
        text = text.rstrip("\r\n")  # a file's final newline ends the file, not the message
        if not text.strip():
            raise UsageError(f"{path} is empty")
        self.note(f"(sending {path}: {len(text)} characters)")
        self.conv.say(text)
        self.reply()

    def cmd_experts(self, arg: str):
        conv = self.conv
        cfg = conv.model.config
        if not cfg.is_moe:
            self.out("dense model: every token runs the same feed-forward weights; no experts to show")
            return
        r = conv.last
        hist = r.stats.hist_decode if r is not None else None
        if hist is None:
            self.note("(no reply yet)")
            return
        n_tok = r.stats.timings.decode_steps
        if not hist.any():
            self.note("(the last reply had no decode steps to count)")
            return
        self.out(f"routing of the last reply: {n_tok} generated tokens x {conv.model.transformer.router.top_k} "
                 f"experts per layer (bar: share of each expert 0..{cfg.n_expert - 1}; top 3 with shares)")
        for li, row in enumerate(hist):
            if not cfg.layer_is_moe(li):
                self.out(f"layer {li:>3}  dense")
                continue
            self.out(f"layer {li:>3}  {histogram_line(row)}")


def _read_file(arg: str, command: str, not_text: str) -> tuple[Path, str]:
    """(path, text) of the file a command names; UsageError when none is named, it cannot be read, or it is not
    UTF-8 (not_text, with {path} and {e})."""
    if not arg:
        raise UsageError(f"{command} needs a file name")
    path = Path(arg).expanduser()
    try:
        return path, path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UsageError(not_text.format(path=path, e=e)) from None


def histogram_line(row: np.ndarray, top: int = 3, max_bar: int = 64) -> str:
    """One layer's expert counts as a bar of block characters (when they fit) and the top experts' shares."""
    total = int(row.sum())
    if total == 0:
        return "no tokens"
    peak = int(row.max())
    bar = ""
    if len(row) <= max_bar:
        bar = "".join(" " if c == 0 else SPARK[min(len(SPARK) - 1, math.ceil(c / peak * len(SPARK)) - 1)]
                      for c in row.tolist()) + "  "
    best = np.argsort(-row, kind="stable")[:top]
    return bar + ", ".join(f"{int(e)}: {100 * row[e] / total:.0f}%" for e in best if row[e])


def run_chat(model: str, *, system: str | None, sampling: SamplerParams, max_tokens: int,
             engine: EngineOptions | None = None) -> int:
    """Load model (its errors are raised before the REPL starts), then chat until /bye, Ctrl+D or Ctrl+C twice."""
    from rich.console import Console

    from .api import load

    _check_max_tokens(max_tokens)
    sampling = _checked_params(sampling)
    m = load(model, engine)
    conv = Conversation(m, model, system=system, sampling=sampling, max_tokens=max_tokens)
    console = Console(highlight=False, emoji=False, markup=False)
    ui = ChatUI(conv, console, line_reader())
    cfg = m.config
    kind = f"{cfg.n_expert} experts, top-{m.transformer.router.top_k}" if cfg.is_moe else "dense"
    ui.note(f"lmcli chat · {model} ({cfg.arch}, {kind}) · context {conv.n_ctx} tokens · "
            f"loaded in {m.load_s:.1f} s · /? for help, /bye to leave")
    return ui.loop()
