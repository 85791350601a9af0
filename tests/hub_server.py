"""A fake Hugging Face Hub on 127.0.0.1 that the real huggingface_hub client talks to through HF_ENDPOINT.

It speaks what a download needs, as huggingface_hub 2.4 requests it (hf_api.model_info, file_download.
get_hf_file_metadata and http_get):
  GET  /api/models/{repo}[/revision/{rev}][?blobs=true]  -> {id, sha, gated, siblings: [{rfilename, size, blobId,
                                                            lfs: {sha256, size, pointerSize}}]}
  HEAD|GET /{repo}/resolve/{rev}/{file}  -> a small file: 200 with ETag (its git blob id), X-Repo-Commit;
                                            an LFS file: 302 to the "CDN" with X-Linked-Etag (sha256), X-Linked-Size
  HEAD|GET /cdn/{sha256}                 -> the bytes, with Range (206 and Content-Range)
Errors carry the Hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo). The CDN is named
"localhost" and the Hub "127.0.0.1", two origins as on the real Hub, so the client does not follow the LFS
redirect on HEAD and does not send its token to the CDN.

Faults (Faults, set between requests): a connection cut after some bytes of a file, then either a resumable
server or one that fails the file's later requests; a server that ignores Range; same-size corrupted bytes;
holding a file's download until the test releases it; errors without the Hub's error headers (a mirror or a
proxy); a listed file that is gone. Every request is logged, with the body bytes sent.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf")


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str
    branches: dict[str, str]
    gated: bool = False
    token: str | None = None  # the token that opens a gated repo


@dataclass
class Faults:
    cut: dict[str, int] = field(default_factory=dict)  # file -> bytes sent before the connection is cut (once)
    fail_after_cut: bool = False  # after the cut, that file answers 503 until cleared
    failing: set[str] = field(default_factory=set)
    ignore_range: bool = False
    corrupt: set[str] = field(default_factory=set)  # files served with one byte flipped (same size)
    hold: dict[str, threading.Event] = field(default_factory=dict)  # file -> set by the test to let it go
    arrived: dict[str, threading.Event] = field(default_factory=dict)  # set when a held file's GET arrives
    stall_range: set[str] = field(default_factory=set)  # files whose Range GETs send nothing for 30 s
    bare_errors: bool = False  # errors without X-Error-Code / X-Error-Message, as a mirror or a proxy answers
    gone: set[str] = field(default_factory=set)  # files listed by the API whose resolve answers 404


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """The server and its repos: add_repo(), then point HF_ENDPOINT at .url."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, tuple[str, bytes]] = {}  # sha256 -> (file name, bytes)
        self.faults = Faults()
        self.log: list[dict] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cdn = f"http://localhost:{self.port}/cdn"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> "FakeHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        for ev in self.faults.hold.values():
            ev.set()
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, source: Path | dict[str, bytes], *, gated: bool = False,
                 token: str | None = None, branch: str = "main") -> str:
        """Serve a directory (or {name: bytes}) as repo_id's `branch`; returns the commit sha."""
        files = source if isinstance(source, dict) else {p.name: p.read_bytes() for p in sorted(source.iterdir())
                                                          if p.is_file()}
        commit = hashlib.sha1(repo_id.encode() + b"".join(hashlib.sha256(files[n]).digest()
                                                           for n in sorted(files))).hexdigest()
        for name, data in files.items():
            if name.endswith(LFS_SUFFIXES):
                self.blobs[hashlib.sha256(data).hexdigest()] = (name, data)
        self.repos[repo_id] = Repo(files, commit, {branch: commit}, gated, token)
        return commit

    def requests(self, name: str, *, method: str = "GET", cdn: bool = True) -> list[dict]:
        """Logged requests for a file (by default: the body downloads from the CDN)."""
        with self._lock:
            return [r for r in self.log if r["file"] == name and r["method"] == method and r["cdn"] == cdn]

    def sent(self, name: str) -> int:
        """Body bytes of a file sent from the CDN (all requests)."""
        return sum(r["sent"] for r in self.requests(name))

    def downloads(self, name: str) -> int:
        """Whole-file downloads of a file (a GET without Range; a header probe or a resume has one)."""
        return sum(1 for r in self.requests(name) if r["range"] is None)

    def hold(self, name: str) -> tuple[threading.Event, threading.Event]:
        """Hold the next download of `name` -> (arrived, release)."""
        arrived, release = threading.Event(), threading.Event()
        self.faults.arrived[name], self.faults.hold[name] = arrived, release
        return arrived, release


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._route(head=True)

        def do_GET(self):
            self._route(head=False)

        # --- routing ---------------------------------------------------------------------------

        def _route(self, head: bool):
            parts = urlsplit(self.path)
            path, query = unquote(parts.path), parse_qs(parts.query)
            entry = {"method": self.command, "path": path, "range": self.headers.get("Range"), "file": None,
                     "cdn": path.startswith("/cdn/"), "auth": self.headers.get("Authorization"), "sent": 0}
            self._entry = entry
            with hub._lock:
                hub.log.append(entry)
            if path.startswith("/api/models/"):
                return self._api(path[len("/api/models/"):], query)
            if path.startswith("/cdn/"):
                blob = hub.blobs.get(path[len("/cdn/"):])
                if blob is None:
                    return self._error(404, "EntryNotFound")
                entry["file"] = blob[0]
                return self._send_file(blob[0], blob[1], head)
            segs = path.strip("/").split("/")
            if len(segs) >= 5 and segs[2] == "resolve":
                entry["file"] = "/".join(segs[4:])
                return self._resolve("/".join(segs[:2]), segs[3], entry["file"], head)
            self._error(404, None)

        def _repo(self, repo_id: str, rev: str | None):
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None, None
            commit = repo.branches.get(rev or "main") or (rev if rev == repo.commit else None)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return None, None
            return repo, commit

        def _api(self, rest: str, query: dict):
            repo_id, _, rev = rest.partition("/revision/")
            repo, commit = self._repo(repo_id, rev or None)
            if repo is None:
                return
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for name, data in sorted(repo.files.items()):
                sib = {"rfilename": name}
                if blobs:
                    sib.update(size=len(data), blobId=git_oid(data))
                    if name.endswith(LFS_SUFFIXES):
                        sib["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                      "pointerSize": 134}
                siblings.append(sib)
            body = {"_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": commit,
                    "lastModified": "2025-01-01T00:00:00.000Z", "private": False,
                    "gated": "manual" if repo.gated else False, "disabled": False, "tags": [], "siblings": siblings}
            self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

        def _resolve(self, repo_id: str, rev: str, name: str, head: bool):
            repo, commit = self._repo(repo_id, rev)
            if repo is None:
                return
            if repo.gated and self.headers.get("Authorization") != f"Bearer {repo.token}":
                return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have "
                                   "access to it and be authenticated to access it. Please log in.")
            data = repo.files.get(name)
            if data is None or name in hub.faults.gone:
                return self._error(404, "EntryNotFound", f"{name} does not exist", commit)
            headers = {"X-Repo-Commit": commit}
            if name.endswith(LFS_SUFFIXES):
                sha = hashlib.sha256(data).hexdigest()
                headers.update({"Location": f"{hub.cdn}/{sha}", "X-Linked-Etag": f'"{sha}"',
                                "X-Linked-Size": str(len(data)), "ETag": f'"{git_oid(data)}"'})
                return self._send(302, b"", headers, head=head)
            headers["ETag"] = f'"{git_oid(data)}"'
            self._send_file(name, data, head, headers)

        # --- bodies ----------------------------------------------------------------------------

        def _send_file(self, name: str, data: bytes, head: bool, headers: dict | None = None):
            f = hub.faults
            headers = dict(headers or {})
            rng = self.headers.get("Range")
            whole = not head and rng is None  # a download, not a header probe or a resume
            if not head and name in f.failing:
                return self._error(503, None, "Service Unavailable")
            if rng is not None and not head and name in f.stall_range:
                time.sleep(30)  # a stalled connection: the client must give up on its own
                return self._error(503, None, "Service Unavailable")
            if whole and name in f.hold:
                f.arrived[name].set()
                f.hold[name].wait(30)
                del f.hold[name]
            if name in f.corrupt:
                mid = len(data) - 1  # the last byte: tensor data, so the header still parses
                data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]
            start, end, status = 0, len(data), 200
            if rng and not f.ignore_range and rng.startswith("bytes="):
                a, _, b = rng[len("bytes="):].partition("-")
                start, end = int(a), min(len(data), int(b) + 1 if b else len(data))
                if start >= len(data):
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            headers.setdefault("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            headers["Accept-Ranges"] = "bytes"
            body = data[start:end]
            cut = f.cut.pop(name, None) if whole else None
            if cut is not None:
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self._entry["sent"] += len(body[:cut])
                if f.fail_after_cut:
                    f.failing.add(name)
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self._send(status, body, headers, head=head)

        def _send(self, status: int, body: bytes, headers: dict, head: bool = False):
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head and body:
                try:
                    self.wfile.write(body)
                    self._entry["sent"] += len(body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

        def _error(self, status: int, code: str | None, message: str = "", commit: str | None = None):
            headers = {"Content-Type": "application/json"}
            if hub.faults.bare_errors:
                code = message = None
            if code:
                headers["X-Error-Code"] = code
            if message:
                headers["X-Error-Message"] = message
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, json.dumps({"error": message or code or "error"}).encode(), headers,
                       head=self.command == "HEAD")

    return Handler
