"""The registry: short model names -> source (models.toml), validated when loaded."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources

from .errors import LmcliError

NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")  # \Z: "$" would admit a final newline
_FIELDS = {"repo", "revision", "arch", "quant", "notes", "packaged", "defaults", "config"}
SAMPLING_KEYS = {"temp": float, "top_k": int, "top_p": float, "min_p": float, "repeat_penalty": float}


@dataclass(frozen=True)
class Entry:
    name: str
    repo: str
    revision: str
    arch: str
    quant: str
    notes: str = ""
    packaged: str | None = None  # "module:file" of a GGUF shipped in an installed package
    defaults: dict | None = None  # sampling defaults (SAMPLING_KEYS), overridden by flags
    config: dict | None = None  # config.json's keys that size the model, for `plan` before a download


def parse(text: str) -> dict[str, Entry]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise LmcliError(f"models.toml is malformed: {e}") from None
    out = {}
    for name, d in data.items():
        if not NAME_RE.match(name) or ".." in name:
            raise LmcliError(f"models.toml: bad model name {name!r}")
        if not isinstance(d, dict) or set(d) - _FIELDS or not {"repo", "revision", "arch", "quant"} <= set(d):
            raise LmcliError(f"models.toml: entry {name!r} must have repo, revision, arch, quant (and only {sorted(_FIELDS)})")
        if not all(isinstance(v, str) for k, v in d.items() if k not in ("defaults", "config")):
            raise LmcliError(f"models.toml: entry {name!r} has a non-string field")
        dflt = d.get("defaults", {})
        if not isinstance(dflt, dict) or any(k not in SAMPLING_KEYS or isinstance(v, bool)
                                             or not isinstance(v, (int, float)) for k, v in dflt.items()):
            raise LmcliError(f"models.toml: entry {name!r} has bad sampling defaults (known: {sorted(SAMPLING_KEYS)})")
        cfg = d.get("config", {})
        if not isinstance(cfg, dict) or "model_type" in cfg or not all(
                isinstance(v, (int, float, bool, str)) for v in cfg.values()):
            raise LmcliError(f"models.toml: entry {name!r}: config must be a table of config.json's plain values "
                             "(its model_type is the entry's arch)")
        if d.get("packaged") is not None and ":" not in d["packaged"]:
            raise LmcliError(f"models.toml: entry {name!r}: packaged must be 'module:file'")
        out[name] = Entry(name=name, **d)
    return out


def load_registry() -> dict[str, Entry]:
    return parse(resources.files("lmcli").joinpath("models.toml").read_text(encoding="utf-8"))
