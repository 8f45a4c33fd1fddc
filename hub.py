"""A small Hugging Face hub client built on requests, and the one rule telling hub ids from local paths.

The client keeps huggingface_hub's cache layout (models--org--name/{blobs,snapshots,refs}), so the two share
one cache: a file fetched by either is found by the other.

The weights it fetches are read by pretrained/safetensors.py (nothing downloaded is ever unpickled).
"""
import fcntl
import hashlib
import os
import re
import shutil
import sys
import time
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urljoin, urlparse

import requests

from cli import Progress, write_atomic

RETRY_BASE_S = 1.0  # first backoff; it doubles on each retry (tests shrink it)
TRIES = 5
# (connect, read) seconds. A server that accepts the connection and then says nothing is tried STALL_TRIES times
# only, so a stalled endpoint fails within a minute (tests shrink these too).
TIMEOUT = (5, 20)
STALL_TRIES = 2
# A hub repo id: "owner/name" (or a bare legacy "name", which hf_hub_download accepts but name-or-path arguments
# read as local paths: see looks_like_path). No part starts with '.' or '-', and '..' is refused separately.
REPO_ID = re.compile(r"(?![.-])[\w.-]+(/(?![.-])[\w.-]+)?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class HubError(RuntimeError):
    """A hub request failed; the message names repo, file and revision, and what to do about it."""


def hub_endpoint():
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_cache_dir():
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface" / "hub"


def _offline():
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _headers():
    headers = {"User-Agent": "scavenging-hyena (requests)"}
    if os.environ.get("HF_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    return headers


def _explain(r):
    """One line on why the hub said no, using its X-Error-Code / X-Error-Message headers when present."""
    code, msg = r.headers.get("X-Error-Code", ""), r.headers.get("X-Error-Message", "")
    if r.status_code in (401, 403):
        text = ("access denied: the repo is private or gated, or does not exist. Set HF_TOKEN to a token that can "
                "read it (https://huggingface.co/settings/tokens), and accept the terms on the repo page if gated")
    elif r.status_code == 404:
        text = {"RepoNotFound": "repository not found", "RevisionNotFound": "revision not found",
                "EntryNotFound": "file not found at this revision"}.get(code, "repository, revision or file not found")
        text += "; check the repo id, the revision and the file name"
    else:
        text = r.reason or "error"
    return f"HTTP {r.status_code} {text}" + (f" [{msg}]" if msg else "")


def _request(method, url, what, headers, stream=False, follow=False):
    """One request: 429, 5xx and connection errors are retried with backoff (a line on stderr says so), a stalled
    server STALL_TRIES times; other errors raise HubError."""
    host, stalls = urlparse(url).netloc, 0
    for attempt in range(TRIES):
        try:
            r = requests.request(method, url, headers=headers, stream=stream, allow_redirects=follow, timeout=TIMEOUT)
        except requests.ReadTimeout:
            stalls += 1
            error, wait = f"{host} accepted the connection but sent no answer within {TIMEOUT[1]} s", 0
            if stalls >= STALL_TRIES:
                raise HubError(f"{what}: {error}, {stalls} times: the hub endpoint is stalled. Try again later, check "
                               f"HF_ENDPOINT ({hub_endpoint()}), or set HF_HUB_OFFLINE=1 to use only the local "
                               "cache") from None
        except (requests.ConnectionError, requests.Timeout) as e:
            error, wait = f"could not reach {host} ({type(e).__name__})", 0
        else:
            if r.status_code < 400:
                return r
            r.close()
            error = _explain(r)
            if r.status_code != 429 and r.status_code < 500:
                raise HubError(f"{what}: {error}")
            wait = float(r.headers.get("Retry-After", "0")) if r.headers.get("Retry-After", "").isdigit() else 0
        if attempt + 1 < TRIES:
            wait = min(max(wait, RETRY_BASE_S * 2 ** attempt), 60)
            print(f"hub: {what}: {error}; retry {attempt + 1} of {TRIES - 1} in {wait:.0f} s", file=sys.stderr)
            time.sleep(wait)
    raise HubError(f"{what}: {error}, still failing after {TRIES} tries. Check the network and HF_ENDPOINT "
                   f"({hub_endpoint()}), or set HF_HUB_OFFLINE=1 to use only the local cache")


def _repo_folder(repo_id, repo_type):
    """The cache folder name, e.g. models--EleutherAI--pythia-70m, after checking both parts."""
    if repo_type not in ("model", "dataset"):
        raise ValueError(f"repo_type {repo_type!r} must be 'model' or 'dataset'")
    if not REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise ValueError(f"repo_id {repo_id!r} is not a hub repo id like 'EleutherAI/pythia-70m'")
    return f"{repo_type}s--{repo_id.replace('/', '--')}"


def _check_relative(value, label):
    """filename and revision become paths in the cache: refuse anything that could escape it."""
    parts = PurePosixPath(value).parts
    if not value or value.startswith("/") or "\\" in value or ".." in parts:
        raise ValueError(f"{label} {value!r} must be a relative path without '..'")


def hf_hub_download(repo_id, filename, revision="main", repo_type="model"):
    """Return the cached path of one repo file, downloading it first if needed. With the cache warm (revision is a
    commit in snapshots, or refs/<revision> names one holding the file) or HF_HUB_OFFLINE=1, no request is made;
    a branch that has since moved on the hub is therefore not noticed: pin a commit, or delete refs/<branch>."""
    folder = _repo_folder(repo_id, repo_type)
    _check_relative(filename, "filename")
    _check_relative(revision, "revision")
    what = f"{repo_type} {repo_id!r}, file {filename!r}, revision {revision!r}"
    repo_dir = hub_cache_dir() / folder
    ref = repo_dir / "refs" / revision
    commit = revision if _COMMIT.fullmatch(revision) else None
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    if commit and (repo_dir / "snapshots" / commit / filename).exists():
        return repo_dir / "snapshots" / commit / filename
    if _offline():
        raise HubError(f"{what}: not in the cache {repo_dir} and HF_HUB_OFFLINE is set, so nothing was fetched. "
                       "Unset HF_HUB_OFFLINE, or download the file into this cache (HF_HUB_CACHE) beforehand")

    url = f"{hub_endpoint()}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}/resolve/" \
          f"{quote(revision, safe='')}/{quote(filename)}"
    commit, etag, size, download_url = _metadata(url, what)
    blob = repo_dir / "blobs" / etag
    blob.parent.mkdir(parents=True, exist_ok=True)
    # Same lock file as huggingface_hub (filelock uses flock too): concurrent processes (e.g. torchrun ranks)
    # download a blob once instead of appending to the same .incomplete file.
    lock = hub_cache_dir() / ".locks" / folder / f"{etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if not blob.exists():
            _download(download_url, blob, etag, size, what, filename)
    snapshot = repo_dir / "snapshots" / commit / filename
    _link(blob, snapshot)
    if revision != commit:
        ref.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(ref, commit)
    return snapshot


def _metadata(url, what):
    """(commit, etag, size or None, download url) from a HEAD on a resolve URL. Like huggingface_hub, without
    following the redirect to the CDN: for LFS files the hub's 302 itself carries the commit and the sha256
    (X-Linked-Etag); small files answer 200 directly, their ETag a git sha1."""
    r = _request("HEAD", url, what, _headers())
    for _ in range(5):  # same-host redirects (a renamed repo) lead to the metadata; the CDN's host holds none
        if not (r.is_redirect and urlparse(urljoin(url, r.headers["Location"])).netloc == urlparse(url).netloc):
            break
        url = urljoin(url, r.headers["Location"])
        r = _request("HEAD", url, what, _headers())
    commit = r.headers.get("X-Repo-Commit", "")
    etag = (r.headers.get("X-Linked-Etag") or r.headers.get("ETag") or "").removeprefix("W/").strip('"')
    size = r.headers.get("X-Linked-Size") or r.headers.get("Content-Length")
    # Both become cache paths, so a hostile or broken server must not be able to steer them.
    if not _COMMIT.fullmatch(commit) or not re.fullmatch(r"[\w-]+", etag):
        raise HubError(f"{what}: {url} answered without a valid X-Repo-Commit/ETag (got {commit!r}, {etag!r}); "
                       f"is HF_ENDPOINT={hub_endpoint()} a Hugging Face hub?")
    return commit, etag, int(size) if size else None, urljoin(url, r.headers["Location"]) if r.is_redirect else url


def _link(blob, snapshot):
    """snapshot -> blob as a relative symlink, like huggingface_hub, so the cache can be moved as a whole."""
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    tmp = snapshot.with_name(f"{snapshot.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(os.path.relpath(blob, snapshot.parent))
    except OSError:  # filesystems (or Windows accounts) without symlinks: a copy
        shutil.copyfile(blob, tmp)
    os.replace(tmp, snapshot)


def _download(url, blob, etag, size, what, filename):
    """Stream url into blob.incomplete, resuming (Range) from what is already there, be it from a dropped
    connection or a previous process; verify the sha256 if the etag is one; then move it to blob."""
    part = blob.with_name(blob.name + ".incomplete")
    headers = {**_headers(), "Accept-Encoding": "identity"}  # sizes on disk must match byte offsets on the wire
    if urlparse(url).netloc != urlparse(hub_endpoint()).netloc:
        headers.pop("Authorization", None)  # never hand the token to the CDN: its signed URL is the credential
    part.touch()  # so an empty file needs no request; touch keeps the bytes of a leftover
    have = part.stat().st_size
    stalls, quiet = 0, size is not None and size < 1 << 20  # no progress line under 1 MB
    progress = Progress(size, have, quiet)
    total = f"/{size / 1e6:.1f}" if size else ""

    def line(got):
        return lambda rate, eta: f"{filename}: {got / 1e6:.1f}{total} MB, {rate / 1e6:.1f} MB/s{eta}"
    # Hash while writing: reading the file back afterwards would cost a third of the download time. A prefix
    # left by an earlier process is hashed first.
    digest = hashlib.sha256()
    if have:
        with open(part, "rb") as f:
            digest = hashlib.file_digest(f, "sha256")
    while size is None or have < size:
        r = _request("GET", url, what, {**headers, "Range": f"bytes={have}-"} if have else headers, stream=True,
                     follow=True)
        if have and r.status_code != 206:  # the server ignored the Range header: start over
            have, digest, progress = 0, hashlib.sha256(), Progress(size, 0, quiet)
        before = got = have
        try:
            with r, open(part, "ab" if have else "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    progress.update(got, line(got))
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
            error = e
        else:
            if size is None:
                break  # without a known size, a clean end of stream is the end of the file
            error = "the stream ended early"
        have = part.stat().st_size
        if size is not None and have >= size:
            break
        stalls = 0 if have > before else stalls + 1  # give up only when retries stop making progress
        if stalls >= TRIES:
            raise HubError(f"{what}: download keeps failing ({error}); the {have} bytes so far stay in {part} "
                           "and the next call resumes from there")
        print(f"hub: {what}: download interrupted ({error}) at {have} bytes; resuming in "
              f"{RETRY_BASE_S * 2 ** stalls:.0f} s", file=sys.stderr)
        time.sleep(RETRY_BASE_S * 2 ** stalls)
    have = part.stat().st_size
    progress.update(have, line(have), final=True)
    if size is not None and have != size:
        part.unlink()
        raise HubError(f"{what}: got {have} bytes but the hub announced {size}; the download was deleted, try again")
    # LFS files: the etag is the sha256 of the content (small files: a git sha1, not checked)
    if _SHA256.fullmatch(etag) and digest.hexdigest() != etag:
        part.unlink()
        raise HubError(f"{what}: sha256 mismatch: the download hashes to {digest.hexdigest()} but the hub says "
                       f"{etag}; the corrupt download was deleted, try again")
    os.replace(part, blob)


def list_repo_files(repo_id, revision="main", repo_type="model"):
    """Every file path in the repo at revision (sorted), following the hub's paginated tree listing."""
    _repo_folder(repo_id, repo_type)
    what = f"{repo_type} {repo_id!r}, revision {revision!r} (file listing)"
    if _offline():
        raise HubError(f"{what}: HF_HUB_OFFLINE is set and listing a repo needs the hub; unset it, or name the "
                       "files directly (hf_hub_download finds cached files offline)")
    url = f"{hub_endpoint()}/api/{repo_type}s/{repo_id}/tree/{quote(revision, safe='')}?recursive=true"
    files = []
    while url:
        r = _request("GET", url, what, _headers(), follow=True)
        try:
            entries = r.json()
        except ValueError:
            entries = None
        if not isinstance(entries, list):
            raise HubError(f"{what}: {url} did not answer with a JSON list; is HF_ENDPOINT={hub_endpoint()} a hub?")
        files += [e["path"] for e in entries if isinstance(e, dict) and e.get("type") == "file"]
        url = urljoin(url, r.links["next"]["url"]) if "next" in r.links else None  # Link: <...>; rel="next"
    return sorted(files)


def looks_like_path(name):
    """Meant as a local path, not a hub repo id: anything but owner/name (a bare `run1`, `./x`, `/abs`, `~/x`,
    `a/b/c`, a backslash, '..'), and an owner/name whose first part is a local folder (`out/nope`, out/ here).
    Every name-or-path argument (checkpoints, teachers, tokenizers) is told apart by this one rule."""
    name = str(name)
    return (not REPO_ID.fullmatch(name) or "/" not in name or ".." in name
            or Path(name.split("/")[0]).is_dir())


def resolve_file(name_or_path, filename, revision="main"):
    """The one name-or-path resolver: a local directory -> dir/filename (which must exist); a hub repo id
    (owner/name) -> hf_hub_download at revision; anything else that looks like a path is refused by name."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / filename).is_file():
            raise FileNotFoundError(f"{path / filename}: the local directory {name_or_path} holds no {filename}")
        return path / filename
    text = str(name_or_path)
    if path.exists():
        raise FileNotFoundError(f"{name_or_path}: is a file; expected a directory holding {filename}, or a hub repo id")
    if looks_like_path(text):
        raise FileNotFoundError(f"{name_or_path}: no such directory (expected a local directory holding {filename}, "
                                "or a hub repo id like 'EleutherAI/pythia-70m')")
    try:
        return hf_hub_download(text, filename, revision)
    except HubError as e:
        raise HubError(f"{e} (and {text!r} is not a local directory either)") from e
