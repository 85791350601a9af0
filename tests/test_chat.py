"""`lmcli chat` as a person uses it, in a pseudo-terminal (pexpect): typing, slash commands, Ctrl+C, Ctrl+D.

On the packaged SmolLM2 (real answers) and on a tiny synthetic MoE (routing, context overflow)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

PROMPT = ">>> "
FOOTER = re.compile(r"^(\d+) tokens, [\d.]+ tokens/s · prompt: (\d+) tokens, [\d.]+ tokens/s")
ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>])")


def clean(text: str) -> str:
    return ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "")


class Chat:
    """One `lmcli chat` process in a pty; send() types a line and returns what was printed before the next prompt."""

    def __init__(self, model: str, *args: str, home: Path, history: bool = False, term: str = "dumb",
                 timeout: float = 90):
        env = {k: v for k, v in os.environ.items() if k != "LMCLI_NOHISTORY"}
        env.update(LMCLI_HOME=str(home), TERM=term, PROMPT_TOOLKIT_NO_CPR="1")
        if not history:
            env["LMCLI_NOHISTORY"] = "1"
        self.prompt = PROMPT if term == "dumb" else PROMPT.strip()  # a full terminal moves the cursor instead
        self.c = pexpect.spawn(sys.executable, ["-m", "lmcli.cli", "chat", model, *args], env=env,
                               encoding="utf-8", timeout=timeout, dimensions=(40, 160))
        self.banner = self.wait()

    def wait(self) -> str:
        self.c.expect_exact(self.prompt)
        return clean(self.c.before)

    def send(self, line: str) -> str:
        self.c.sendline(line)
        lines = self.wait().split("\n")
        # drop the echo of the typed line (twice when typed before line editing took the terminal over)
        while lines and lines[0].strip() == line.strip():
            lines.pop(0)
        return "\n".join(lines)

    def key(self, keys: str) -> None:
        """Press keys as a person does: not within microseconds of the prompt appearing (before line
        editing has taken over the terminal, the terminal driver itself would act on a control key)."""
        time.sleep(0.3)
        self.c.send(keys)

    def bye(self) -> int:
        self.c.sendline("/bye")
        self.c.expect(pexpect.EOF)
        self.c.close()
        return self.c.exitstatus


def reply_and_footer(out: str) -> tuple[str, re.Match | None]:
    lines = out.rstrip("\n").split("\n")
    m = FOOTER.match(lines[-1]) if lines else None
    return ("\n".join(lines[:-1]) if m else out), m


def saved(chat: Chat, path: Path) -> dict:
    out = chat.send(f"/save {path} --force")
    assert out.startswith("(saved"), out
    return json.loads(path.read_text(encoding="utf-8"))


def contents(obj: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in obj["messages"]]


def stats(chat: Chat) -> tuple[int, int]:
    out = chat.send("/stats")
    m = re.search(r"prompt: (\d+) tokens processed, (\d+) reused from the cache", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


@pytest.fixture(scope="session")
def moe_path(tmp_path_factory) -> Path:
    from quant.synthetic import write_synthetic_moe

    return write_synthetic_moe(tmp_path_factory.mktemp("moe") / "tiny-moe.lmc", n_layer=2, n_embd=256, n_ff_exp=512,
                               n_expert=8, n_head=4, n_head_kv=2, vocab=512)


# --- SmolLM2 -----------------------------------------------------------------------------------


def test_a_question_gets_an_answer_streamed_with_a_footer(lmcli_home):
    chat = Chat("smollm2", "--temp", "0", "-n", "16", home=lmcli_home)
    assert "smollm2" in chat.banner and "/?" in chat.banner
    text, footer = reply_and_footer(chat.send("What is the capital of France?"))
    assert "Paris" in text
    assert footer is not None and int(footer.group(1)) > 0 and int(footer.group(2)) > 5
    assert chat.send("/experts").startswith("dense model")
    assert "/regen" in chat.send("/?") and "/regen" in chat.send("/help")
    assert chat.bye() == 0


def test_show_info_names_the_quantization_of_an_imported_gguf(lmcli_home):
    """Issue 18: `/show info` said `quantization: ?` for smollm2 (a GGUF import records llama.cpp's file type)."""
    chat = Chat("smollm2", home=lmcli_home)
    assert "quantization: q4_1\n" in chat.send("/show info")
    assert chat.bye() == 0


def test_read_sends_a_file_as_the_next_message(lmcli_home, tmp_path):
    q = tmp_path / "question.txt"
    q.write_text("What is the capital of France?\n", encoding="utf-8")
    chat = Chat("smollm2", "-n", "16", home=lmcli_home)
    out = chat.send(f"/read {q}")
    assert "Paris" in out
    assert contents(saved(chat, tmp_path / "c.json"))[0] == ("user", "What is the capital of France?")
    assert chat.bye() == 0


def test_set_temp_0_makes_regen_reproducible(lmcli_home):
    chat = Chat("smollm2", "--temp", "1.5", "-n", "12", home=lmcli_home)
    assert chat.send("/set temp 0") == "(temp = 0.0)\n"
    first, f1 = reply_and_footer(chat.send("Name three fruits."))
    again, f2 = reply_and_footer(chat.send("/regen"))
    assert f1 and f2 and first.strip()
    assert again == first
    assert chat.bye() == 0


def test_undo_and_regen_change_the_history(lmcli_home, tmp_path):
    chat = Chat("smollm2", "-n", "12", home=lmcli_home)  # the registry's default for smollm2 is greedy
    a1, _ = reply_and_footer(chat.send("What is the capital of France?"))
    chat.send("And of Italy?")
    full = contents(saved(chat, tmp_path / "s.json"))
    assert [r for r, _ in full] == ["user", "assistant", "user", "assistant"]
    assert full[1] == ("assistant", a1.strip("\n"))
    assert chat.send("/undo") == "(removed the last 2 messages; 2 left)\n"
    assert contents(saved(chat, tmp_path / "s.json")) == full[:2]
    chat.send("/regen")  # replaces the last reply: same question, a new (here identical, greedy) answer
    assert contents(saved(chat, tmp_path / "s.json")) == full[:2]
    chat.send("/undo")
    assert contents(saved(chat, tmp_path / "s.json")) == []
    assert chat.send("/undo").startswith("error: nothing to undo")
    assert chat.send("/regen").startswith("error: nothing to regenerate")
    assert chat.bye() == 0


def test_save_then_load_restores_messages_and_settings(lmcli_home, tmp_path):
    chat = Chat("smollm2", "-n", "16", home=lmcli_home)
    chat.send("/set system You are a terse assistant.")
    chat.send("/set temp 0.25")
    chat.send("/set max-tokens 12")
    chat.send("What is the capital of France?")
    before = saved(chat, tmp_path / "a.json")
    assert before["messages"][0] == {"role": "system", "content": "You are a terse assistant."}
    assert before["settings"]["temp"] == 0.25 and before["settings"]["max_tokens"] == 12
    chat.send("/clear")
    chat.send("/set system")
    chat.send("/set temp 0.9")
    assert contents(saved(chat, tmp_path / "b.json")) == []
    assert chat.send(f"/load {tmp_path / 'a.json'}").startswith("(loaded 2 messages")
    after = saved(chat, tmp_path / "b.json")
    assert after == before
    assert chat.send("/show system") == "You are a terse assistant.\n"
    assert "temp: 0.25" in chat.send("/show parameters")
    assert chat.bye() == 0


def test_ctrl_c_mid_reply_stops_it_and_keeps_the_session(lmcli_home, tmp_path):
    chat = Chat("smollm2", "-n", "-1", home=lmcli_home)
    chat.c.sendline("Write a very long story about a dragon, with many chapters.")
    chat.c.expect(r"\n[^\r\n]{24}")  # the reply is streaming
    chat.c.sendcontrol("c")
    out = chat.wait()
    assert "stopped: the partial reply is kept" in out
    msgs = contents(saved(chat, tmp_path / "c.json"))
    assert msgs[-1][0] == "assistant" and len(msgs[-1][1]) >= 24  # the partial reply, as it was shown
    assert "Paris" in chat.send("What is the capital of France?")
    assert chat.bye() == 0


def test_kv_cache_is_reused_between_turns(lmcli_home):
    chat = Chat("smollm2", "-n", "12", home=lmcli_home)
    chat.send("What is the capital of France?")
    processed, reused = stats(chat)
    assert reused == 0 and processed > 20  # first turn: the whole prompt
    for q in ("And of Germany?", "And of Spain?"):
        chat.send(q)
        processed, reused = stats(chat)
        # only the new message (and the template's turn markers) is fed; the history comes from the cache
        assert reused > 2 * processed, (processed, reused)
        assert processed < 30
    assert chat.bye() == 0


def test_bad_input_gets_one_clear_line_and_the_session_goes_on(lmcli_home, tmp_path):
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    (tmp_path / "roles.json").write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
                                         encoding="utf-8")
    (tmp_path / "exists.json").write_text("{}", encoding="utf-8")
    chat = Chat("smollm2", "-n", "16", home=lmcli_home)
    for line in ("/foo", "/set temp abc", "/set temp 500", "/set top-k 1.5", "/set nosuch 1", "/set",
                 f"/load {tmp_path / 'bad.json'}", f"/load {tmp_path / 'roles.json'}", f"/load {tmp_path / 'nope'}",
                 f"/read {tmp_path / 'nope.txt'}", f"/save {tmp_path / 'exists.json'}", "/show nothing",
                 "/undo", "/regen"):
        out = chat.send(line)
        lines = [x for x in out.split("\n") if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (line, out)
        assert "Traceback" not in out
    assert "temp: 0.0" in chat.send("/show parameters")  # the bad values changed nothing
    assert "Paris" in chat.send("What is the capital of France?")
    assert chat.bye() == 0


def test_an_unknown_model_fails_before_the_repl_starts(lmcli_home):
    env = dict(os.environ, LMCLI_HOME=str(lmcli_home), LMCLI_NOHISTORY="1", TERM="dumb")
    c = pexpect.spawn(sys.executable, ["-m", "lmcli.cli", "chat", "no-such-model"], env=env, encoding="utf-8",
                      timeout=60)
    c.expect(pexpect.EOF)
    c.close()
    out = clean(c.before).strip()
    assert c.exitstatus == 1
    assert out.startswith("error: unknown model 'no-such-model'") and PROMPT not in out and "\n" not in out


# --- the tiny MoE ----------------------------------------------------------------------------


def test_experts_shows_the_routing_histogram_of_the_last_reply(lmcli_home, moe_path):
    chat = Chat(str(moe_path), "--temp", "0", "-n", "12", home=lmcli_home)
    assert "8 experts, top-2" in chat.banner
    assert chat.send("/experts") == "(no reply yet)\n"
    chat.send("hello")
    out = chat.send("/experts").split("\n")
    assert out[0].startswith("routing of the last reply: 11 generated tokens x 2 experts")
    for li in (0, 1):
        row = out[1 + li]
        assert row.startswith(f"layer {li:>3}  "), row
        shares = [int(s) for s in re.findall(r"\d+: (\d+)%", row)]
        assert 1 <= len(shares) <= 3 and shares == sorted(shares, reverse=True) and shares[0] >= 100 / 8
    assert re.search(r"experts: [\d.]+ MB read per generated token, [\d.]+ MB for the prompt", chat.send("/stats"))
    assert chat.bye() == 0


def test_a_full_context_drops_the_oldest_turns_and_says_so(lmcli_home, moe_path, tmp_path):
    chat = Chat(str(moe_path), "--temp", "0", "-n", "8", "-c", "256", home=lmcli_home)
    notes = []
    for i in range(8):
        out = chat.send(f"message number {i}")
        notes += [x for x in out.split("\n") if "dropped the oldest" in x]
        if notes:
            break
    assert notes and "the context of 256 tokens is full" in notes[0]
    users = [c for r, c in contents(saved(chat, tmp_path / "c.json")) if r == "user"]
    assert "message number 0" not in users and users[-1] == f"message number {i}"
    m = re.search(r"context: \d+ of 256 tokens .*; (\d+) in the KV cache", chat.send("/context"))
    assert m and int(m.group(1)) <= 256
    assert chat.bye() == 0


def test_multiline_input_between_triple_quotes_is_one_message(lmcli_home, moe_path, tmp_path):
    chat = Chat(str(moe_path), "-n", "2", home=lmcli_home)
    chat.c.sendline('"""first line')
    chat.c.expect_exact("... ")
    chat.c.sendline("second line")
    chat.c.expect_exact("... ")
    chat.c.sendline('third line"""')
    chat.wait()
    assert contents(saved(chat, tmp_path / "m.json"))[0] == ("user", "first line\nsecond line\nthird line")
    assert chat.bye() == 0


def test_ctrl_c_twice_at_the_prompt_leaves_and_ctrl_d_leaves(lmcli_home, moe_path):
    chat = Chat(str(moe_path), home=lmcli_home)
    chat.key("\x03")
    assert "Ctrl+C again or /bye to leave" in chat.wait()
    chat.key("\x03")
    chat.c.expect(pexpect.EOF)
    chat.c.close()
    assert chat.c.exitstatus == 0
    chat = Chat(str(moe_path), home=lmcli_home)
    chat.key("\x04")
    chat.c.expect(pexpect.EOF)
    chat.c.close()
    assert chat.c.exitstatus == 0


def test_history_file_recalls_lines_across_sessions_unless_turned_off(tmp_path, moe_path):
    history = tmp_path / "history"
    chat = Chat(str(moe_path), home=tmp_path, history=False)
    chat.send("/show system")
    assert chat.bye() == 0
    assert not history.exists()  # LMCLI_NOHISTORY
    chat = Chat(str(moe_path), home=tmp_path, history=True, term="xterm")
    chat.key("/show system\r")
    chat.c.expect_exact("(no system message)")
    chat.key("\x04")  # Ctrl+D leaves (and /bye stays out of the history)
    chat.c.expect(pexpect.EOF)
    assert history.read_text(encoding="utf-8").strip().endswith("+/show system")  # prompt_toolkit's format
    chat = Chat(str(moe_path), home=tmp_path, history=True, term="xterm")
    chat.key("\x1b[A")  # Up: the last line of the previous session
    chat.key("\r")
    chat.c.expect_exact("(no system message)")
    assert chat.bye() == 0


def test_stats_shows_the_expert_cache_when_one_is_in_use(lmcli_home, moe_path):
    chat = Chat(str(moe_path), "--temp", "0", "-n", "6", "--expert-cache-mib", "4", home=lmcli_home)
    chat.send("hello")
    out = chat.send("/stats")
    m = re.search(r"expert cache: (\d+) bundles of [\d.]+ MB, hit rate (\d+)%, ([\d.]+) MB read from disk", out)
    assert m, out
    assert int(m.group(1)) >= 2 and float(m.group(3)) > 0
    assert chat.bye() == 0


def test_a_reply_stopped_early_keeps_the_figures_of_what_ran(smol_container):
    import lmcli
    from lmcli.repl import Conversation
    from lmcli.sampling import SamplerParams

    m = lmcli.load(str(smol_container), n_ctx=256)
    conv = Conversation(m, "smollm2", system=None, sampling=SamplerParams(temp=0.0), max_tokens=50)
    conv.say("Tell me a long story about a dragon.")
    ids, _ = conv.fit()
    stream = conv.stream(ids)
    pieces = [next(stream).text for _ in range(3)]
    stream.close()  # what Ctrl+C during a reply does
    st = conv.last.stats
    assert st.finish_reason == "interrupted" and st.timings.prompt_tokens == len(ids)
    assert st.timings.completion_tokens == 3 and st.timings.decode_steps == 2 and st.timings.prefill_s > 0
    assert conv.turns[-1] == {"role": "assistant", "content": "".join(pieces)}
    assert st.hist is None  # a dense model
    # the next turn reuses the cache and reports only itself
    conv.say("Shorter, please.")
    ids2, _ = conv.fit()
    list(conv.stream(ids2))
    assert conv.last.stats.finish_reason in ("stop", "length") and conv.last.reused_tokens > len(ids)
    assert conv.last.stats.timings.prompt_tokens == len(ids2) - conv.last.reused_tokens
