"""A fake Hugging Face hub on 127.0.0.1 for tests: the hub's URLs, redirects and headers, served from memory.

    with FakeHub() as hub:                      # hub.url == "http://127.0.0.1:PORT"; set HF_ENDPOINT to it
        hub.add_file("org/name", "model.safetensors", data)
        hub.fail_next("/cdn/", "drop")          # the next download of a blob breaks off halfway
        ... hub.requests                        # [(method, path), ...] of every request, to assert on

What it mimics: GET/HEAD {/datasets}/{repo}/resolve/{rev}/{file}: LFS files (>= 1 MB, .safetensors, .parquet)
answer 302 to http://localhost:PORT/cdn/<sha256> (another host name, as the hub's CDN is) with X-Repo-Commit,
X-Linked-Etag and X-Linked-Size; small files answer 200 with ETag = git blob sha1. /cdn/ honours Range. 404s carry
X-Error-Code. /api/{models,datasets}/{repo}/tree/{rev} lists files a page at a time, with a Link: rel="next"
header. Good enough for huggingface_hub itself to download from it. Stdlib only.
"""
import hashlib
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


class FakeHub:
    def __init__(self, page_size=50):
        self.page_size = page_size  # tree listing entries per page
        self.token = None  # when set, resolve and api requests need "Authorization: Bearer <token>" (a gated repo)
        self.requests = []  # (method, path) of every request, in order
        self.headers = []  # each request's headers as a dict, parallel to self.requests
        self._repos = {}  # (repo_type, repo_id) -> {"refs": {revision: commit}, "commits": {commit: {file: entry}}}
        self._blobs = {}  # sha256 -> bytes, what /cdn/ serves
        self._failures = []  # [path_substring, mode], each used once
        self._lock = threading.Lock()  # handler threads read what the test thread writes
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        # The real CDN is another host; "localhost" is one too (to clients deciding where a token may go).
        self.cdn_url = f"http://localhost:{self._server.server_address[1]}/cdn"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def commit(self, repo_id, revision="main", repo_type="model"):
        """The fake 40-hex commit sha that revision points at."""
        return self._repos[(repo_type, repo_id)]["refs"][revision]

    def add_file(self, repo_id, filename, data, revision="main", repo_type="model", lfs=None):
        """Put data at filename in the repo's revision (a branch or tag name). lfs=None: LFS-style when >= 1 MB
        or a .safetensors/.parquet file, as git-lfs rules on the hub usually make them."""
        if lfs is None:
            lfs = len(data) >= 1 << 20 or filename.endswith((".safetensors", ".parquet"))
        data = bytes(data)
        # Like the hub: LFS files are known by the sha256 of their content, others by their git blob sha1.
        etag = hashlib.sha256(data).hexdigest() if lfs else \
            hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        with self._lock:
            repo = self._repos.setdefault((repo_type, repo_id), {"refs": {}, "commits": {}})
            fake_commit = hashlib.sha1(f"{repo_type}/{repo_id}@{revision}".encode()).hexdigest()
            commit = repo["refs"].setdefault(revision, fake_commit)
            repo["commits"].setdefault(commit, {})[filename] = (data, etag, lfs)
            if lfs:
                self._blobs[etag] = data

    def add_dir(self, repo_id, local_dir, revision="main", repo_type="model"):
        """Every file under local_dir, at its relative path."""
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file():
                self.add_file(repo_id, path.relative_to(local_dir).as_posix(), path.read_bytes(), revision, repo_type)

    def fail_next(self, path_substring, mode):
        """The next request whose path contains path_substring fails once: "drop" (GET: half the body, then the
        connection closes), "corrupt" (GET: one byte flipped) or "status:NNN" (any method: that HTTP status)."""
        if mode not in ("drop", "corrupt") and not re.fullmatch(r"status:\d{3}", mode):
            raise ValueError(f"fail_next mode {mode!r}: expected 'drop', 'corrupt' or 'status:NNN'")
        with self._lock:
            self._failures.append([path_substring, mode])

    # -- request handling (runs on the server's threads) ----------------------------------------------------

    def _serve(self, h, head):
        with self._lock:
            self.requests.append((h.command, h.path))
            self.headers.append(dict(h.headers))
            failure = next((f for f in self._failures
                            if f[0] in h.path and (f[1].startswith("status:") or not head)), None)
            if failure:
                self._failures.remove(failure)
        mode = failure[1] if failure else None
        if mode and mode.startswith("status:"):
            return _send(h, int(mode[7:]), head, {"X-Error-Message": "injected failure"})
        url = urlsplit(h.path)
        parts = url.path.strip("/").split("/")  # split before unquoting: a revision may hold an encoded "/"
        if parts[0] == "cdn" and len(parts) == 2 and parts[1] in self._blobs:
            return _send_body(h, self._blobs[parts[1]], head, mode, {})
        if self.token and h.headers.get("Authorization") != f"Bearer {self.token}":
            return _send(h, 401, head, {"X-Error-Code": "GatedRepo", "X-Error-Message": "needs a token"})
        if parts[0] == "api" and "tree" in parts[2:]:
            kind, i = parts[1].removesuffix("s"), parts.index("tree", 2)
            repo_type, repo_id, rev, rest = kind, "/".join(parts[2:i]), unquote(parts[i + 1]), parts[i + 2:]
        elif "resolve" in parts:
            kind, i = ("dataset", 1) if parts[0] == "datasets" else ("model", 0)
            j = parts.index("resolve", i)
            repo_type, repo_id, rev, rest = kind, "/".join(parts[i:j]), unquote(parts[j + 1]), parts[j + 2:]
        else:
            return _send(h, 404, head, {"X-Error-Message": f"no route for {url.path}"})
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            return _send(h, 404, head, {"X-Error-Code": "RepoNotFound"})
        commit = repo["refs"].get(rev) or (rev if rev in repo["commits"] else None)
        if commit is None:
            return _send(h, 404, head, {"X-Error-Code": "RevisionNotFound"})
        files = repo["commits"][commit]
        if parts[0] == "api":
            return self._tree(h, head, url, files, parse_qs(url.query))
        entry = files.get(unquote("/".join(rest)))
        if entry is None:
            return _send(h, 404, head, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
        data, etag, lfs = entry
        if lfs:
            return _send(h, 302, head, {"Location": f"{self.cdn_url}/{etag}", "X-Repo-Commit": commit,
                                        "X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        return _send_body(h, data, head, mode, {"ETag": f'"{etag}"', "X-Repo-Commit": commit})

    def _tree(self, h, head, url, files, query):
        recursive = query.get("recursive") == ["true"]
        dirs = {"/".join(p.split("/")[:k]) for p in files for k in range(1, p.count("/") + 1)}
        entries = [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in dirs]
        entries += [{"type": "file", "path": p, "oid": e[1], "size": len(e[0])} for p, e in files.items()]
        entries = sorted((e for e in entries if recursive or "/" not in e["path"]), key=lambda e: e["path"])
        cursor = int(query.get("cursor", ["0"])[0])
        page = entries[cursor:cursor + self.page_size]
        headers = {"Content-Type": "application/json"}
        if cursor + self.page_size < len(entries):
            nxt = f"{self.url}{url.path}?recursive={str(recursive).lower()}&cursor={cursor + self.page_size}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        _send(h, 200, head, headers, json.dumps(page).encode())


def _send(h, status, head, headers, body=b""):
    h.send_response(status)
    for key, value in headers.items():
        h.send_header(key, value)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if not head:
        h.wfile.write(body)


def _send_body(h, data, head, mode, headers):
    """Serve data, honouring "Range: bytes=N-" (206), and play out a "drop" or "corrupt" failure."""
    start, status = 0, 200
    match = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
    if match:
        start, status = int(match[1]), 206
        if start >= len(data):
            return _send(h, 416, head, {"Content-Range": f"bytes */{len(data)}"})
        headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
    body = memoryview(data)[start:]
    if mode == "corrupt":
        body = bytearray(body)
        body[len(body) // 2] ^= 0xFF
    h.send_response(status)
    for key, value in headers.items():
        h.send_header(key, value)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if head:
        return
    if mode == "drop":  # half the promised bytes, then the connection closes: the client sees a broken stream
        h.wfile.write(body[:len(body) // 2])
        h.close_connection = True
    else:
        h.wfile.write(body)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.hub._serve(self, head=False)

    def do_HEAD(self):
        self.server.hub._serve(self, head=True)

    def log_message(self, *args):  # keep test output quiet
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client hanging up mid-body is expected (resume tests); anything else is a fakehub bug: show it.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def serve(fake, tmp_path, monkeypatch):
    """Point the hub client at `fake` for one test: HF_ENDPOINT, a fresh cache under tmp_path, no token, online,
    and quick retries."""
    import hub
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "RETRY_BASE_S", 0.01)
    return fake
