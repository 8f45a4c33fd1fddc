"""distill.py: every alignment mode lowers what it optimises; what each computes, to its definition, is
test_distill_semantics.py's (the KD loss's fused twin: test_losses.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import distill
from hyena import Config, GPTNeoX, make_student
from modal.student import load_pretrained, to_modal
from distill import plan_stages
from training import DistillConfig, TrainConfig

TINY = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, vocab_size=64,
            max_position_embeddings=32)


def write_tokens(root, name="toy", vocab=64, n=20000, seed=0):
    """A prepared dataset in data.py's format: a noisy repeating pattern, so there is something to learn."""
    rng = np.random.default_rng(seed)
    base = np.tile(np.arange(vocab, dtype=np.uint16), n // vocab + 1)[:n]
    toks = np.where(rng.random(n) < 0.1, rng.integers(0, vocab, n), base).astype(np.uint16)
    d = root / name
    d.mkdir(parents=True)
    splits = {"train": toks[: n * 9 // 10], "val": toks[n * 9 // 10:]}
    for split, t in splits.items():
        t.tofile(d / f"{split}.bin")
    meta = {"splits": {s: {"tokens": len(t), "documents": 1} for s, t in splits.items()}, "vocab_size": vocab,
            "tokenizer": "toy", "tokenizer_sha256": "0" * 64, "dtype": "uint16", "command": "test"}
    (d / "meta.json").write_text(json.dumps(meta))
    return d


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    teacher = GPTNeoX(Config(**TINY))
    teacher.save_pretrained(tmp_path / "teacher")
    write_tokens(tmp_path / "data")
    common = ["--teacher", str(tmp_path / "teacher"), "--data", "toy", "--data-root", str(tmp_path / "data"),
              "--batch-size", "4", "--block-size", "32", "--eval-interval", "1000", "--eval-batches", "2",
              "--log-interval", "1000", "--ckpt-interval", "1000"]
    return tmp_path, common


def log(path):
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r and "val" not in r]


def test_each_progressive_stage_lowers_its_layers_mse(setup):
    tmp, common = setup
    distill.main(common + ["--layers", "progressive", "--init", "random", "--max-tokens", str(2 * 40 * 4 * 32),
                           "--lr", "3e-3", "--out-dir", str(tmp / "out")])
    for layer in range(2):
        rows = log(tmp / "out" / f"stage-{layer:02d}" / "log.jsonl")
        first, last = rows[0][f"mse_{layer}"], np.mean([r[f"mse_{layer}"] for r in rows[-5:]])
        print(f"stage {layer}: relative MSE {first:.3f} -> {last:.3f} over {len(rows)} steps")
        assert last < 0.8 * first  # stage 1 keeps the error its input inherits from stage 0
    student = GPTNeoX.from_pretrained(tmp / "out" / "final")
    assert student.config.mixers == ["hyena", "hyena"]


@pytest.mark.parametrize("mode", ["joint", "independent"])
def test_joint_and_independent_lower_the_summed_mse(setup, mode):
    tmp, common = setup
    distill.main(common + ["--layers", mode, "--init", "random", "--max-tokens", str(40 * 4 * 32), "--lr", "3e-3",
                           "--out-dir", str(tmp / mode)])
    rows = log(tmp / mode / mode / "log.jsonl")
    assert {"mse_0", "mse_1"} <= set(rows[0])
    assert np.mean([r["loss"] for r in rows[-5:]]) < 0.7 * rows[0]["loss"]


def test_end_to_end_stage_lowers_kl(setup):
    tmp, common = setup
    distill.main(common + ["--layers", "none", "--init", "random", "--e2e-tokens", str(40 * 4 * 32), "--e2e-lr", "3e-3",
                           "--out-dir", str(tmp / "e2e")])
    rows = log(tmp / "e2e" / "e2e" / "log.jsonl")
    assert np.mean([r["kd"] for r in rows[-5:]]) < 0.7 * rows[0]["kd"]


def test_a_branch_shares_the_alignment_and_finishes_only_the_end_to_end_stage(setup):
    """--branches belong to the last stage: the run finishes the end-to-end stage of each branch in its folder, which
    starts with the finished alignment stage; the branch's final/ and distill_summary.json are written by distill
    itself, its settings the run's with the branch's end-to-end budget. A budget the last stage cannot branch is
    refused before any stage trains, naming that stage's flag."""
    tmp, common = setup
    step = 4 * 32
    args = common + ["--init", "teacher", "--layers", "independent", "--max-tokens", str(2 * step),
                     "--schedule", "wsd", "--warmup-frac", "0", "--lr", "3e-3"]
    distill.main(args + ["--e2e-tokens", str(10 * step), "--branches", str(5 * step), "--out-dir", str(tmp / "b")])
    branch = tmp / f"b@{5 * step}"
    assert [r["step"] for r in log(branch / "e2e" / "log.jsonl")] == [1, 2, 3, 4, 5]
    assert len(log(branch / "independent" / "log.jsonl")) == 2  # shared, not trained again
    summary = json.loads((branch / "distill_summary.json").read_text())
    assert summary["stages"]["e2e"]["tokens"] == 5 * step and (branch / "final" / "training_data.json").exists()
    assert summary["args"]["e2e_tokens"] == 5 * step and summary["args"]["max_tokens"] == 2 * step
    assert summary["args"]["lr"] == 3e-3 and summary["args"]["out_dir"] == str(branch)
    for bad, flag in (([str(10 * step)], "--e2e-tokens 1280"), ([str(3 * step), "--e2e-tokens", "0"], "progressive")):
        with pytest.raises(ValueError, match=flag):
            distill.main(common + ["--max-tokens", str(6 * step), "--schedule", "wsd", "--e2e-tokens",
                                   str(10 * step), "--branches", *bad, "--out-dir", str(tmp / "bad")])
        assert not (tmp / "bad" / "stage-00").exists()


def test_clear_errors(setup):
    tmp, common = setup
    with pytest.raises(ValueError, match="--hyena-layers 'x' must be"):
        distill.main(common + ["--hyena-layers", "x", "--max-tokens", "100"])
    with pytest.raises(ValueError, match="--block-size 64 exceeds"):
        distill.main([*common, "--block-size", "64", "--max-tokens", "100"])
    with pytest.raises(ValueError, match="no budget"):  # an explicit 0 is no budget; none given is the default's
        distill.main(common + ["--max-tokens", "0"])
    with pytest.raises(ValueError, match="nothing to do"):
        distill.main([*common, "--layers", "none", "--max-tokens", "100"])


def test_progressive_and_end_to_end_under_two_process_ddp(setup):
    """torchrun, 2 gloo processes: stages freeze all but one layer, which DDP must accept; rank 0 saves final/."""
    tmp, common = setup
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(root / "distill.py"), *common, "--device", "cpu", "--layers", "progressive", "--train",
                    "block", "--max-tokens", str(2 * 2 * 4 * 4 * 32), "--e2e-tokens", str(2 * 4 * 4 * 32),
                    "--out-dir", str(tmp / "ddp")], cwd=root, check=True, capture_output=True, timeout=120,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    for stage in ("stage-00", "stage-01", "e2e"):
        assert json.loads((tmp / "ddp" / stage / "summary.json").read_text())["world"] == 2
    assert GPTNeoX.from_pretrained(tmp / "ddp" / "final").config.mixers == ["hyena", "hyena"]


def test_modal_conversion_then_kl_repair(setup):
    """--modal-state converts a Hyena student (its own teacher), writes the filter errors, repairs by KL."""
    tmp, common = setup
    student = make_student(GPTNeoX.from_pretrained(tmp / "teacher"))
    student.save_pretrained(tmp / "conv")
    common = [a if a != str(tmp / "teacher") else str(tmp / "conv") for a in common]
    distill.main(common + ["--modal-state", "4", "--layers", "none", "--out-dir", str(tmp / "only")])
    fit = json.loads((tmp / "only" / "modal_fit.json").read_text())["layers"]
    assert [f["layer"] for f in fit] == [0, 1] and all(0 <= f["rel_error"] < 1 for f in fit)
    converted = load_pretrained(tmp / "only" / "final")
    assert converted.config.hyena_modal_state == [4, 4] and not (tmp / "only" / "e2e").exists()
    distill.main(common + ["--modal-tol", "1e-2", "--modal-max-state", "8", "--layers", "none", "--e2e-tokens",
                           str(20 * 4 * 32), "--e2e-lr", "3e-3", "--out-dir", str(tmp / "repair")])
    rows = log(tmp / "repair" / "e2e" / "log.jsonl")
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
    repaired = load_pretrained(tmp / "repair" / "final")
    fresh = to_modal(student, state_size=None, tol=1e-2, max_state=8)  # the fit is deterministic
    assert repaired.config.hyena_modal_state == fresh.config.hyena_modal_state
    assert all(d in (1, 2, 4, 8) for d in repaired.config.hyena_modal_state)
    before = load_pretrained(tmp / "repair" / "converted")  # saved before the repair, for comparison
    for name in ("log_decay", "angle", "residues"):  # poles and residues trained in the repair
        assert torch.equal(getattr(before.gpt_neox.layers[0].hyena.filter_fn, name),
                           getattr(fresh.gpt_neox.layers[0].hyena.filter_fn, name)), name
        assert not torch.equal(getattr(repaired.gpt_neox.layers[0].hyena.filter_fn, name),
                               getattr(fresh.gpt_neox.layers[0].hyena.filter_fn, name)), name
    with pytest.raises(ValueError, match="not both"):
        distill.main(common + ["--modal-state", "4", "--modal-tol", "1e-3", "--layers", "none", "--out-dir",
                               str(tmp / "x")])
    with pytest.raises(ValueError, match="all attention"):
        distill.main([a if a != str(tmp / "conv") else str(tmp / "teacher") for a in common]
                     + ["--modal-state", "4", "--layers", "none", "--out-dir", str(tmp / "y")])


def test_stages_are_planned_from_the_config():
    """progressive: one stage per Hyena layer, the budget split evenly; then the end-to-end stage with its own
    budget and lr. DistillConfig refuses contradictions by flag."""
    cfg = TrainConfig(out_dir="x", max_tokens=300, max_minutes=6.0, lr=1e-3)
    dcfg = DistillConfig(teacher="t", e2e_tokens=50, e2e_lr=2e-4, train="block")
    stages = plan_stages(dcfg, cfg, [0, 2, 3])
    assert [(s.name, s.mode, s.layer, s.trains, s.layers) for s in stages] == [
        ("stage-00", "progressive", 0, "block", [0]), ("stage-02", "progressive", 2, "block", [2]),
        ("stage-03", "progressive", 3, "block", [3]), ("e2e", "e2e", None, "all", [0, 2, 3])]
    assert [(s.cfg.max_tokens, s.cfg.max_minutes, s.cfg.lr) for s in stages] == [(100, 2.0, 1e-3)] * 3 + [(50, 0.0, 2e-4)]
    joint = plan_stages(DistillConfig(teacher="t", layers="joint"), cfg, [1])
    assert [(s.name, s.mode, s.layers, s.cfg) for s in joint] == [("joint", "joint", [1], cfg)]
    with pytest.raises(ValueError, match="--kd-temperature must be > 0"):
        DistillConfig(teacher="t", kd_temperature=0)
    with pytest.raises(ValueError, match="nothing to do: --layers none"):
        DistillConfig(teacher="t", layers="none")
