"""A Hugging Face model directory's tokenizer (tokenizer.json, tiktoken.model or tokenizer.model) and chat template,
read as data into the container's metadata (GGUF's tokenizer keys); nothing of the repo's Python is run."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import jsonio
from .errors import ConvertError
from .hf_tiktoken import RANKS_FILE, build_backend

# GGUF token types (llama.cpp's llama_token_type), as convert_hf_to_gguf.py writes them.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def read_json(path: Path, required: bool = False) -> dict:
    if not path.is_file():
        if required:
            raise ConvertError(f"{path.parent.name} has no {path.name}")
        return {}
    try:
        data = jsonio.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConvertError(f"{path.name} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path.name} is not a JSON object")
    return data


def _token_text(entry) -> str | None:
    """tokenizer_config's bos_token / eos_token: a string, or a serialized AddedToken {"content": ...}."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _ids(value) -> list:
    return list(value) if isinstance(value, list) else ([] if value is None else [value])


def _check_id(v, n: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
        raise ConvertError(f"{what} {v!r} is not a token id of this vocabulary ({n} tokens)")
    return v


def _special_ids(lookup: Callable[[str], int | None], n: int, tc: dict, gen: dict, cfg: dict):
    """bos id and eos ids: tokenizer_config's tokens first, then generation_config, then config.json
    (gguf.SpecialVocab's order); every eos that generation_config lists ends generation too."""

    def by_text(key):
        text = _token_text(tc.get(key))
        if text is None:
            return None
        tid = lookup(text)
        if tid is None:
            raise ConvertError(f"tokenizer_config.json: {key} {text!r} is not in the vocabulary")
        return tid

    bos = by_text("bos_token")
    if bos is None:
        bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    if bos is not None:
        bos = _check_id(bos, n, "bos_token_id")
    eos = _ids(by_text("eos_token")) + _ids(gen.get("eos_token_id"))
    if not eos:
        eos = _ids(cfg.get("eos_token_id"))
    eos = list(dict.fromkeys(_check_id(e, n, "eos_token_id") for e in eos))
    return bos, (eos[0] if len(eos) == 1 else eos or None)


def _adds_bos(tok_json: dict, bos_text: str | None) -> bool:
    """Whether the fast tokenizer's post-processor prepends BOS (gguf.SpecialVocab's reading of
    TemplateProcessing), for configs without add_bos_token."""
    post = tok_json.get("post_processor") or {}
    for proc in post.get("processors", [post]) if isinstance(post, dict) else []:
        single = proc.get("single") if isinstance(proc, dict) and proc.get("type") == "TemplateProcessing" else None
        if isinstance(single, list) and len(single) > 1 and isinstance(single[0], dict):
            first = (single[0].get("SpecialToken") or {}).get("id")
            if first is not None and first == bos_text:
                return True
    return False


def _hf_tokenizer(directory: Path, tc: dict, gen: dict, cfg: dict) -> dict:
    import tokenizers

    path = directory / "tokenizer.json"
    try:
        text = path.read_text(encoding="utf-8")
        backend = tokenizers.Tokenizer.from_str(text)
        tok_json = jsonio.loads(text)
    except Exception as e:  # OSError, bad UTF-8 or JSON; the Rust library raises plain Exception
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConvertError(f"tokenizer.json cannot be read ({why})") from None
    add_bos = tc.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = _adds_bos(tok_json, _token_text(tc.get("bos_token")))
    return _json_fields(backend, text, add_bos, tc, gen, cfg)


def _tiktoken_tokenizer(directory: Path, tc: dict, gen: dict, cfg: dict) -> dict:
    """tiktoken.model with its family's pattern and special tokens, stored as the tokenizer.json it equals."""
    backend = build_backend(directory, tc)
    add_bos = tc.get("add_bos_token")  # the tiktoken classes add no BOS when they encode
    return _json_fields(backend, backend.to_str(), add_bos if isinstance(add_bos, bool) else False, tc, gen, cfg)


def _json_fields(backend, text: str, add_bos: bool, tc: dict, gen: dict, cfg: dict) -> dict:
    n = backend.get_vocab_size(with_added_tokens=True)
    bos, eos = _special_ids(backend.token_to_id, n, tc, gen, cfg)
    return {"json": text, "bos_token_id": bos, "eos_token_id": eos, "add_bos_token": add_bos, "_n": n}


def _spm_tokenizer(directory: Path, tc: dict, gen: dict, cfg: dict, vocab_size: int) -> dict:
    """A SentencePiece tokenizer.model as GGUF tokenizer fields, the way llama.cpp's convert_hf_to_gguf.py
    (_create_vocab_sentencepiece) writes them: pieces, scores, types, added tokens, [PADn] up to vocab_size."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(directory / "tokenizer.model"))
    except (OSError, RuntimeError) as e:
        raise ConvertError(f"tokenizer.model cannot be read ({e})") from None
    n_sp = sp.vocab_size()
    if n_sp > vocab_size:
        raise ConvertError(f"tokenizer.model has {n_sp} pieces, more than the model's vocab_size {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size
    for i in range(n_sp):
        tokens[i], scores[i] = sp.IdToPiece(i), float(sp.GetScore(i))
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                    else BYTE if sp.IsByte(i) else NORMAL)
    added = read_json(directory / "added_tokens.json")
    decoder = tc.get("added_tokens_decoder") or {}
    entries = [(tid, text, False) for text, tid in added.items()]
    entries += [(int(tid), d.get("content"), bool(d.get("special")))
                for tid, d in decoder.items() if isinstance(d, dict) and str(tid).isdigit()]
    for tid, text, special in entries:
        if not isinstance(tid, int) or not 0 <= tid < vocab_size or not isinstance(text, str) or not text:
            raise ConvertError(f"added token {text!r} has id {tid!r}, outside the vocabulary of {vocab_size}")
        tokens[tid], scores[tid], types[tid] = text, -1000.0, CONTROL if special else USER_DEFINED
    if len(set(tokens)) != len(tokens):
        raise ConvertError("tokenizer.model and its added tokens name the same token twice")
    index = {t: i for i, t in enumerate(tokens)}
    bos, eos = _special_ids(index.get, vocab_size, tc, gen, cfg)
    if bos is None and sp.bos_id() >= 0:
        bos = sp.bos_id()
    if eos is None and sp.eos_id() >= 0:
        eos = sp.eos_id()
    # SentencePiece's add_dummy_prefix, read from behaviour (no protobuf needed): a leading "▁" on plain text.
    pieces = sp.EncodeAsPieces("a")
    add_bos, add_eos = tc.get("add_bos_token"), tc.get("add_eos_token")
    return {
        "model": "llama",
        "pre": "default",
        "tokens": tokens,
        "scores": scores,
        "token_type": types,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "unk_token_id": sp.unk_id() if sp.unk_id() >= 0 else None,
        "pad_token_id": cfg.get("pad_token_id") if isinstance(cfg.get("pad_token_id"), int) else None,
        "add_bos_token": add_bos if isinstance(add_bos, bool) else True,
        "add_eos_token": add_eos if isinstance(add_eos, bool) else False,
        "add_space_prefix": bool(pieces) and pieces[0].startswith("\u2581"),
        "_n": vocab_size,
    }


def read_tokenizer(directory: Path, cfg: dict, vocab_size: int) -> dict:
    """Tokenizer metadata for lmcli.tokenizer.Tokenizer.from_metadata: tokenizer.json as text with its special
    ids (a tiktoken ranks file becomes the tokenizer.json it equals), or (SentencePiece only) GGUF-style fields."""
    tc = read_json(directory / "tokenizer_config.json")
    gen = read_json(directory / "generation_config.json")
    if (directory / "tokenizer.json").is_file():
        tok = _hf_tokenizer(directory, tc, gen, cfg)
    elif (directory / RANKS_FILE).is_file():
        tok = _tiktoken_tokenizer(directory, tc, gen, cfg)
    elif (directory / "tokenizer.model").is_file():
        tok = _spm_tokenizer(directory, tc, gen, cfg, vocab_size)
    else:
        raise ConvertError(f"{directory.name} has no tokenizer (tokenizer.json, {RANKS_FILE} or tokenizer.model)")
    n = tok.pop("_n")
    if n > vocab_size:
        raise ConvertError(f"the tokenizer has {n} tokens, more than the model's vocab_size {vocab_size}")
    return tok


def read_chat_template(directory: Path) -> str | None:
    """tokenizer_config.json's chat_template (a string, or a list whose "default" entry is taken), else
    chat_template.jinja, else chat_template.json (gguf.SpecialVocab's order)."""
    template = read_json(directory / "tokenizer_config.json").get("chat_template")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None:
        template = read_json(directory / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise ConvertError("chat_template is neither a string nor a list of {name, template}")
    return template
