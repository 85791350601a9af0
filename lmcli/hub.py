"""`lmcli pull`: a Hugging Face repo -> a verified, resumable download, converted into the store shard by shard.

The order of a pull, each step recorded in <store>/<name>/.partial/state.json so that an interrupted pull resumes:
  1. model info at the requested revision: the commit every file is then fetched from, sizes, hashes;
  2. under the model's lock: the small files (config, tokenizer, index), each checked against its hash;
  3. each shard's safetensors header by HTTP Range requests, so the whole conversion is planned (and the
     container's header written, its file sized) before the first shard is downloaded;
  4. shard by shard: download, check its sha256 against the Hub's LFS hash, convert its tensors in place,
     checkpoint, delete it (unless --keep-source): peak disk is about the container plus one shard;
  5. publish: the container is renamed into place and the manifest written last.
A GGUF repo's file (every part of a split GGUF) has its header read by Range requests first, so that a file lmcli
cannot import (architecture, tensor types) is refused before any download; then it is downloaded and imported.
Downloads go through huggingface_hub (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE), into the store, never its cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from quant import jsonio
from quant.convert import QTYPES
from quant.hf_tensors import FILE_TYPES, MIXES
from quant.hf_tiktoken import FAMILIES as TIKTOKEN_FAMILIES, RANKS_FILE

from . import store
from .errors import LmcliError, ModelFileError, ModelNotFound, StoreError, UsageError
from .registry import load_registry

INDEX = "model.safetensors.index.json"
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja",
               "chat_template.json")
STATE_VERSION = 1
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_GGUF_HOSTS = ("hf.co/", "huggingface.co/")
_SPLIT_GGUF = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)  # llama.cpp's gguf-split part names
_HEADER_PROBE = 1 << 16  # first Range request for a safetensors header; most headers fit


class HubError(LmcliError):
    """The Hub cannot be reached, refuses access, or lacks what a pull needs."""


class IntegrityError(HubError):
    """A downloaded file does not match the size or hash the Hub publishes for it."""


@dataclass(frozen=True)
class Spec:
    """What to pull: a safetensors repo to convert (qtype) or a GGUF repo's file to import (gguf_tag)."""

    repo: str
    revision: str
    name: str  # the store name
    qtype: str | None = None
    mix: str = "uniform"  # quant.hf_tensors.MIXES
    gguf_tag: str | None = None
    registry: str | None = None
    packaged: str | None = None  # "module:file" of a GGUF an installed package ships (registry)
    text: str = ""  # as the user typed it (shown in the resume hint)


@dataclass(frozen=True)
class Remote:
    """One file of the repo at the pulled commit, as the Hub describes it."""

    name: str
    size: int
    sha256: str | None  # LFS files
    git_oid: str | None  # the git blob id (sha1): what a small, non-LFS file is checked against


# --- what to pull -------------------------------------------------------------------------------


def parse_spec(spec: str, *, name: str | None = None, revision: str | None = None,
               qtype: str | None = None, mix: str | None = None) -> Spec:
    """NAME (models.toml) | ORG/REPO[@REVISION] | hf.co/ORG/REPO:QUANT (a GGUF repo) -> Spec, validated."""
    text = spec.strip()
    low = text.lower()
    for prefix in ("https://", "http://"):
        if low.startswith(prefix):
            text, low = text[len(prefix):], low[len(prefix):]
    if qtype is not None and qtype not in QTYPES:
        raise UsageError(f"unknown --type {qtype!r}", hint=f"choose from {', '.join(QTYPES)}")
    if mix is not None and mix not in MIXES:
        raise UsageError(f"unknown --mix {mix!r}", hint=f"choose from {', '.join(MIXES)}")
    if qtype in FILE_TYPES and mix not in (None, "uniform"):
        raise UsageError(f"--mix {mix} does not combine with --type {qtype}: llama.cpp's file type chooses each "
                         "matrix's type itself")
    host = next((h for h in _GGUF_HOSTS if low.startswith(h)), None)
    if host is not None:
        repo, _, tag = text[len(host):].partition(":")
        _check_repo(repo, spec)
        if not tag:
            raise UsageError(f"{spec}: name the quantization to pull, e.g. hf.co/{repo}:Q4_0")
        if qtype is not None or mix is not None:
            raise UsageError(f"{'--type' if qtype is not None else '--mix'} does not apply to a GGUF repo: its file "
                             "is imported as it is quantized")
        return Spec(repo, revision or "main", _store_name(name, f"{repo}:{tag.upper()}"), gguf_tag=tag, text=spec)
    if "/" in text:
        repo, _, rev = text.partition("@")
        _check_repo(repo, spec)
        if rev and revision and rev != revision:
            raise UsageError(f"{spec} pins revision {rev!r} but --revision says {revision!r}")
        return Spec(repo, revision or rev or "main", _store_name(name, repo), qtype=qtype or "q4_0",
                    mix=mix or "uniform", text=spec)
    entry = load_registry().get(text)
    if entry is None:
        known = ", ".join(sorted(load_registry()))
        raise ModelNotFound(f"unknown model {spec!r}", hint=f"known names: {known}; or give ORG/REPO")
    return Spec(entry.repo, revision or entry.revision, _store_name(name, entry.name), qtype=qtype or entry.quant,
                mix=mix or "uniform", registry=entry.name,
                packaged=entry.packaged if revision is None and qtype is None and mix is None else None, text=spec)


def _check_repo(repo: str, spec: str) -> None:
    if not _REPO_RE.match(repo) or ".." in repo or "--" in repo:
        raise UsageError(f"{spec!r} is not a Hugging Face repo id",
                         hint="write ORG/REPO, e.g. allenai/OLMoE-1B-7B-0125-Instruct")


def _store_name(given: str | None, default: str) -> str:
    try:
        return store.validate_name(given if given is not None else default)
    except StoreError:
        if given is not None:
            raise
        raise UsageError(f"{default!r} cannot be a store name", hint="choose one with --name") from None


# --- the pull -----------------------------------------------------------------------------------


def pull(spec: str, *, name: str | None = None, revision: str | None = None, qtype: str | None = None,
         keep_source: bool = False, force: bool = False, ui=None, mix: str | None = None) -> Path:
    """Download `spec` from the Hub and convert (or import) it into the store -> the container's path.

    ui: where progress goes, as the caller chooses (the CLI: lmcli.pull_ui.PullProgress on a terminal); None
    shows nothing. Ctrl+C leaves the store as it was, with the pull resumable.
    """
    s = parse_spec(spec, name=name, revision=revision, qtype=qtype, mix=mix)
    ui = ui if ui is not None else _Quiet()
    try:
        with _quiet_hub():
            return _translated(lambda: _packaged(s, force) or _pull(s, keep_source=keep_source, force=force, ui=ui), s)
    finally:
        ui.close()


def _packaged(s: Spec, force: bool) -> Path | None:
    """A registry model that an installed package ships as a GGUF: imported, no download (None: not installed)."""
    if s.packaged is None:
        return None
    try:
        src = store.packaged_file(s.packaged)
    except ModelNotFound:
        return None
    source = {"registry": s.registry, "repo": s.repo}
    if force:
        return store.import_gguf_file(src, s.name, force=True, source=source)
    return store.cached_import(src, s.name, source=source)  # both take the model's lock


def _pull(s: Spec, *, keep_source: bool, force: bool, ui) -> Path:
    from huggingface_hub import constants

    d = store.model_dir(s.name)
    if constants.is_offline_mode():
        if store.in_store(s.name) and not force:
            return d / store.CONTAINER
        raise HubError(f"HF_HUB_OFFLINE is set and {s.name!r} is not in the store",
                       hint="unset HF_HUB_OFFLINE to download it")
    commit, files = _repo_info(s)
    kind = "gguf" if s.gguf_tag else "hf"
    gguf = _pick_gguf(files, s) if kind == "gguf" else None
    if gguf is not None:
        _check_gguf(s, commit, [files[f] for f in gguf], [f for f in files if f.lower().endswith(".gguf")], ui)
    ident = {"kind": kind, "repo": s.repo, "commit": commit, "qtype": s.qtype, "file": gguf and gguf[0]}
    if s.mix != "uniform":  # (absent from a uniform pull's record, as before mixes existed)
        ident["mix"] = s.mix
    with store.lock_model(s.name, on_wait=lambda: ui.note(f"waiting for another pull of {s.name} to finish")) as d:
        man = store.read_manifest(s.name)
        if man is not None and (d / store.CONTAINER).is_file() and not force:
            src = man.get("source") or {}
            if {k: src.get(k) for k in ident} == ident and src.get("mix", "uniform") == s.mix:
                return d / store.CONTAINER  # already pulled from this very commit
            was = (f"{src.get('repo')}@{str(src.get('commit'))[:12]}, {src.get('qtype') or src.get('file')}"
                   if src.get("repo") else "elsewhere")
            raise StoreError(f"model {s.name!r} already exists in the store (from {was})",
                             hint="pass --force to replace it, or --name to pull under another name")
        staging = d / store.PARTIAL
        state: dict = {}
        try:
            state = _load_state(staging, ident, s)
            if kind == "gguf":
                return _pull_gguf(s, commit, [files[f] for f in gguf], d, staging, state, keep_source, ui)
            return _pull_hf(s, commit, files, d, staging, state, keep_source, ui)
        except BaseException:
            _forget_if_empty(d, staging, state)
            raise


def resume_command(name: str) -> str:
    """The command that resumes an interrupted pull of `name`, from the pull's own state (this module's format)."""
    try:
        spec = jsonio.loads((store.model_dir(name) / store.PARTIAL / "state.json").read_text(encoding="utf-8"))["spec"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return f"lmcli pull {name}"
    return f"lmcli pull {spec}" + ("" if spec == name else f" --name {name}")


def _translated(fn: Callable[[], Path], s: Spec) -> Path:
    """Run fn, turning huggingface_hub's, the converter's and the file system's errors into lmcli's."""
    import httpx2
    from huggingface_hub import errors as hf

    from .errors import model_file_errors

    where = f"{s.repo}@{s.revision}"
    resume = "run the same command again to resume"
    try:
        with model_file_errors():
            return fn()
    except LmcliError:
        raise
    except hf.GatedRepoError:
        raise HubError(f"{s.repo} is gated: its files need an accepted license and a token",
                       hint="accept the terms on the repo's Hub page, then set HF_TOKEN to a token with "
                            "access") from None
    except hf.RevisionNotFoundError:
        raise ModelNotFound(f"revision {s.revision!r} of {s.repo} does not exist",
                            hint="give a branch, tag or commit of the repo with --revision") from None
    except hf.RemoteEntryNotFoundError as e:
        raise HubError(f"a file of {where} is missing on the Hub: {_first_line(e)}") from None
    except hf.RepositoryNotFoundError:
        raise ModelNotFound(f"{s.repo} was not found on the Hub",
                            hint="check the name; a private repo needs HF_TOKEN") from None
    except hf.OfflineModeIsEnabled:
        raise HubError("HF_HUB_OFFLINE is set: the Hub cannot be reached", hint="unset HF_HUB_OFFLINE") from None
    except hf.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "an error"
        if status == 404:  # a server (a mirror, a proxy) that does not say which of repo, revision or file is missing
            raise ModelNotFound(f"the Hub at {_endpoint()} has no {where} (or no file of it that the pull needs): "
                                "it does not exist, or it is private or gated",
                                hint="check the name; a private or gated repo needs HF_TOKEN set to a token with "
                                     "access") from None
        hint = "set HF_TOKEN to a token with access to the repo" if status in (401, 403) else resume
        raise HubError(f"the Hub answered {status} for {where}", hint=hint) from None
    except (httpx2.HTTPError, hf.LocalEntryNotFoundError, hf.FileMetadataError) as e:
        raise HubError(f"cannot reach the Hub at {_endpoint()} for {where}: {_first_line(e.__cause__ or e)}",
                       hint=f"check the network; {resume}") from None
    except OSError as e:
        if e.errno is None and "Consistency check failed" in str(e):
            raise HubError(f"a download from {where} ended early", hint=resume) from None
        raise store.disk_error(e, store.models_dir()) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines() or [type(e).__name__])[0] if text else type(e).__name__


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _repo_info(s: Spec) -> tuple[str, dict[str, Remote]]:
    """The commit `s.revision` resolves to, and every file of the repo there with its size and hashes."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(s.repo, revision=s.revision, files_metadata=True)
    commit = info.sha
    if not isinstance(commit, str) or not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise HubError(f"the Hub gave no commit for {s.repo}@{s.revision}")
    files = {}
    for sib in info.siblings or []:
        lfs = sib.lfs
        files[sib.rfilename] = Remote(sib.rfilename, int(lfs.size if lfs else sib.size or 0),
                                      lfs.sha256 if lfs else None, sib.blob_id)
    return commit, files


# --- checkpoint -----------------------------------------------------------------------------------


def _load_state(staging: Path, ident: dict, s: Spec) -> dict:
    """The unfinished pull's checkpoint if it is of this very source; else a fresh one (and a clean staging)."""
    try:
        state = jsonio.loads((staging / "state.json").read_text(encoding="utf-8"))
        if state.get("version") == STATE_VERSION and state.get("ident") == ident:
            return state
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        pass
    if staging.exists():
        shutil.rmtree(staging)  # another commit, type or file: nothing in it can be reused safely
    staging.mkdir(parents=True)
    state = {"version": STATE_VERSION, "ident": ident, "spec": s.text, "verified": {}, "converted": []}
    _save_state(staging, state)
    return state


def _save_state(staging: Path, state: dict) -> None:
    store.write_json_atomic(staging / "state.json", state)


def _forget_if_empty(d: Path, staging: Path, state: dict) -> None:
    """After a failure: keep a checkpoint with progress (the next pull resumes); remove one without any, and the
    model directory if that leaves it empty, so the store is as it was."""
    if state.get("converted") or any((staging / "source" / f).is_file() for f in state.get("verified", {})
                                     if f.endswith((".safetensors", ".gguf"))):
        return
    shutil.rmtree(staging, ignore_errors=True)
    if not (d / store.MANIFEST).exists():
        store.remove_if_empty(d)


# --- downloads ------------------------------------------------------------------------------------


def _download(s: Spec, commit: str, remote: Remote, src: Path, ui) -> Path:
    """One file into src (huggingface_hub's local_dir mode: plain files; a cut connection is retried with a
    Range request, a failed download leaves nothing behind)."""
    from huggingface_hub import hf_hub_download

    if (src / remote.name).is_file() and (src / remote.name).stat().st_size != remote.size:
        (src / remote.name).unlink()
    return Path(hf_hub_download(s.repo, remote.name, revision=commit, local_dir=src,
                                tqdm_class=ui.bar_class(remote.name)))


def _verify(path: Path, remote: Remote, state: dict, staging: Path) -> str:
    """Check a downloaded file against the Hub's LFS sha256 (or, for a small file, its git blob id) -> sha256.

    huggingface_hub itself checks only the size. A mismatch removes the file: nothing unverified is ever used.
    """
    st = path.stat()
    seen = state["verified"].get(remote.name)
    if seen and seen.get("size") == st.st_size and seen.get("mtime_ns") == st.st_mtime_ns:
        return seen["sha256"]
    h256 = hashlib.sha256()
    h1 = hashlib.sha1(b"blob %d\0" % st.st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h256.update(chunk)
            h1.update(chunk)
    sha256 = h256.hexdigest()
    if st.st_size != remote.size:
        problem = f"{st.st_size} bytes, the Hub says {remote.size}"
    elif remote.sha256 is not None:
        problem = None if sha256 == remote.sha256 else f"sha256 {sha256[:16]}..., the Hub says {remote.sha256[:16]}..."
    elif remote.git_oid is not None:
        oid = h1.hexdigest()
        problem = None if oid == remote.git_oid else f"git blob {oid[:16]}..., the Hub says {remote.git_oid[:16]}..."
    else:
        problem = "the Hub publishes no hash for it"
    if problem is not None:
        path.unlink(missing_ok=True)
        (path.parent / ".cache" / "huggingface" / "download" / f"{remote.name}.metadata").unlink(missing_ok=True)
        raise IntegrityError(f"{remote.name} is corrupt ({problem}); nothing was published",
                             hint="run the same command again to download it anew")
    state["verified"][remote.name] = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    _save_state(staging, state)
    return sha256


def _fetch(s: Spec, commit: str, remote: Remote, src: Path, state: dict, staging: Path, ui) -> Path:
    path = _download(s, commit, remote, src, ui)
    _verify(path, remote, state, staging)
    return path


def _read_range(url: str, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a remote file by an HTTP Range request; a server that ignores Range is read up to
    stop and the connection dropped."""
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = {**build_hf_headers(), "Range": f"bytes={start}-{stop - 1}", "Accept-Encoding": "identity"}
    # the downloads' own timeout (HF_HUB_DOWNLOAD_TIMEOUT): a stalled server is an error, not a wait forever
    with get_session().stream("GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
        if r.status_code >= 400:
            r.read()
        hf_raise_for_status(r)
        skip = start if r.status_code == 200 else 0
        buf = bytearray()
        for chunk in r.iter_bytes():
            buf += chunk
            if len(buf) >= skip + stop - start:
                break
    return bytes(buf[skip:skip + stop - start])


def _headers(s: Spec, commit: str, shards: list[Remote], staging: Path) -> dict:
    """Every shard's validated safetensors header, read by Range requests (cached in the staging directory)."""
    from huggingface_hub import hf_hub_url

    from quant.safetensors_io import header_length, parse_header

    cache_path = staging / "headers.json"
    try:
        cache = jsonio.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        cache = {}

    def fetch(r: Remote) -> str:
        url = hf_hub_url(s.repo, r.name, revision=commit)
        head = _read_range(url, 0, min(_HEADER_PROBE, r.size))
        hlen = header_length(head, r.name, r.size)
        if 8 + hlen > len(head):
            head += _read_range(url, len(head), 8 + hlen)
        return head[8:8 + hlen].decode("latin-1")  # the bytes as they are, JSON-safe; parse_header decodes them

    missing = [r for r in shards if not isinstance(cache.get(r.name), str)]
    if missing:
        with ThreadPoolExecutor(max_workers=min(8, len(missing))) as pool:  # one round trip each: overlap them
            cache.update(zip((r.name for r in missing), pool.map(fetch, missing)))
        store.write_json_atomic(cache_path, cache)
    return {r.name: parse_header(cache[r.name].encode("latin-1"), r.name, r.size)[0] for r in shards}


# --- safetensors repos: converted shard by shard ----------------------------------------------------


def _hf_files(files: dict[str, Remote]) -> list[str]:
    """The small files a conversion reads (config, tokenizer, generation config, templates, the index)."""
    if "config.json" not in files:
        raise ModelFileError("the repo has no config.json: not a transformers model lmcli can convert")
    names = [f for f in SMALL_FILES if f in files]
    if "tokenizer.json" in files:
        names.append("tokenizer.json")
    elif RANKS_FILE in files:  # with the tokenizer class's source, read as text to check its pattern, never run
        names += [RANKS_FILE] + [f"{m}.py" for m in TIKTOKEN_FAMILIES if f"{m}.py" in files]
    elif "tokenizer.model" in files:
        names += [f for f in ("tokenizer.model", "added_tokens.json") if f in files]
    else:
        raise ModelFileError(f"the repo has no tokenizer (tokenizer.json, {RANKS_FILE} or tokenizer.model)")
    if INDEX in files:
        names.append(INDEX)
    return names


def _shards(files: dict[str, Remote], src: Path) -> tuple[list[Remote], dict[str, str] | None]:
    """The safetensors shards (those the index names, else model.safetensors or every top-level *.safetensors)."""
    weight_map = None
    if INDEX in files:
        try:
            weight_map = jsonio.loads((src / INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise ModelFileError(f"{INDEX} is not valid JSON with a weight_map") from None
        if (not isinstance(weight_map, dict) or not weight_map
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
            raise ModelFileError(f"{INDEX} has no weight_map of tensor names to files")
        names = sorted(set(weight_map.values()))
    elif "model.safetensors" in files:
        names = ["model.safetensors"]
    else:
        names = sorted(f for f in files if "/" not in f and f.endswith(".safetensors"))
    if not names:
        pickles = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth")))
        if pickles:
            raise ModelFileError(f"the repo has only PyTorch pickle weights ({', '.join(pickles[:3])}); "
                                 "lmcli reads safetensors only and never unpickles")
        raise ModelFileError("the repo has no *.safetensors weights")
    for n in names:
        if "/" in n or "\\" in n or n in (".", "..") or not n.endswith(".safetensors"):
            raise ModelFileError(f"{INDEX} names {n!r}, which is not a safetensors file at the repo's top level")
        if n not in files:
            raise ModelFileError(f"{INDEX} names {n}, which the repo does not have")
    return [files[n] for n in names], weight_map


def _pull_hf(s: Spec, commit: str, files: dict[str, Remote], d: Path, staging: Path, state: dict,
             keep_source: bool, ui) -> Path:
    from quant.convert import check_config, convert_shard, plan_shards, resumable, skipped_line, start_container

    src = staging / "source"
    src.mkdir(exist_ok=True)
    for f in _hf_files(files):
        _fetch(s, commit, files[f], src, state, staging, ui)
    check_config(src)  # refused before any shard is touched
    shards, weight_map = _shards(files, src)
    job = plan_shards(src, _headers(s, commit, shards, staging), weight_map, s.qtype,
                      {"repo": s.repo, "revision": commit}, mix=s.mix)
    if job.skipped:
        ui.note(skipped_line(job.skipped))
        # a shard holding nothing but the skipped layers is never downloaded
        shards = [r for r in shards if job.units[r.name] or r.name not in job.skipped["shards"]]
    part = staging / "model.lmc.part"
    if not (state["converted"] and part.is_file() and resumable(job, part)):
        state["converted"] = []
        _save_state(staging, state)
        start_container(job, part)
    todo = [r for r in shards if r.name not in state["converted"]]
    _check_space(staging, part, [r.size for r in todo if not (src / r.name).is_file()], keep_all=keep_source)
    done = ui.overall(f"pulling {s.name}", len(shards))
    for i, r in enumerate(shards):
        done(i)
        if r.name in state["converted"]:
            if not keep_source:
                _drop(src, r.name)
            elif not (src / r.name).is_file():  # deleted by an earlier run without --keep-source
                _fetch(s, commit, r, src, state, staging, ui)
            continue
        _fetch(s, commit, r, src, state, staging, ui)
        report = ui.converting(f"converting {r.name}", len(job.units[r.name]))
        convert_shard(job, part, src, r.name, progress=report)
        state["converted"].append(r.name)
        _save_state(staging, state)
        if not keep_source:
            _drop(src, r.name)
    done(len(shards))
    sources = {f: {k: v[k] for k in ("size", "sha256")} for f, v in state["verified"].items()}
    manifest = {
        "source": {**state["ident"], "revision": s.revision, "registry": s.registry, "files": sources},
        "arch": job.metadata["config"]["arch"],
        "quant": s.qtype,
        "source_size": sum(v["size"] for v in sources.values()),
        "kept_source": "source" if keep_source else None,
        "created": store.now(),
    }
    return _publish(s, d, staging, part, manifest, keep_source)


def _drop(src: Path, name: str) -> None:
    """Delete a converted shard (and huggingface_hub's note about it)."""
    (src / name).unlink(missing_ok=True)
    (src / ".cache" / "huggingface" / "download" / f"{name}.metadata").unlink(missing_ok=True)


def _check_space(staging: Path, part: Path | None, downloads: list[int], *, keep_all: bool = False,
                 extra: int = 0) -> None:
    """Refuse early, before anything large is downloaded, when the disk cannot hold the rest of the pull: the
    container's unwritten bytes plus the largest shard still to download (all of them if they are kept)."""
    unwritten = 0
    if part is not None and part.is_file():
        st = part.stat()
        unwritten = max(0, st.st_size - st.st_blocks * 512)
    need = unwritten + (sum(downloads) if keep_all else max(downloads, default=0)) + extra
    free = shutil.disk_usage(staging).free
    if need > free:
        raise StoreError(f"not enough disk space in {store.home()}: the pull needs about {_human(need)} more, "
                         f"{_human(free)} is free",
                         hint="free some space (or set LMCLI_HOME to a larger disk) and run the same command again")


def _human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _publish(s: Spec, d: Path, staging: Path, part: Path, manifest: dict, keep_source: bool) -> Path:
    out = store.publish(s.name, part, manifest)
    if keep_source:
        shutil.rmtree(d / "source", ignore_errors=True)
        os.replace(staging / "source", d / "source")
    shutil.rmtree(staging, ignore_errors=True)
    return out


# --- GGUF repos: one file, imported -----------------------------------------------------------------


def _pick_gguf(files: dict[str, Remote], s: Spec) -> list[str]:
    """The repo's GGUF file for the quant tag -> its name, or the names of its parts in order (a split GGUF,
    PREFIX-00001-of-0000N.gguf). The tag is matched in the file name (case-insensitive), between separators if
    several files merely contain it."""
    tag = s.gguf_tag.lower()
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower())
    models: dict[str, list[str]] = {}  # a model's name (a split one's without its part suffix) -> its files
    for f in ggufs:
        if tag in f.rsplit("/", 1)[-1].lower():
            models.setdefault(_SPLIT_GGUF.sub(".gguf", f), []).append(f)
    found = sorted(models)
    if len(found) > 1:
        exact = [f for f in found if re.search(rf"(^|[-._/]){re.escape(tag)}([-._]|$)", f.lower()[:-5])]
        found = exact or found
    if not found:
        have = ", ".join(f.rsplit("/", 1)[-1] for f in ggufs) or "none"
        raise ModelNotFound(f"{s.repo} has no GGUF file for {s.gguf_tag!r}", hint=f"its GGUF files: {have}")
    if len(found) > 1:
        raise UsageError(f"{s.gguf_tag!r} matches several files of {s.repo}: {', '.join(found)}",
                         hint="give a longer quant tag")
    parts = sorted(models[found[0]])
    m = _SPLIT_GGUF.search(parts[0])
    if m is None:
        return parts[:1]
    count = int(m[2])
    want = [_SPLIT_GGUF.sub(f"-{i:05d}-of-{count:05d}.gguf", parts[0]) for i in range(1, count + 1)]
    missing = [w.rsplit("/", 1)[-1] for w in want if w not in files]
    if missing:
        raise ModelFileError(f"{s.repo} has only {count - len(missing)} of the {count} parts of "
                             f"{found[0].rsplit('/', 1)[-1]}: {', '.join(missing[:3])} missing")
    return want


def _check_gguf(s: Spec, commit: str, parts: list[Remote], ggufs: list[str], ui) -> None:
    """Read the GGUF's header (every part's, for a split GGUF) by HTTP Range requests and refuse, before any
    download, a file lmcli cannot import: its architecture, or every tensor type it cannot read, with a count."""
    from huggingface_hub import hf_hub_url

    from quant.errors import GGUFError
    from quant.gguf_header import read_remote_header
    from quant.gguf_io import census_text, check_headers, type_census

    def header(r: Remote):
        url = hf_hub_url(s.repo, r.name, revision=commit)
        return read_remote_header(lambda a, b: _read_range(url, a, b), r.size, f"{s.repo}/{r.name}")

    try:
        with ThreadPoolExecutor(max_workers=min(8, len(parts))) as pool:
            heads = list(pool.map(header, parts))
        check_headers(heads, [r.name.rsplit("/", 1)[-1] for r in parts], f"{s.repo}/{parts[0].name}")
    except GGUFError as e:
        others = [f.rsplit("/", 1)[-1] for f in ggufs if f not in {r.name for r in parts}]
        hint = (f"pull another of the repo's GGUF files ({', '.join(others[:6])}{', ...' if len(others) > 6 else ''})"
                if others else "this repo has no other GGUF file")
        raise ModelFileError(str(e), hint=f"{hint}, or pull the original safetensors repo (`lmcli pull ORG/REPO`) "
                                          "for lmcli to quantize; nothing was downloaded") from None
    census = type_census(t.ggml_type for h in heads for t in h.tensors)
    ui.note(f"{parts[0].name.rsplit('/', 1)[-1]}: {heads[0].values.get('general.architecture')}, "
            f"{_human(sum(r.size for r in parts))}{f' in {len(parts)} parts' if len(parts) > 1 else ''}, "
            f"{sum(census.values())} tensors ({census_text(census)})")


def _pull_gguf(s: Spec, commit: str, parts: list[Remote], d: Path, staging: Path, state: dict, keep_source: bool,
               ui) -> Path:
    """Download the GGUF (every part of a split one; each resumes and is verified on its own) and import it."""
    from quant.gguf_io import import_gguf

    src = staging / "source"
    src.mkdir(exist_ok=True)
    todo = [r.size for r in parts if not (src / r.name).is_file()]
    if todo:
        # The container is a lossless repack: about the GGUF's size again.
        _check_space(staging, None, todo, keep_all=True, extra=sum(r.size for r in parts))
    paths = [_fetch(s, commit, r, src, state, staging, ui) for r in parts]
    part = staging / "model.lmc.part"
    import_gguf(paths[0], part, overwrite=True, source={"repo": s.repo, "revision": commit, "file": parts[0].name})
    files = {r.name: {"size": r.size, "sha256": state["verified"][r.name]["sha256"]} for r in parts}
    manifest = {
        "source": {**state["ident"], "revision": s.revision, "files": files},
        "quant": s.gguf_tag,
        "source_size": sum(r.size for r in parts),
        "kept_source": "source" if keep_source else None,
        "created": store.now(),
    }
    return _publish(s, d, staging, part, manifest, keep_source)


# --- output ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub logs retries and warnings on stderr; a pull reports through lmcli's errors and progress."""
    import huggingface_hub.utils.logging  # noqa: F401  (configures the library's logger first: then quieten it)

    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


class _NullBar:
    """A progress bar huggingface_hub may drive (its tqdm_class protocol) that shows nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class _Quiet:
    """No progress (stderr is not a terminal)."""

    def bar_class(self, label: str) -> type:
        return _NullBar

    def converting(self, label: str, total: int) -> Callable[[int, int], None] | None:
        return None

    def overall(self, label: str, total: int) -> Callable[[int], None]:
        return lambda done: None

    def note(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass
