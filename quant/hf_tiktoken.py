"""A tiktoken BPE ranks file (`tiktoken.model`, as Kimi K2 and Moonlight ship it) as a byte-level BPE tokenizer.json.

The ranks file holds only the vocabulary; the pre-tokenizer pattern and the special-token ids live in the repo's
tokenizer class, a Python file lmcli never runs. They are data here, per family, and the family is recognised from
tokenizer_config.json's auto_map (the module it names); when that module is present, its text is read (not run) to
check that it still holds the family's pattern.

Why the tokenizers library reproduces tiktoken exactly: tiktoken merges, inside one pre-token, the adjacent pair whose
concatenation has the lowest rank. A token t can only form once every lower-ranked merge inside its bytes is done, so
the two parts it forms from are those that tiktoken's own merge loop leaves on t's bytes alone, stopped below t's rank.
That pair, ranked by t, is t's single BPE merge; `ignore_merges` takes a pre-token that is itself a token whole, as
tiktoken's first lookup does.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from pathlib import Path

from .errors import ConvertError

RANKS_FILE = "tiktoken.model"
MAX_RANKS_BYTES = 64 << 20  # Kimi K2's file is about 2.8 MB
MAX_TOKEN_BYTES = 1024  # longer than any token of a real vocabulary; bounds the merge replay
MAX_MODULE_BYTES = 1 << 20


@dataclass(frozen=True)
class Family:
    """What a tiktoken tokenizer class holds beyond its ranks file."""

    name: str
    pattern: tuple[str, ...]  # pat_str's alternatives, joined with "|"
    n_reserved: int  # special ids that follow the ranks; added_tokens_decoder names some
    reserved_name: str  # the text of an unnamed one, formatted with its id

    @property
    def pat_str(self) -> str:
        return "|".join(self.pattern)


# tokenization_kimi.py (Kimi K2) and tokenization_moonshot.py (Moonlight): TikTokenTokenizer.pat_str and
# num_reserved_special_tokens; the Han script is split off before letters.
KIMI = Family(
    name="kimi",
    pattern=(
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ),
    n_reserved=256,
    reserved_name="<|reserved_token_{}|>",
)

# The module a repo's auto_map names for its tokenizer -> the family it implements.
FAMILIES = {"tokenization_kimi": KIMI, "tokenization_moonshot": KIMI}


def family_module(tc: dict) -> str | None:
    """The module tokenizer_config.json's auto_map names for AutoTokenizer ("tokenization_kimi"), if any."""
    entry = (tc.get("auto_map") or {}).get("AutoTokenizer") if isinstance(tc.get("auto_map"), dict) else None
    if isinstance(entry, list):
        entry = next((e for e in entry if isinstance(e, str)), None)
    return entry.split(".")[0] if isinstance(entry, str) and "." in entry else None


def find_family(directory: Path, tc: dict) -> Family:
    """The known family of a directory holding tiktoken.model, from the module its auto_map names."""
    module = family_module(tc)
    family = FAMILIES.get(module or "")
    if family is None:
        what = f"names {module!r}" if module else "names no tokenizer module"
        raise ConvertError(f"{RANKS_FILE} needs a known tokenizer family: tokenizer_config.json's auto_map {what} "
                           f"(known: {', '.join(sorted(FAMILIES))})")
    source = directory / f"{module}.py"
    if source.is_file():  # read as text to check the data still matches it; never imported
        if source.stat().st_size > MAX_MODULE_BYTES:
            raise ConvertError(f"{source.name} is larger than {MAX_MODULE_BYTES} bytes")
        text = source.read_text(encoding="utf-8", errors="replace")
        missing = next((p for p in family.pattern if p not in text), None)
        if missing is not None or f"num_reserved_special_tokens = {family.n_reserved}" not in text:
            raise ConvertError(f"{source.name} differs from the known {family.name} tokenizer (its pre-tokenizer "
                               f"pattern or its {family.n_reserved} reserved special tokens): not supported")
    return family


def read_ranks(path: Path) -> list[bytes]:
    """The tokens of a ranks file ("<base64 token> <rank>" per line), indexed by rank; validated: ranks 0..n-1
    each once, tokens distinct and non-empty, every single byte a token."""
    try:
        size = path.stat().st_size
        if size > MAX_RANKS_BYTES:
            raise ConvertError(f"{path.name} is {size} bytes, more than a ranks file can be ({MAX_RANKS_BYTES})")
        data = path.read_bytes()
    except OSError as e:
        raise ConvertError(f"{path.name} cannot be read ({e.strerror or e})") from None
    entries = []
    for n, line in enumerate(data.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].isdigit():
            raise ConvertError(f"{path.name} line {n} is not '<base64 token> <rank>'")
        try:
            token = binascii.a2b_base64(parts[0], strict_mode=True)
        except binascii.Error:
            raise ConvertError(f"{path.name} line {n}: the token is not valid base64") from None
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise ConvertError(f"{path.name} line {n}: a token of {len(token)} bytes (1 to {MAX_TOKEN_BYTES})")
        entries.append((n, token, int(parts[1])))
    count = len(entries)
    tokens: list[bytes | None] = [None] * count
    line_of: dict[bytes, int] = {}
    for n, token, rank in entries:
        if rank >= count:
            raise ConvertError(f"{path.name} line {n}: rank {rank} is out of range: {count} tokens need ranks "
                               f"0..{count - 1}, each once")
        if tokens[rank] is not None:
            raise ConvertError(f"{path.name} line {n}: rank {rank} repeats line {line_of[tokens[rank]]}'s")
        if token in line_of:
            raise ConvertError(f"{path.name} line {n}: token {token!r} repeats line {line_of[token]}'s")
        tokens[rank], line_of[token] = token, n
    # count ranks below count, none repeated: every rank 0..count-1 is taken
    missing = next((b for b in range(256) if bytes([b]) not in line_of), None)
    if missing is not None:
        raise ConvertError(f"{path.name}: byte {missing:#04x} is not a token, so some text cannot be encoded")
    return tokens  # type: ignore[return-value]


def _merge_pair(token: bytes, rank_of: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The two parts tiktoken forms `token` from: its merge loop on the token's bytes, stopped below its rank
    (None for a token no merge forms, reachable only as a whole pre-token)."""
    limit = rank_of[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = limit, -1
        for i in range(len(parts) - 1):
            r = rank_of.get(parts[i] + parts[i + 1], limit)
            if r < best:  # strict: the leftmost of equal ranks, as tiktoken
                best, at = r, i
        if at < 0:
            return None
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def _gpt2_spelling() -> list[str]:
    """GPT-2's printable character for each byte (the alphabet of byte-level BPE vocabularies)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in kept}
    spelling.update((b, chr(256 + n)) for n, b in enumerate(b for b in range(256) if b not in spelling))
    return [spelling[b] for b in range(256)]


def special_tokens(tc: dict, n_ranks: int, family: Family) -> list[str]:
    """The texts of the family's special ids n_ranks.. in order: added_tokens_decoder's names, the family's
    reserved name for the rest (as the tokenizer class builds them)."""
    names: dict[int, str] = {}
    decoder = tc.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise ConvertError("tokenizer_config.json: added_tokens_decoder is not an object")
    end = n_ranks + family.n_reserved
    for key, entry in decoder.items():
        text = entry.get("content") if isinstance(entry, dict) else None
        if not str(key).isdigit() or not n_ranks <= int(key) < end or not isinstance(text, str) or not text:
            raise ConvertError(f"tokenizer_config.json: added token {key!r} is not a special id {n_ranks}..{end - 1} "
                               "with a text, as the tiktoken tokenizer needs")
        names[int(key)] = text
    texts = [names.get(i, family.reserved_name.format(i)) for i in range(n_ranks, end)]
    if len(set(texts)) != len(texts):
        raise ConvertError("tokenizer_config.json names the same special token twice")
    return texts


def build_backend(directory: Path, tc: dict):
    """The tokenizers.Tokenizer of a directory's tiktoken.model and its family's pattern and special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    family = find_family(directory, tc)
    tokens = read_ranks(directory / RANKS_FILE)
    specials = special_tokens(tc, len(tokens), family)
    rank_of = {t: r for r, t in enumerate(tokens)}
    spell = _gpt2_spelling()

    def text(token: bytes) -> str:
        return "".join(spell[b] for b in token)

    pairs = (_merge_pair(t, rank_of) for t in tokens if len(t) > 1)  # in rank order: the merges' priority
    merges = [(text(a), text(b)) for a, b in filter(None, pairs)]
    vocab = {text(t): r for r, t in enumerate(tokens)}
    try:
        backend = Tokenizer(models.BPE(vocab, merges, ignore_merges=True, fuse_unk=False, dropout=None))
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(family.pat_str), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    except Exception as e:  # the Rust library raises plain Exception
        raise ConvertError(f"cannot build the {family.name} tokenizer from {RANKS_FILE} ({e})") from None
    backend.decoder = decoders.ByteLevel()
    # tiktoken matches every special token in text (Kimi encodes with allowed_special="all")
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    clash = next((s for k, s in enumerate(specials) if backend.token_to_id(s) != len(tokens) + k), None)
    if clash is not None:  # the library would reuse the ordinary token's id; tiktoken keeps them apart
        raise ConvertError(f"special token {clash!r} is also an ordinary token of {RANKS_FILE}: not supported")
    return backend
