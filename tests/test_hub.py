"""hub.py: the hub client against fakehub.FakeHub on 127.0.0.1 (cache layout, zero requests when warm or offline,
resume, sha256 check, retries, errors that name repo, file and revision). Safetensors: test_safetensors.py."""
import os
import socket
import time
from pathlib import Path

import pytest
import torch

import hub
from fakehub import FakeHub, serve
from hub import HubError

MB = 1 << 20


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A FakeHub as HF_ENDPOINT, a fresh cache under tmp_path, no token, online, and quick retries."""
    with FakeHub() as fake_hub:
        serve(fake_hub, tmp_path, monkeypatch)
        yield fake_hub


def weights(n=3 * MB, seed=0):
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)).numpy().tobytes()


def test_cold_download_then_warm_cache_makes_no_request(fake, tmp_path):
    fake.add_file("org/tiny", "model.safetensors", weights())
    fake.add_file("org/tiny", "config.json", b'{"hidden_size": 8}')
    fake.add_file("org/tiny", "empty/__init__.py", b"")
    path = hub.hf_hub_download("org/tiny", "model.safetensors")
    config = hub.hf_hub_download("org/tiny", "config.json")
    assert path.read_bytes() == weights() and config.read_bytes() == b'{"hidden_size": 8}'
    assert hub.hf_hub_download("org/tiny", "empty/__init__.py").read_bytes() == b""
    assert ("HEAD", "/org/tiny/resolve/main/model.safetensors") in fake.requests
    repo = tmp_path / "cache" / "models--org--tiny"
    commit = fake.commit("org/tiny")
    assert (repo / "refs" / "main").read_text() == commit
    assert path == repo / "snapshots" / commit / "model.safetensors" and path.is_symlink()
    assert path.resolve().parent == (repo / "blobs").resolve()  # symlink into blobs/<sha256>, as huggingface_hub
    fake.requests.clear()
    assert hub.hf_hub_download("org/tiny", "model.safetensors") == path
    assert hub.resolve_file("org/tiny", "config.json") == config
    assert fake.requests == []


def test_offline_uses_warm_cache_and_explains_a_cold_one(fake, monkeypatch):
    fake.add_file("org/tiny", "config.json", b"{}")
    path = hub.hf_hub_download("org/tiny", "config.json")
    fake.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hf_hub_download("org/tiny", "config.json") == path
    with pytest.raises(HubError, match="not in the cache .* HF_HUB_OFFLINE is set.*Unset HF_HUB_OFFLINE"):
        hub.hf_hub_download("org/tiny", "tokenizer.json")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        hub.list_repo_files("org/tiny")
    assert fake.requests == []


def test_dropped_connection_resumes_with_range(fake):
    data = weights(4 * MB)
    fake.add_file("org/tiny", "model.safetensors", data)
    fake.fail_next("/cdn/", "drop")
    path = hub.hf_hub_download("org/tiny", "model.safetensors")
    assert path.read_bytes() == data
    ranges = [h.get("Range") for (method, p), h in zip(fake.requests, fake.headers) if p.startswith("/cdn/")]
    assert ranges[0] is None and ranges[1] == f"bytes={2 * MB}-"


def test_incomplete_file_from_an_earlier_process_is_resumed(fake, tmp_path):
    data = weights(2 * MB)
    fake.add_file("org/tiny", "model.safetensors", data)
    sha = hub.hashlib.sha256(data).hexdigest()
    blobs = tmp_path / "cache" / "models--org--tiny" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{sha}.incomplete").write_bytes(data[:12345])
    assert hub.hf_hub_download("org/tiny", "model.safetensors").read_bytes() == data
    assert fake.headers[-1]["Range"] == "bytes=12345-"
    assert sorted(p.name for p in blobs.iterdir()) == [sha]


def test_sha256_mismatch_is_rejected_and_nothing_is_kept(fake, tmp_path):
    fake.add_file("org/tiny", "model.safetensors", weights())
    fake.fail_next("/cdn/", "corrupt")
    with pytest.raises(HubError, match="sha256 mismatch.*deleted"):
        hub.hf_hub_download("org/tiny", "model.safetensors")
    repo = tmp_path / "cache" / "models--org--tiny"
    assert list((repo / "blobs").iterdir()) == [] and not (repo / "snapshots").exists()
    assert hub.hf_hub_download("org/tiny", "model.safetensors").read_bytes() == weights()  # a retry succeeds


@pytest.mark.parametrize("repo_id,filename,revision,cause", [
    ("org/nope", "config.json", "main", "repository not found"),
    ("org/tiny", "nope.json", "main", "file not found at this revision"),
    ("org/tiny", "config.json", "nope", "revision not found"),
])
def test_404_names_repo_file_revision_and_cause(fake, repo_id, filename, revision, cause):
    fake.add_file("org/tiny", "config.json", b"{}")
    with pytest.raises(HubError, match=cause) as err:
        hub.hf_hub_download(repo_id, filename, revision)
    assert f"'{repo_id}'" in str(err.value) and f"'{filename}'" in str(err.value) and f"'{revision}'" in str(err.value)


def test_branch_and_commit_revisions(fake):
    fake.add_file("EleutherAI/pythia-70m", "model.safetensors", weights(seed=1), revision="step143000")
    fake.add_file("EleutherAI/pythia-70m", "model.safetensors", weights(seed=2), revision="main")
    step = fake.commit("EleutherAI/pythia-70m", "step143000")
    assert hub.hf_hub_download("EleutherAI/pythia-70m", "model.safetensors", "step143000").read_bytes() == weights(seed=1)
    assert hub.hf_hub_download("EleutherAI/pythia-70m", "model.safetensors").read_bytes() == weights(seed=2)
    fake.requests.clear()
    assert hub.hf_hub_download("EleutherAI/pythia-70m", "model.safetensors", step).read_bytes() == weights(seed=1)
    assert fake.requests == []  # the commit's snapshot is already there


def test_cold_commit_revision_downloads(fake):
    fake.add_file("org/tiny", "config.json", b"{}")
    commit = fake.commit("org/tiny")
    path = hub.hf_hub_download("org/tiny", "config.json", commit)
    assert path.parent.name == commit and not (path.parents[2] / "refs" / commit).exists()


def test_token_goes_to_the_hub_as_bearer_but_not_to_the_cdn(fake, monkeypatch):
    fake.add_file("org/gated", "config.json", b"{}")
    fake.add_file("org/gated", "model.safetensors", weights())
    fake.token = "hf_secret"
    with pytest.raises(HubError, match="HTTP 401.*Set HF_TOKEN"):
        hub.hf_hub_download("org/gated", "config.json")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert hub.hf_hub_download("org/gated", "config.json").read_bytes() == b"{}"
    assert hub.hf_hub_download("org/gated", "model.safetensors").read_bytes() == weights()
    sent = {p: h.get("Authorization") for (m, p), h in zip(fake.requests, fake.headers)}
    assert sent["/org/gated/resolve/main/config.json"] == "Bearer hf_secret"
    assert [a for p, a in sent.items() if p.startswith("/cdn/")] == [None]  # the signed CDN URL needs no token


def test_503_is_retried_and_persistent_failure_is_explained(fake):
    fake.add_file("org/tiny", "config.json", b"{}")
    fake.fail_next("/resolve/", "status:503")
    assert hub.hf_hub_download("org/tiny", "config.json").read_bytes() == b"{}"
    assert [m for m, p in fake.requests] == ["HEAD", "HEAD", "GET"]
    for _ in range(hub.TRIES):
        fake.fail_next("/resolve/", "status:503")
    with pytest.raises(HubError, match=f"'tokenizer.json'.*HTTP 503.*after {hub.TRIES} tries"):
        hub.hf_hub_download("org/tiny", "tokenizer.json")


def test_unreachable_endpoint_is_explained(fake, monkeypatch):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}/")
    with pytest.raises(HubError, match=f"could not reach 127.0.0.1:{port}.*HF_HUB_OFFLINE=1"):
        hub.hf_hub_download("org/tiny", "config.json")


def test_list_repo_files_follows_pagination(fake):
    names = [f"shard-{i:03d}.bin" for i in range(120)] + ["sub/dir/nested.txt"]
    for name in names:
        fake.add_file("org/many", name, b"x")
    assert hub.list_repo_files("org/many") == sorted(names)
    assert sum(p.startswith("/api/models/org/many/tree/main") for m, p in fake.requests) == 3  # 123 entries, 50 a page
    with pytest.raises(HubError, match="'org/none'.*repository not found"):
        hub.list_repo_files("org/none")


def test_dataset_parquet_conversion_revision(fake, tmp_path):
    fake.add_file("org/ds", "default/train/0000.parquet", b"PAR1 fake", revision="refs/convert/parquet",
                  repo_type="dataset")
    assert hub.list_repo_files("org/ds", "refs/convert/parquet", "dataset") == ["default/train/0000.parquet"]
    path = hub.hf_hub_download("org/ds", "default/train/0000.parquet", "refs/convert/parquet", "dataset")
    assert path.read_bytes() == b"PAR1 fake"
    assert ("HEAD", "/datasets/org/ds/resolve/refs%2Fconvert%2Fparquet/default/train/0000.parquet") in fake.requests
    repo = tmp_path / "cache" / "datasets--org--ds"
    assert (repo / "refs" / "refs" / "convert" / "parquet").read_text() == fake.commit("org/ds", "refs/convert/parquet",
                                                                                      "dataset")


def test_resolve_file_local_dirs_and_paths(fake, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no out/ here
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert hub.resolve_file(tmp_path / "ckpt", "config.json") == tmp_path / "ckpt" / "config.json"
    with pytest.raises(FileNotFoundError, match="ckpt holds no model.safetensors"):
        hub.resolve_file(tmp_path / "ckpt", "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        hub.resolve_file(str(tmp_path / "missing"), "config.json")
    with pytest.raises(HubError, match="not a local directory either"):
        hub.resolve_file("out/run1", "config.json")  # could be either: the hub is asked, both are mentioned
    assert [p for m, p in fake.requests] == ["/out/run1/resolve/main/config.json"]


def test_cache_dir_and_endpoint_come_from_env_at_call_time(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hub.hub_cache_dir() == tmp_path / ".cache" / "huggingface" / "hub"
    assert hub.hub_endpoint() == "https://huggingface.co"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub.hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub.hub_cache_dir() == tmp_path / "c"
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example/")
    assert hub.hub_endpoint() == "http://mirror.example"


def test_one_cache_shared_with_huggingface_hub(fake, tmp_path, monkeypatch):
    """huggingface_hub (the reference client) downloads from FakeHub and we find its files offline; it finds ours."""
    hf = pytest.importorskip("huggingface_hub")
    cache = tmp_path / "cache"
    fake.add_file("org/tiny", "model.safetensors", weights(seed=1))
    fake.add_file("org/tiny", "config.json", b"{}", revision="step1")
    fake.add_file("org/ds", "default/train/0.parquet", b"PAR1", revision="refs/convert/parquet", repo_type="dataset")
    theirs = [hf.hf_hub_download("org/tiny", "model.safetensors", cache_dir=cache, endpoint=fake.url),
              hf.hf_hub_download("org/tiny", "config.json", revision="step1", cache_dir=cache, endpoint=fake.url),
              hf.hf_hub_download("org/ds", "default/train/0.parquet", revision="refs/convert/parquet",
                                 repo_type="dataset", cache_dir=cache, endpoint=fake.url)]
    fake.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = [hub.hf_hub_download("org/tiny", "model.safetensors"), hub.hf_hub_download("org/tiny", "config.json", "step1"),
            hub.hf_hub_download("org/ds", "default/train/0.parquet", "refs/convert/parquet", "dataset")]
    assert ours == [Path(p) for p in theirs] and fake.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    fake.add_file("org/other", "model.safetensors", weights(seed=2))
    mine = hub.hf_hub_download("org/other", "model.safetensors")
    assert Path(hf.try_to_load_from_cache("org/other", "model.safetensors", cache_dir=cache)) == mine


@pytest.mark.skipif(not os.environ.get("BENCH_HUB"), reason="benchmark: set BENCH_HUB=1")
def test_bench_100mb_download(fake):
    data = os.urandom(100 * MB)
    fake.add_file("org/big", "model.safetensors", data)
    t0 = time.perf_counter()
    path = hub.hf_hub_download("org/big", "model.safetensors")
    seconds = time.perf_counter() - t0
    assert path.stat().st_size == len(data)
    print(f"\n100 MB from FakeHub in {seconds:.2f}s: {100 * MB / 1e6 / seconds:.0f} MB/s (incl. sha256 check)")


def test_from_pretrained_through_the_hub(fake, tmp_path):
    """A hub repo id with a Pythia-style branch revision downloads once, then loads from the cache alone."""
    from hyena import Config
    from hyena import GPTNeoX
    torch.manual_seed(0)
    m = GPTNeoX(Config(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                       vocab_size=97, max_position_embeddings=32))
    with torch.no_grad():
        for w in m.parameters():
            w.add_(0.05 * torch.randn_like(w))  # LayerNorms and biases too: every tensor must arrive
    m.save_pretrained(tmp_path / "src")
    fake.add_dir("EleutherAI/pythia-tiny", tmp_path / "src", revision="step143000")
    a = GPTNeoX.from_pretrained("EleutherAI/pythia-tiny", revision="step143000")
    n = len(fake.requests)
    b = GPTNeoX.from_pretrained("EleutherAI/pythia-tiny", revision="step143000")
    assert n > 0 and len(fake.requests) == n  # the warm cache answers; no request
    for k, v in m.state_dict().items():
        assert torch.equal(a.state_dict()[k], v) and torch.equal(b.state_dict()[k], v)


@pytest.mark.parametrize("name,path", [("EleutherAI/pythia-70m", False), ("org/model.v2", False), ("run1", True),
                                       ("./org/x", True), ("/abs/x", True), ("~/x", True), ("a/b/c", True),
                                       ("org/..", True), ("-org/x", True), ("out/nope", True)])
def test_one_rule_tells_paths_from_repo_ids(name, path, tmp_path, monkeypatch):
    """hub.looks_like_path decides for every name-or-path argument: only owner/name is asked of the hub, and not
    when its owner part is a local folder (out/ exists here)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert hub.looks_like_path(name) is path
