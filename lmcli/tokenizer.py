"""Text to token ids and back, built from a model's GGUF tokenizer metadata or a tokenizer.json."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral, Real
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from lmcli.errors import TokenizerError

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Texts of tokens that end a turn, as llama.cpp recognises them when a file does not name them all.
_END_OF_TURN = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<end_of_utterance>",
    "<｜end▁of▁sentence｜>",
)

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# How text is split before byte-level BPE, by `tokenizer.ggml.pre`. These are llama.cpp's regexes; a
# `pre` not listed here keeps GPT-2's split, as transformers does.
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
        + ("jina-v5-nano", "dbrx", "smaug-bpe"),
        _LLAMA3,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35,
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}

# Pre-tokenizers that split every digit off before GPT-2's split (tokenizer.json: Digits(individual_digits) then
# ByteLevel; llama.cpp: "\p{N}" then the GPT-2 pattern). Without the first step a run of blank lines before a digit
# splits "\n" "\n" instead of "\n\n" (SmolLM2).
_DIGITS_FIRST = frozenset(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"))


def _gpt2_byte_spelling() -> tuple[str, ...]:
    """GPT-2's printable spelling of each byte value, indexed by byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in kept}
    missing = [b for b in range(256) if b not in spelling]
    spelling.update((b, chr(256 + n)) for n, b in enumerate(missing))
    return tuple(spelling[b] for b in range(256))


_BYTE_SPELLING = _gpt2_byte_spelling()


class Tokenizer:
    """A model's tokenizer: the Rust `tokenizers` backend plus the ids a model needs to know."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        vocab_size: int,
        bos_id: int | None,
        eos_ids: frozenset[int],
        add_bos: bool = False,
        add_eos_id: int | None = None,
        special: frozenset[int] | None = None,
        byte_ids: frozenset[int] | None = None,
    ):
        """special, byte_ids: the control-token ids and the byte-piece ids ("<0x0A>"), when known (a cached
        tokenizer: scanning the vocabulary for them takes tens of milliseconds); found from the backend if None."""
        self._backend = backend
        self._vocab_size = vocab_size
        self._bos_id = bos_id
        self._eos_ids = eos_ids
        self._add_bos = add_bos
        self._add_eos_id = add_eos_id
        if special is None:
            added = backend.get_added_tokens_decoder()
            special = frozenset(i for i, token in added.items() if token.special)
        if byte_ids is None:
            vocab = backend.get_vocab(with_added_tokens=True)
            byte_ids = frozenset(i for piece, i in vocab.items() if _BYTE_PIECE.fullmatch(piece))
        self._special, self._byte_ids = special, byte_ids

    @classmethod
    def from_metadata(cls, tok: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF tokenizer fields (`model`, `tokens`, ...) or from `json` (a tokenizer.json text)."""
        if not isinstance(tok, Mapping):
            raise TokenizerError(f"tokenizer metadata must be a mapping, not {type(tok).__name__}")
        if "json" in tok:
            return _from_json(tok)
        model = tok.get("model")
        if model not in ("gpt2", "llama"):
            what = "is missing" if model is None else f"{model!r} is not supported"
            raise TokenizerError(f"tokenizer model type {what} (supported: gpt2, llama)")
        tokens = _tokens(tok)
        types = _token_types(tok, len(tokens))
        named = {key: _token_id(tok.get(key), key, len(tokens)) for key in _ID_KEYS}
        try:
            if model == "gpt2":
                backend = _byte_level_backend(tok, tokens, types)
            else:
                backend = _sentencepiece_backend(tok, tokens, types)
            _add_special_tokens(backend, model, tokens, types, named)
        except TokenizerError:
            raise
        except Exception as exc:  # the Rust library reports bad vocabularies as plain exceptions
            raise TokenizerError(f"cannot build the {model} tokenizer: {_one_line(exc)}") from exc
        eos = [named[key] for key in ("eos_token_id", "eot_token_id", "eom_token_id") if named[key] is not None]
        eos += _end_of_turn_ids({token: i for i, token in enumerate(tokens)})
        add_eos = _flag(tok, "add_eos_token", False)
        return cls(
            backend,
            vocab_size=len(tokens),
            bos_id=named["bos_token_id"],
            eos_ids=frozenset(eos),
            add_bos=_flag(tok, "add_bos_token", model == "llama"),
            add_eos_id=named["eos_token_id"] if add_eos else None,
        )

    def to_cache(self) -> str:
        """The whole tokenizer as one JSON text that from_cache() reads back (the backend as tokenizer.json, and the
        ids from_metadata worked out), so that a model's later runs skip building it from the vocabulary."""
        return json.dumps({"format": CACHE_FORMAT, "backend": self._backend.to_str(), "vocab_size": self._vocab_size,
                           "bos_id": self._bos_id, "eos_ids": sorted(self._eos_ids), "add_bos": self._add_bos,
                           "add_eos_id": self._add_eos_id, "special": sorted(self._special),
                           "byte_ids": sorted(self._byte_ids)}, ensure_ascii=False)

    @classmethod
    def from_cache(cls, text: str) -> Tokenizer:
        """A tokenizer from to_cache()'s text; TokenizerError if it is not one (a damaged or foreign file)."""
        try:
            d = json.loads(text)
            if d.get("format") != CACHE_FORMAT:
                raise ValueError("another format")
            return cls(tokenizers.Tokenizer.from_str(d["backend"]), vocab_size=int(d["vocab_size"]),
                       bos_id=d["bos_id"], eos_ids=frozenset(d["eos_ids"]), add_bos=bool(d["add_bos"]),
                       add_eos_id=d["add_eos_id"], special=frozenset(d["special"]),
                       byte_ids=frozenset(d["byte_ids"]))
        except Exception as exc:  # anything unreadable is rebuilt from the metadata by the caller
            raise TokenizerError(f"not a cached tokenizer: {_one_line(exc)}") from exc

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model knows."""
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        """The beginning-of-sequence id, if the model has one."""
        return self._bos_id

    @property
    def eos_ids(self) -> frozenset[int]:
        """Ids that end generation: end of sequence, end of turn."""
        return self._eos_ids

    @property
    def add_bos(self) -> bool:
        """Whether `encode` adds the BOS id unless told otherwise."""
        return self._add_bos and self._bos_id is not None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token texts such as "<|im_start|>" map to their single id.

        `add_bos=None` follows the metadata (`add_bos_token`, and `add_eos_token` for a trailing EOS).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode text, not {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if (self._add_bos if add_bos is None else add_bos) and self._bos_id is not None:
            ids.insert(0, self._bos_id)
        if add_bos is None and self._add_eos_id is not None:
            ids.append(self._add_eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """The text of `ids`; `skip_special` leaves out control tokens."""
        ids = self._checked(ids)
        return self._backend.decode(ids, skip_special_tokens=skip_special)

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry of one id as stored (e.g. "Ġthe", "▁the", "<0x0A>", "<|im_end|>")."""
        (token_id,) = self._checked([token_id])
        piece = self._backend.id_to_token(token_id)
        return "" if piece is None else piece

    def is_special(self, token_id: int) -> bool:
        """Whether the id is a control token (left out by `decode(..., skip_special=True)`)."""
        return token_id in self._special

    def to_json(self) -> str:
        """The backend as tokenizer.json text (what grammar libraries read to learn each id's bytes)."""
        return self._backend.to_str()

    def stream(self, skip_special: bool = False) -> StreamDecoder:
        """A decoder that turns ids into text one at a time, as they are generated."""
        return StreamDecoder(self, skip_special)

    def _checked(self, ids: Iterable[int]) -> list[int]:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TokenizerError(f"token ids must be a sequence of integers, not {type(ids).__name__}")
        out = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, Integral):
                raise TokenizerError(f"token ids must be integers, got {i!r}")
            if not 0 <= i < self._vocab_size:
                raise TokenizerError(f"token id {i} is out of range for a vocabulary of {self._vocab_size}")
            out.append(int(i))
        return out


class StreamDecoder:
    """Incremental decoding: `push` returns only text that is final; joined pieces equal `decode(ids)`.

    Text is held back while it ends in an incomplete UTF-8 sequence and while the last id is a
    byte-fallback piece ("<0xE4>") or a skipped special token, since a following byte piece can
    change how the group of byte pieces decodes.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip = skip_special
        self._ids: list[int] = []  # ids since the last emission's start: a point where decoding can restart
        self._done = 0  # ids[:_done] have had their text returned

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that became final (often empty)."""
        (token_id,) = self._tok._checked([token_id])
        self._ids.append(token_id)
        if token_id in self._tok._byte_ids or (self._skip and self._tok.is_special(token_id)):
            return ""  # a byte piece, or a skipped token, can be followed by bytes of the same character
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever text is still held back, complete or not."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._done == len(self._ids):
            return ""
        before = self._tok.decode(self._ids[: self._done], self._skip)
        text = self._tok.decode(self._ids, self._skip)
        if not final and (len(text) <= len(before) or text.endswith("\ufffd")):
            return ""
        # Decoders such as SentencePiece's strip a space at the start of what they decode, so the
        # next window starts with the ids just emitted, whose text is subtracted again.
        self._ids = self._ids[self._done :]
        self._done = len(self._ids)
        return text[len(before) :]


CACHE_FORMAT = 1  # to_cache()'s layout


@functools.cache
def build_key() -> str:
    """What a tokenizer built by from_metadata depends on besides the metadata: this module's code (a change in how
    it builds one must not be hidden by a cache) and the tokenizers library's version."""
    code = hashlib.blake2b(open(__file__, "rb").read(), digest_size=8).hexdigest()
    return f"{CACHE_FORMAT}-{tokenizers.__version__}-{code}"


_ID_KEYS = ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "eot_token_id", "eom_token_id")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _tokens(tok: Mapping[str, Any]) -> list[str]:
    tokens = tok.get("tokens")
    if tokens is None:
        raise TokenizerError("tokenizer metadata has no tokens")
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
        raise TokenizerError(f"tokenizer tokens must be a list of strings, not {type(tokens).__name__}")
    if not tokens:
        raise TokenizerError("tokenizer metadata has an empty token list")
    for i, token in enumerate(tokens):
        if not isinstance(token, str) or not token:
            raise TokenizerError(f"token {i} is {token!r}, not a non-empty string")
    seen: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in seen:
            raise TokenizerError(f"token {i} {token!r} duplicates token {seen[token]}")
        seen[token] = i
    return list(tokens)


def _token_types(tok: Mapping[str, Any], n: int) -> list[int]:
    types = tok.get("token_type")
    if types is None:
        return [NORMAL] * n
    if isinstance(types, (str, bytes)) or not isinstance(types, Sequence) or len(types) != n:
        raise TokenizerError(f"tokenizer token_type must be a list of {n} integers, one per token")
    if not all(isinstance(t, Integral) for t in types):
        raise TokenizerError("tokenizer token_type must hold integers")
    return [int(t) for t in types]


def _token_id(value: Any, key: str, n: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TokenizerError(f"tokenizer {key} must be an integer, not {value!r}")
    if not 0 <= int(value) < n:
        raise TokenizerError(f"tokenizer {key} {int(value)} is out of range for {n} tokens")
    return int(value)


def _flag(tok: Mapping[str, Any], key: str, default: bool) -> bool:
    value = tok.get(key)
    if value is None:
        return default
    if not isinstance(value, (bool, Integral)):
        raise TokenizerError(f"tokenizer {key} must be true or false, not {value!r}")
    return bool(value)


def _merges(tok: Mapping[str, Any], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    merges = tok.get("merges")
    if isinstance(merges, (str, bytes)) or not isinstance(merges, Sequence):
        raise TokenizerError(f"tokenizer merges must be a list of 'a b' strings, not {type(merges).__name__}")
    pairs = []
    for i, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else ()
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(f"merge {i} is {merge!r}, not two tokens separated by one space")
        for part in (*parts, parts[0] + parts[1]):
            if part not in vocab:
                raise TokenizerError(f"merge {i} {merge!r} uses {part!r}, which is not a token")
        pairs.append((parts[0], parts[1]))
    return pairs


def _merges_from_scores(tokens: list[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    ranked by the joined token's score (best first), then by the shorter left and right parts."""
    index = {token: i for i, token in enumerate(tokens)}
    ranked: list[tuple[float, str, str]] = []
    for token, score in zip(tokens, scores):
        splits = [(token[:k], token[k:]) for k in range(1, len(token))]
        splits = [(a, b) for a, b in splits if a in index and b in index]
        splits.sort(key=lambda ab: (index[ab[0]], index[ab[1]]))
        ranked.extend((score, a, b) for a, b in splits)
    ranked.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(a, b) for _, a, b in ranked]


def _byte_level_backend(tok: Mapping[str, Any], tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    """Byte-level BPE ("gpt2"): tokens are spelled in GPT-2's byte alphabet."""
    spelling = _BYTE_SPELLING
    alphabet = frozenset(spelling)
    vocab: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        # Added tokens (control, user-defined) are stored as their raw text; they are matched whole,
        # so they keep that spelling. Anything else outside the alphabet is re-spelled byte by byte.
        if kind not in (CONTROL, USER_DEFINED) and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        if token in vocab:
            raise TokenizerError(f"token {i} {tokens[i]!r} duplicates token {vocab[token]}")
        vocab[token] = i
    if tok.get("merges") is None:
        raise TokenizerError("byte-level (gpt2) tokenizer metadata has no merges")
    bpe = models.BPE(
        vocab, _merges(tok, vocab), dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
    )
    backend = tokenizers.Tokenizer(bpe)
    pre = tok.get("pre") or ""
    split = _PRE_SPLITS.get(pre)
    if pre in _DIGITS_FIRST:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(tok: Mapping[str, Any], tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
    """SentencePiece BPE ("llama"): "▁" for spaces, "<0xNN>" pieces for bytes not in the vocabulary."""
    vocab = {token: i for i, token in enumerate(tokens)}
    if tok.get("merges") is not None:
        merges = _merges(tok, vocab)
    else:
        scores = tok.get("scores")
        if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence) or len(scores) != len(tokens):
            raise TokenizerError(f"sentencepiece tokenizer needs merges or scores for all {len(tokens)} tokens")
        if not all(isinstance(s, Real) for s in scores):
            raise TokenizerError("tokenizer scores must be numbers")
        merges = _merges_from_scores(tokens, [float(s) for s in scores])
    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True, dropout=None))
    prefix = _flag(tok, "add_space_prefix", True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _add_special_tokens(
    backend: tokenizers.Tokenizer, model: str, tokens: list[str], types: list[int], named: Mapping[str, int | None]
) -> None:
    """Control tokens and the named bos/eos/unk/pad become special tokens, user-defined ones plain
    added tokens; all are matched whole in text and keep their ids."""
    special_ids = [i for i, kind in enumerate(types) if kind == CONTROL]
    special_ids += [named[key] for key in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id")]
    special = sorted({i for i in special_ids if i is not None})
    user = [i for i, kind in enumerate(types) if kind == USER_DEFINED and i not in special]
    if special:
        backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    if user:
        backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
    size = backend.get_vocab_size(with_added_tokens=True)
    if size != len(tokens):
        raise TokenizerError(f"the {model} tokenizer has {size} ids, but the metadata lists {len(tokens)} tokens")


def _end_of_turn_ids(lookup: Mapping[str, int] | Any) -> list[int]:
    """Ids of tokens that llama.cpp treats as ending generation, found by their text."""
    get = lookup.get if isinstance(lookup, Mapping) else lookup.token_to_id
    names = list(_END_OF_TURN)
    if get("<|return|>") is not None and get("<|call|>") is not None:  # gpt-oss: "<|end|>" only ends a message
        names = [n for n in names if n != "<|end|>"] + ["<|return|>", "<|call|>"]
    return [i for i in map(get, names) if i is not None]


def _from_json(tok: Mapping[str, Any]) -> Tokenizer:
    """A tokenizer.json (from a Hugging Face model directory) plus the ids its config names."""
    text = tok["json"]
    if not isinstance(text, str):
        raise TokenizerError(f"tokenizer json must be text, not {type(text).__name__}")
    try:
        backend = tokenizers.Tokenizer.from_str(text)
    except Exception as exc:
        raise TokenizerError(f"cannot read tokenizer.json: {_one_line(exc)}") from exc
    n = backend.get_vocab_size(with_added_tokens=True)
    bos = _token_id(tok.get("bos_token_id"), "bos_token_id", n)
    eos_field = tok.get("eos_token_id")  # a Hugging Face config may list several
    eos_values = eos_field if isinstance(eos_field, (list, tuple)) else [eos_field]
    eos = [_token_id(value, "eos_token_id", n) for value in eos_values]
    eos += [_token_id(tok.get(key), key, n) for key in ("eot_token_id", "eom_token_id")]
    eos += _end_of_turn_ids(backend)
    return Tokenizer(
        backend,
        vocab_size=n,
        bos_id=bos,
        eos_ids=frozenset(i for i in eos if i is not None),
        add_bos=_flag(tok, "add_bos_token", False),
    )
