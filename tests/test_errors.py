"""The error path of the scripts (cli.run): bad inputs exit 2 with one message that names what is wrong and no
traceback; Ctrl-C (SIGTERM) exits 130 (143) after a checkpoint; one writer per --out-dir; a full disk; hub paths,
stalls and retries."""
import errno
import json
import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cli
import data
import distill
import eval as ev
import finetune
import hub
from cli import out_dir_lock
from fakehub import FakeHub, serve
from hyena import Config, GPTNeoX

ROOT = Path(__file__).resolve().parent.parent  # the repository
VOCAB = 64
TINY = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, vocab_size=VOCAB,
            max_position_embeddings=64)


@pytest.fixture
def data_dir(tmp_path):
    """A prepared dataset (data.py's layout) of a repeating cycle of VOCAB ids."""
    folder = tmp_path / "data" / "cycle"
    folder.mkdir(parents=True)
    splits = {}
    for split, repeats in (("train", 100), ("val", 10)):
        tokens = np.tile(np.arange(VOCAB), repeats).astype(np.uint16)
        tokens.tofile(folder / f"{split}.bin")
        splits[split] = {"tokens": len(tokens), "documents": 1}
    (folder / "meta.json").write_text(json.dumps({
        "command": "python prepare.py text cycle.txt --name cycle", "tokenizer": "none",
        "tokenizer_sha256": "0" * 64, "vocab_size": VOCAB, "eot_token": 0, "dtype": "uint16", "splits": splits}))
    return folder


def train_args(out, data_dir, *extra):
    return ["--init", "scratch", "--config", "tiny", "--data", str(data_dir), "--out-dir", str(out),
            "--batch-size", "2", "--block-size", "16", "--device", "cpu", "--eval-batches", "1", *extra]


def fails(main, argv, capsys, code=2):
    """Run main the way a script's __main__ does; return its stderr after checking the exit status, that there is
    one error line and no traceback."""
    with pytest.raises(SystemExit) as e:
        cli.run(main, argv)
    err = capsys.readouterr().err
    assert e.value.code == code, err
    assert "Traceback" not in err
    if code == 2:
        assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
    return err


def test_every_script_exits_2_with_one_line_and_no_traceback(tmp_path, monkeypatch, capsys):
    """Each script's __main__ goes through cli.run: run as `python SCRIPT ...` would (runpy, in this process)."""
    (tmp_path / "file").write_text("")  # a file where a folder is needed
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "bench.json").write_text("{not json")
    cases = {
        "prepare.py": (["text", str(tmp_path / "file"), "--out-dir", str(tmp_path), "--workers", "0"], "--workers 0"),
        "finetune.py": (["--init", "scratch", "--max-tokens", "100", "--batch-size", "0"], "--batch-size must be >= 1"),
        "distill.py": (["--teacher", "x", "--max-tokens", "100", "--kd-temperature", "0"], "--kd-temperature"),
        "eval.py": (["--ckpt", "x", "--prompt", "hi", "--max-new-tokens", "-5"], "--max-new-tokens must be >= 1"),
        "experiment/experiment.py": (["--preset", "tiny", "--gpus", "0", "--runs", str(tmp_path / "file" / "runs")],
                          str(tmp_path / "file")),
        "experiment/report.py": (["--runs", str(tmp_path), "--results", str(tmp_path / "file" / "results")],
                      str(tmp_path / "file")),
        "bench/bench.py": (["--cpu-smoke", "--only", "decode", "--out", str(tmp_path / "bench")], "bench.json: not JSON"),
    }
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HYENA_DEBUG", raising=False)
    for script, (argv, fault) in cases.items():
        monkeypatch.setattr(sys, "argv", [str(ROOT / script), *argv])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err, (script, err)
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and errors[0].startswith(f"{Path(script).name}: error:") and fault in errors[0], (script, err)


def test_debug_flag_or_env_shows_the_traceback(tmp_path, monkeypatch, capsys):
    bad = ["--init", "scratch", "--max-tokens", "100", "--batch-size", "0"]
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        cli.run(finetune.main, [*bad, "--debug"])
    monkeypatch.setenv("HYENA_DEBUG", "1")
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        cli.run(finetune.main, bad)


def test_count_flags_device_and_config_json_are_checked(tmp_path, data_dir, capsys):
    assert "--batch-size must be >= 1, got 0" in fails(ev.main, ["--ckpt", "x", "--data", "y", "--batch-size", "0"],
                                                        capsys)
    assert "--max-new-tokens must be >= 1" in fails(ev.main, ["--ckpt", "x", "--prompt", "", "--max-new-tokens", "-5"],
                                                    capsys)
    assert "--eval-batches must be >= 0" in fails(finetune.main, train_args(tmp_path, data_dir, "--eval-batches", "-1",
                                                                            "--max-tokens", "100"), capsys)
    for flag, value in (("--e2e-tokens", "-1"), ("--hyena-order", "0"), ("--kd-temperature", "0")):
        err = fails(distill.main, ["--teacher", "x", "--max-tokens", "100", flag, value], capsys)
        assert f"{flag} must be" in err
    if not torch.cuda.is_available():
        err = fails(finetune.main, train_args(tmp_path, data_dir, "--max-tokens", "100", "--device", "cuda"), capsys)
        assert "--device cuda:0" in err and "--device cpu" in err
        err = fails(ev.main, ["--ckpt", "x", "--prompt", "", "--device", "cuda"], capsys)
        assert "--device cuda" in err and "--device cpu" in err
    (tmp_path / "bad.json").write_text("{bad")
    bad = train_args(tmp_path, data_dir, "--max-tokens", "100", "--config", str(tmp_path / "bad.json"))
    err = fails(finetune.main, bad, capsys)
    assert f"{tmp_path / 'bad.json'}: not JSON" in err


@pytest.mark.parametrize("signum, name, status", [(signal.SIGINT, "Ctrl-C", 130), (signal.SIGTERM, "SIGTERM", 143)])
def test_ctrl_c_or_sigterm_saves_a_checkpoint_says_how_to_resume_and_exits_128_plus_the_signal(
        tmp_path, data_dir, signum, name, status):
    """SIGTERM (kill, schedulers, docker stop) is handled as Ctrl-C is: the step finishes, a checkpoint is saved."""
    out = tmp_path / "run"
    args = train_args(out, data_dir, "--max-tokens", "1e9", "--ckpt-interval", "100000", "--eval-batches", "0")
    proc = subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), *args], cwd=ROOT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "no training steps"
            time.sleep(0.05)
        proc.send_signal(signum)
        err = proc.communicate(timeout=60)[1]
    finally:
        proc.kill()
    assert proc.returncode == status, err
    assert "Traceback" not in err and "--resume" in err and str(out / "ckpt") in err, err
    assert f"finetune.py: stopped by {name} after step" in err, err
    step = torch.load(out / "ckpt" / "train_state.pt", weights_only=True)["step"]  # not an interval checkpoint
    assert step >= 2 and len((out / "log.jsonl").read_text().splitlines()) == step
    summary = finetune.main(train_args(out, data_dir, "--max-tokens", str((step + 1) * 32), "--eval-batches", "0",
                                       "--resume"))
    assert summary["steps"] == step + 1


def test_second_run_on_an_out_dir_is_refused_and_a_stale_lock_taken_over(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    args = train_args(out, data_dir, "--max-tokens", str(3 * 32))
    with out_dir_lock(out):  # a first run holds the folder
        err = fails(finetune.main, args, capsys)
    assert f"--out-dir {out} is in use by another run (pid {os.getpid()}" in err
    assert not (out / "log.jsonl").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(f"{dead.pid}\n")  # left by a run that was killed
    finetune.main(args)
    assert f"taking over the stale lock of pid {dead.pid}" in capsys.readouterr().err
    assert len([r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "val" not in r]) == 3
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_too_short_for_one_window_is_refused_before_the_first_step(tmp_path, data_dir, capsys, split):
    meta = json.loads((data_dir / "meta.json").read_text())
    np.arange(5, dtype=np.uint16).tofile(data_dir / f"{split}.bin")  # 5 tokens: no window of --block-size 16
    meta["splits"][split]["tokens"] = 5
    (data_dir / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "run"
    err = fails(finetune.main, train_args(out, data_dir, "--max-tokens", str(4 * 32)), capsys)
    assert f"the {split} split of {data_dir} holds 5 tokens, too few for --block-size 16" in err, err
    assert "lower --block-size to 4 or less" in err and meta["command"] in err, err
    assert ("--eval-batches 0" in err) == (split == "val"), err
    assert not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text()  # not one step taken


def test_checkpoint_with_another_tokenizer_is_refused(tmp_path, data_dir, capsys):
    ckpt = tmp_path / "other"
    GPTNeoX(Config(**TINY)).save_pretrained(ckpt)
    (ckpt / "tokenizer.json").write_text("{}")  # another tokenizer than the data's (sha256 0000...)
    args = ["--data", str(data_dir), "--out-dir", str(tmp_path / "out"), "--batch-size", "2", "--block-size", "16",
            "--max-tokens", "64", "--device", "cpu"]
    err = fails(finetune.main, ["--init", str(ckpt), *args], capsys)
    assert "tokenizer.json has sha256" in err and "--tokenizer" in err
    assert not (tmp_path / "out" / "final").exists()
    err = fails(distill.main, ["--teacher", str(ckpt), *args], capsys)
    assert "tokenizer.json has sha256" in err


def test_token_ids_past_the_vocabulary_are_refused_naming_the_file(tmp_path, data_dir, capsys):
    val = np.fromfile(data_dir / "val.bin", dtype=np.uint16)
    val[5] = VOCAB + 36
    val.tofile(data_dir / "val.bin")
    with pytest.raises(ValueError, match=f"{data_dir / 'val.bin'} holds token id {VOCAB + 36}.*vocab_size is {VOCAB}"):
        data.load_split(data_dir, "val")
    teacher = tmp_path / "teacher"
    GPTNeoX(Config(**TINY)).save_pretrained(teacher)  # vocab 64: id 100 would be an IndexError in the embedding
    err = fails(distill.main, ["--teacher", str(teacher), "--data", str(data_dir), "--out-dir", str(tmp_path / "o"),
                               "--batch-size", "2", "--block-size", "16", "--max-tokens", "64"], capsys)
    assert "val.bin holds token id 100" in err and "--force" in err


def test_eval_json_path_is_checked_before_the_evaluation(tmp_path, data_dir, capsys):
    (tmp_path / "file").write_text("")
    GPTNeoX(Config(**TINY)).save_pretrained(tmp_path / "ckpt")
    err = fails(ev.main, ["--ckpt", str(tmp_path / "ckpt"), "--data", str(data_dir), "--tokenizer", "x",
                          "--json", str(tmp_path / "file" / "x.json")], capsys)
    assert f"--json {tmp_path / 'file'}: cannot write there" in err


def test_corrupt_checkpoint_under_resume_is_named(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    finetune.main(train_args(out, data_dir, "--max-tokens", "64"))
    state = out / "ckpt" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    err = fails(finetune.main, train_args(out, data_dir, "--max-tokens", "128", "--resume"), capsys)
    assert f"{state} is unreadable" in err


@pytest.mark.parametrize("report", ["ENOSPC", "torch"])
def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_resume_works_once_space_is_freed(
        tmp_path, data_dir, capsys, monkeypatch, report):
    """No real disk is filled: torch.save writes part of the file and fails as a full disk makes it fail, with
    ENOSPC or (torch's own writer) RuntimeError "unexpected pos" while the free space is short."""
    out = tmp_path / "run"
    args = train_args(out, data_dir, "--max-tokens", str(4 * 32), "--ckpt-interval", "2", "--eval-batches", "0")
    real_save, calls = torch.save, []

    def save_on_a_full_disk(obj, path, *a, **kw):
        calls.append(path)
        if len(calls) == 1:  # the checkpoint of step 2 is written; the disk fills up during step 4's
            return real_save(obj, path, *a, **kw)
        Path(path).write_bytes(b"\0" * 1000)
        if report == "ENOSPC":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    with monkeypatch.context() as m:
        m.setattr(torch, "save", save_on_a_full_disk)
        m.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
        err = fails(finetune.main, args, capsys)
    assert f"{out}: the disk is full (" in err and "MB needed, 0.0 MB free)" in err, err
    assert f"the last one, {out / 'ckpt'}, is kept" in err and "--resume" in err, err
    assert not (out / "ckpt.tmp").exists()
    assert torch.load(out / "ckpt" / "train_state.pt", weights_only=True)["step"] == 2  # loadable, as it was
    summary = finetune.main(train_args(out, data_dir, "--max-tokens", str(4 * 32), "--eval-batches", "0", "--resume"))
    assert summary["steps"] == 4 and (out / "final" / "model.safetensors").is_file()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    with FakeHub() as fake_hub:
        serve(fake_hub, tmp_path, monkeypatch)
        yield fake_hub


def test_a_missing_path_is_not_asked_of_the_hub(fake, tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    err = fails(finetune.main, ["--init", "out/nope", "--data", str(data_dir), "--max-tokens", "64"], capsys)
    assert "out/nope: no such directory" in err
    err = fails(finetune.main, ["--init", "./nope", "--data", str(data_dir), "--max-tokens", "64"], capsys)
    assert "./nope: no such directory" in err
    assert fake.requests == []


def test_distill_reports_hub_errors(fake, tmp_path, data_dir, capsys):
    err = fails(distill.main, ["--teacher", "org/missing", "--data", str(data_dir), "--out-dir", str(tmp_path / "o"),
                               "--max-tokens", "64"], capsys)
    assert "'org/missing'" in err and "HTTP 404" in err


def test_stalled_endpoint_fails_fast_saying_so(tmp_path, monkeypatch, capsys):
    # The defaults give up on a stalled endpoint within a minute (connect is not the issue: it answers at once).
    assert hub.TIMEOUT[1] * hub.STALL_TRIES + hub.RETRY_BASE_S * 2 ** hub.STALL_TRIES < 60
    with socket.socket() as server:  # listens (the kernel accepts connections) but never answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(hub, "TIMEOUT", (1, 0.5))
        monkeypatch.setattr(hub, "RETRY_BASE_S", 0.01)
        t0 = time.monotonic()
        with pytest.raises(hub.HubError, match=r"sent no answer within 0.5 s, 2 times: the hub endpoint is stalled"):
            hub.hf_hub_download("org/tiny", "config.json")
        assert time.monotonic() - t0 < 5
    retries = [line for line in capsys.readouterr().err.splitlines() if "retry" in line]
    assert len(retries) == 1 and "retry 1 of 4" in retries[0], retries


def test_a_tokenizer_differing_in_formatting_only_is_accepted(tmp_path):
    chars = [chr(b) for b in range(ord("!"), ord("~") + 1)] + ["Ġ"]
    spec = {"normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
            "added_tokens": [{"id": 96, "content": "<|endoftext|>", "special": True, "normalized": False,
                              "lstrip": False, "rstrip": False, "single_word": False}],
            "model": {"type": "BPE", "vocab": {**{c: i for i, c in enumerate(chars)}, "Ġa": 97}, "merges": ["Ġ a"]}}
    (tmp_path / "data.json").write_text(json.dumps(spec))
    meta = {"command": "python prepare.py text x.txt", "tokenizer": str(tmp_path / "data.json"),
            "tokenizer_sha256": data.tokenizer_sha256(tmp_path / "data.json"), "vocab_size": 98}
    for name, vocab in (("same", spec["model"]["vocab"]), ("other", {**spec["model"]["vocab"], "!": 1, '"': 0})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tokenizer.json").write_text(json.dumps({**spec, "model": {**spec["model"], "vocab": vocab}},
                                                                   indent=2))  # other bytes in both
    data.check_tokenizer(meta, str(tmp_path / "same"))
    with pytest.raises(ValueError, match="tokenizer.json has sha256"):
        data.check_tokenizer(meta, str(tmp_path / "other"))
    (tmp_path / "run").mkdir()
    data.check_tokenizer(meta, str(tmp_path / "run"))  # a run's ckpt/: no tokenizer.json to compare


def test_the_scripts_in_subfolders_run_from_any_folder(tmp_path):
    """bench/ and experiment/ scripts put the repo root on sys.path themselves: `python bench/bench.py` works."""
    for script in ("bench/bench.py", "bench/bench_report.py", "experiment/experiment.py", "experiment/report.py"):
        run = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0 and run.stdout.startswith(f"usage: {Path(script).name}"), (script, run.stderr)
