"""train.py and finetune.py on a tiny model and a tiny, very learnable dataset (CPU, seconds)."""
import argparse
import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fast
import fast.losses
import finetune
from training.checkpoint import find_checkpoint
from finetune import scratch_model
from pretrained.config import to_hf
from fast.toeplitz import long_conv
from hyena import GPTNeoX, HyenaOperator, fftconv, make_student
from training import TrainConfig, add_train_args, train_config_from_args
from train import CrossEntropy, build_optimizer, lm_loss, optim_groups, train

VOCAB = 64
STEP_TOKENS = 4 * 32  # batch 4, block 32
ROOT = Path(__file__).resolve().parent.parent  # the repository


@pytest.fixture
def data_dir(tmp_path):
    """data.py's layout: {train,val}.bin (uint16) + meta.json. The text is a fixed cycle through 48 token ids,
    so each token predicts the next and a model's loss falls fast."""
    cycle = np.random.default_rng(0).permutation(VOCAB)[:48]
    folder = tmp_path / "cycle"
    folder.mkdir()
    splits = {}
    for split, repeats in (("train", 200), ("val", 20)):
        tokens = np.tile(cycle, repeats).astype(np.uint16)
        tokens.tofile(folder / f"{split}.bin")
        splits[split] = {"tokens": len(tokens), "documents": 1}
    (folder / "meta.json").write_text(json.dumps({
        "source": "test", "command": "python prepare.py text cycle.txt --name cycle", "tokenizer": "none",
        "tokenizer_sha256": "0" * 64, "vocab_size": VOCAB, "eot_token": 0, "dtype": "uint16", "splits": splits}))
    return folder


def config(out, data_dir, **kw):
    return TrainConfig(**{**dict(out_dir=str(out), data=str(data_dir), batch_size=4, block_size=32,
                                 max_tokens=8 * STEP_TOKENS, lr=3e-3, eval_interval=4, eval_batches=2,
                                 log_interval=2, ckpt_interval=3, device="cpu"), **kw})


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return scratch_model("tiny", "hyena", VOCAB, 32)


def read_log(out):
    lines = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if "val" not in r], [r for r in lines if "val" in r]


def cli_args(out, data_dir, *extra):
    return ["--init", "scratch", "--config", "tiny", "--data", str(data_dir), "--out-dir", str(out),
            "--batch-size", "4", "--block-size", "32", "--device", "cpu", *extra]


def test_finetune_from_scratch_learns_and_saves_final(tmp_path, data_dir):
    out = tmp_path / "run"
    summary = finetune.main(cli_args(out, data_dir, "--max-tokens", str(60 * STEP_TOKENS), "--lr", "1e-2",
                                     "--eval-interval", "30", "--eval-batches", "2"))
    steps, vals = read_log(out)
    assert steps[-1]["loss"] < 0.3 * steps[0]["loss"], (steps[0]["loss"], steps[-1]["loss"])
    assert vals[-1]["val"]["loss"] < 0.3 * steps[0]["loss"]
    assert summary["val"] == vals[-1]["val"]
    final = GPTNeoX.from_pretrained(out / "final")
    assert final.config.mixers == ["attention", "attention"] and final.config.vocab_size == 128  # 64 -> 128
    assert torch.equal(final.embed_out.weight, GPTNeoX.from_pretrained(out / "ckpt").embed_out.weight)


def test_log_has_one_line_per_step_and_summary(tmp_path, data_dir):
    out = tmp_path / "run"
    train(CrossEntropy(tiny_model()), config(out, data_dir, grad_accum=2, max_tokens=7 * 2 * STEP_TOKENS))
    steps, vals = read_log(out)
    assert [r["step"] for r in steps] == list(range(1, 8))
    assert [r["tokens"] for r in steps] == [s * 2 * STEP_TOKENS for s in range(1, 8)]  # accumulation counted
    for r in steps:
        assert {"step", "tokens", "lr", "loss", "ce", "grad_norm", "tokens_per_s", "elapsed_s"} <= set(r)
        assert r["lr"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
    assert [r["step"] for r in vals] == [4, 7] and set(vals[0]["val"]) == {"loss", "ce"}  # interval, then the end
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 7 and summary["tokens"] == 14 * STEP_TOKENS and summary["val"] == vals[-1]["val"]
    assert set(summary["train"]) == {"loss", "ce"} and summary["tokens_per_s"] > 0 and summary["minutes"] > 0


def test_the_training_flag_fast_follows_fast_wanted():
    """TrainConfig.fast_on (the training scripts' --fast; training/ imports no extra) is fast.wanted's rule."""
    for choice in ("auto", "on", "off"):
        for device in ("cpu", "cuda", "cuda:1"):
            cfg = TrainConfig(out_dir="x", max_tokens=1, fast=choice)
            assert cfg.fast_on(device) == fast.wanted(choice, device), (choice, device)


@pytest.mark.parametrize("flag, on", [(None, False), ("on", True), ("off", False)])
def test_the_cpu_runs_the_plain_code_unless_fast_is_asked_for(tmp_path, data_dir, monkeypatch, flag, on):
    """--fast auto (the default) leaves a CPU run plain; --fast on installs fast/'s twins (the fused loss too). The
    choice lands in summary.json; the fast run computes the same training to rounding."""
    seen = []
    monkeypatch.setattr(finetune, "train", lambda objective, cfg, dist, **kw: seen.append(objective) or
                        train(objective, cfg, dist, **kw))
    summary = finetune.main(cli_args(tmp_path / "run", data_dir, "--mixer", "hyena", "--max-tokens", str(2 * STEP_TOKENS),
                                     "--eval-batches", "0", *(["--fast", flag] if flag else [])))
    assert (summary["fast"], summary["fast_on"]) == (flag or "auto", on)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["fast_on"] == on
    loss = seen[0].loss
    assert loss is (fast.losses.lm_loss if on else lm_loss)
    convs = {op.long_conv for op in seen[0].modules() if isinstance(op, HyenaOperator)}
    assert convs == {long_conv if on else fftconv}
    with pytest.raises(ValueError, match="--fast 'sometimes': choose one of auto, on, off"):
        config(tmp_path / "bad", data_dir, fast="sometimes")


class Interrupt(Exception):
    pass


def interrupt_at(k):
    def on_step(step):
        if step == k:
            raise Interrupt
    return on_step


def test_resume_continues_bitwise(tmp_path, data_dir):
    whole = tmp_path / "whole"
    train(CrossEntropy(tiny_model()), config(whole, data_dir))
    cut = tmp_path / "cut"
    with pytest.raises(Interrupt):  # ckpt at step 3, stopped at step 5: steps 4 and 5 are redone
        train(CrossEntropy(tiny_model()), config(cut, data_dir), on_step=interrupt_at(5))
    assert json.loads((cut / "ckpt" / "config.json").read_text())["mixers"] == ["hyena", "hyena"]
    train(CrossEntropy(tiny_model(seed=1)), config(cut, data_dir, resume=True))  # other init: weights come from ckpt
    a = GPTNeoX.from_pretrained(whole / "ckpt").state_dict()
    b = GPTNeoX.from_pretrained(cut / "ckpt").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (steps_a, vals_a), (steps_b, vals_b) = read_log(whole), read_log(cut)
    assert [r["loss"] for r in steps_a] == [r["loss"] for r in steps_b]  # no duplicated or missing steps either
    assert [r["val"] for r in vals_a] == [r["val"] for r in vals_b]


def test_resume_uses_the_new_learning_rate(tmp_path, data_dir):
    """--lr may change on resume (e.g. lower after a NaN): the optimizer must use it, not the checkpoint's."""
    cut = tmp_path / "cut"
    with pytest.raises(Interrupt):
        train(CrossEntropy(tiny_model()), config(cut, data_dir), on_step=interrupt_at(4))
    finals = []
    for i, lr in enumerate((1e-3, 1e-2)):
        run = tmp_path / f"resumed{i}"
        shutil.copytree(cut, run)
        train(CrossEntropy(tiny_model()), config(run, data_dir, resume=True, lr=lr))
        finals.append(GPTNeoX.from_pretrained(run / "ckpt").embed_out.weight)
    assert not torch.equal(*finals)


def test_resume_refuses_other_settings_and_fresh_run_refuses_existing_checkpoint(tmp_path, data_dir):
    out = tmp_path / "run"
    train(CrossEntropy(tiny_model()), config(out, data_dir, max_tokens=STEP_TOKENS, eval_batches=0))
    with pytest.raises(ValueError, match=r"\(batch_size x grad_accum x GPUs\) 4 x 1 x 1 -> 8 x 1 x 1"):
        train(CrossEntropy(tiny_model()), config(out, data_dir, batch_size=8, resume=True))
    with pytest.raises(ValueError, match="block_size 32 -> 16"):
        train(CrossEntropy(tiny_model()), config(out, data_dir, block_size=16, resume=True))
    with pytest.raises(ValueError, match="is not the model being trained"):
        train(CrossEntropy(scratch_model("tiny", "attention", VOCAB, 32)), config(out, data_dir, resume=True))
    summary = train(CrossEntropy(tiny_model()),  # the same sequences per step, split in two micro-batches: fine
                    config(out, data_dir, batch_size=2, grad_accum=2, max_tokens=2 * STEP_TOKENS, resume=True))
    assert summary["steps"] == 2
    with pytest.raises(FileExistsError, match="--resume"):
        train(CrossEntropy(tiny_model()), config(out, data_dir))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(CrossEntropy(tiny_model()), config(tmp_path / "empty", data_dir, resume=True))


def test_killed_run_leaves_loadable_checkpoint_and_resumes(tmp_path, data_dir):
    out = tmp_path / "run"
    args = cli_args(out, data_dir, "--max-tokens", "1e9", "--ckpt-interval", "1", "--eval-batches", "0")
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), *args], cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while find_checkpoint(out) is None:
            assert proc.poll() is None, stderr.read_text()
            assert time.monotonic() < deadline, "no checkpoint after 60 s"
            time.sleep(0.05)
        time.sleep(0.3)  # let it get into further saves, so the kill may land mid-write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = find_checkpoint(out)  # ckpt/, or ckpt.old/ if the kill fell between the swap's two renames
    GPTNeoX.from_pretrained(ckpt)
    step = torch.load(ckpt / "train_state.pt", weights_only=True)["step"]
    summary = finetune.main(cli_args(out, data_dir, "--max-tokens", str((step + 2) * STEP_TOKENS),
                                     "--eval-batches", "0", "--resume"))
    assert summary["steps"] == step + 2
    assert (out / "final" / "model.safetensors").is_file() and not (out / "ckpt.tmp").exists()


class NanAt(CrossEntropy):
    """Cross-entropy that turns NaN on its k-th call."""
    def __init__(self, model, k):
        super().__init__(model)
        self.calls, self.k = 0, k

    def forward(self, x, y):
        self.calls += 1
        loss, metrics = super().forward(x, y)
        return (loss * float("nan"), metrics) if self.calls == self.k else (loss, metrics)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
    out, good = tmp_path / "run", {}
    def snapshot(step):
        good[step] = {k: v.clone() for k, v in objective.model.state_dict().items()}
    objective = NanAt(tiny_model(), k=3)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan .* at step 3.*--lr.*--resume.*ckpt \(step 2\)"):
        train(objective, config(out, data_dir, ckpt_interval=2, eval_batches=0), on_step=snapshot)
    state = torch.load(out / "ckpt" / "train_state.pt", weights_only=True)
    assert state["step"] == 2 and not (out / "summary.json").exists()
    saved = GPTNeoX.from_pretrained(out / "ckpt").state_dict()
    assert all(torch.equal(saved[k], good[2][k]) for k in saved)
    assert all(torch.equal(v, good[2][k]) for k, v in objective.model.state_dict().items())  # no NaN step taken


def test_optimizer_groups_spare_hyena_filters_from_decay(tmp_path):
    teacher = scratch_model("tiny", "attention", VOCAB, 32)
    student = make_student(teacher, layers=[1], filter_lr=1e-2)
    cfg = TrainConfig(out_dir=str(tmp_path), max_tokens=1, weight_decay=0.1, lr=3e-3)
    group_of = {id(p): g for g in build_optimizer(student, cfg).param_groups for p in g["params"]}
    hyena = student.gpt_neox.layers[1].hyena
    for name, p in hyena.filter_fn.named_parameters():  # the positional embedding z keeps safari's lr 1e-5
        lr = 1e-5 if name == "pos_emb.z" else 1e-2
        assert group_of[id(p)]["weight_decay"] == 0.0 and group_of[id(p)]["base_lr"] == lr, name
    mlp = student.gpt_neox.layers[0].mlp
    for p in (hyena.in_proj.weight, student.gpt_neox.embed_in.weight, mlp.dense_h_to_4h.weight):
        assert group_of[id(p)]["weight_decay"] == 0.1 and group_of[id(p)]["base_lr"] == 3e-3
    assert group_of[id(hyena.in_proj.bias)]["weight_decay"] == 0.0


def test_filter_parameters_get_their_own_optimizer_group():
    teacher = scratch_model("tiny", "attention", VOCAB, 32)
    student = make_student(teacher, layers=[1], filter_lr=3e-4)
    groups = optim_groups(student, weight_decay=0.1, lr=1e-3)
    filter_params = {id(p) for p in student.gpt_neox.layers[1].hyena.filter_fn.parameters()}
    assert len(filter_params) > 1
    by = {(g["weight_decay"], g["lr"]): len(g["params"]) for g in groups}
    assert by[(0.0, 3e-4)] == len(filter_params) - 1 and (0.1, 1e-3) in by and (0.0, 1e-3) in by
    assert by[(0.0, 1e-5)] == 1  # the positional embedding z, at safari's lr_pos_emb
    # the settings come from the operator's filter_lr and its filter, not from attributes monkey-patched onto
    # the parameters
    assert not any(vars(p) for p in student.parameters())


def test_finetune_clear_errors(tmp_path, data_dir):
    small = tmp_path / "config.json"
    small.write_text(json.dumps({**to_hf(scratch_model("tiny", None, VOCAB, 32).config), "vocab_size": 32}))
    with pytest.raises(ValueError, match="vocab_size 32"):
        finetune.main(cli_args(tmp_path / "a", data_dir, "--max-tokens", "1000", "--config", str(small)))
    with pytest.raises(FileNotFoundError, match="prepare.py"):
        finetune.main(cli_args(tmp_path / "b", tmp_path / "nodata", "--max-tokens", "1000"))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        finetune.main(["--init", str(tmp_path / "missing"), "--data", str(data_dir), "--max-tokens", "1000"])
    with pytest.raises(ValueError, match="--init scratch"):
        finetune.main(["--init", str(tmp_path / "missing"), "--config", "tiny", "--data", str(data_dir),
                       "--max-tokens", "1000"])


def test_flags_presets_and_overrides():
    args = finetune.parse_args(["--init", "scratch", "--preset", "tiny", "--batch-size", "2", "--max-tokens", "5e5"])
    cfg = train_config_from_args(args)
    assert (cfg.batch_size, cfg.block_size, cfg.max_tokens, cfg.out_dir) == (2, 128, 500_000, "out/tiny")
    parser = argparse.ArgumentParser()
    add_train_args(parser, lr=1e-3, out_dir="out/x")
    cfg = train_config_from_args(parser.parse_args(["--max-minutes", "2", "--compile", "on"]))
    assert (cfg.lr, cfg.out_dir, cfg.max_minutes, cfg.compile, cfg.max_tokens) == (1e-3, "out/x", 2.0, "on", 0)
    assert train_config_from_args(parser.parse_args(["--max-minutes", "2"])).compile == "auto"
    with pytest.raises(ValueError, match="--max-tokens and/or --max-minutes"):
        train_config_from_args(parser.parse_args([]))


def test_two_process_ddp_on_cpu_trains_and_matches_the_budget(tmp_path, data_dir):
    """torchrun with 2 gloo processes: the same script, the same flags; every rank's gradients sync (a frozen or
    unused parameter would make DDP fail here), only rank 0 writes, tokens count both ranks."""
    out = tmp_path / "ddp"
    args = cli_args(out, data_dir, "--max-tokens", str(6 * 2 * STEP_TOKENS), "--eval-batches", "1",
                    "--mixer", "hyena")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(ROOT / "finetune.py"), *args], cwd=ROOT, check=True, capture_output=True, timeout=120,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    steps, _ = read_log(out)
    assert [r["step"] for r in steps] == list(range(1, 7)) and steps[-1]["tokens"] == 6 * 2 * STEP_TOKENS
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world"] == 2 and GPTNeoX.from_pretrained(out / "final").config.mixers == ["hyena", "hyena"]


def test_compile_is_auto_by_default_and_a_failed_compile_trains_eagerly(tmp_path, data_dir, monkeypatch,
                                                                                  capsys):
    """--compile auto by default, which compiles on CUDA only (so this CPU run is eager); when compiling fails (here: a compiler that raises on the first
    call), the run warns once, trains eagerly to the same numbers, and its summary says it ran eagerly."""
    eager = train(CrossEntropy(tiny_model()), config(tmp_path / "eager", data_dir))
    assert eager["compiled"] is False

    class Broken(torch.nn.Module):
        def forward(self, x, y):
            raise RuntimeError("inductor: no working C compiler")
    monkeypatch.setattr(torch, "compile", lambda module: Broken())
    fallback = train(CrossEntropy(tiny_model()), config(tmp_path / "fallback", data_dir, compile="on"))
    assert "torch.compile failed (RuntimeError: inductor: no working C compiler)" in capsys.readouterr().err
    assert fallback["compiled"] is False and fallback["val"] == eager["val"]


def test_validation_runs_eagerly_and_outside_the_minutes_budget(tmp_path, data_dir, monkeypatch):
    """A --max-minutes budget counts the training steps only: validating (eagerly, on the objective itself, not
    its compiled twin) and checkpointing are set aside like compiling, so how often a run validates does not
    change how much it trains."""
    import train as train_module
    objective, seen, real = CrossEntropy(tiny_model()), [], train_module.validation_metrics

    def slow_validation(obj, *args):
        seen.append(obj)
        time.sleep(0.05)
        return real(obj, *args)
    monkeypatch.setattr(train_module, "validation_metrics", slow_validation)
    monkeypatch.setattr(train_module, "compile_or_eager", lambda obj, *a: lambda x, y: obj(x, y))  # a stand-in twin
    cfg = config(tmp_path / "run", data_dir, max_tokens=0, max_minutes=0.005, eval_interval=1, compile="on")
    summary = train(objective, cfg)
    assert seen and all(obj is objective for obj in seen)
    assert summary["aside_s"] >= 0.05 * summary["steps"]  # every step validated, and none of it in the budget
    assert 0.3 <= summary["minutes"] * 60 < 0.3 + 0.2
