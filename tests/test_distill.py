"""distill.py: every alignment mode lowers what it optimises; the chunked KD loss is the plain KD loss."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import distill
from config import Config
from hyena import GPTNeoX, make_student, to_modal
from train import TrainConfig

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


@pytest.mark.parametrize("temperature, ce_weight", [(1.0, 0.0), (2.0, 0.5)])
def test_fused_chunked_kd_loss_equals_plain_kd_loss(temperature, ce_weight):
    """Value and every gradient (hidden states, final LayerNorm, unembedding) match autograd on full logits."""
    torch.manual_seed(0)
    teacher = GPTNeoX(Config(**TINY))
    student = make_student(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hs = torch.randn(3, 7, 32, requires_grad=True)
    ht, y = torch.randn(3, 7, 32), torch.randint(0, 64, (3, 7))
    y[0, :3] = -1  # ignored positions
    params = [hs, student.embed_out.weight, student.gpt_neox.final_layer_norm.weight]

    fused = distill.kd_loss(hs, ht, y, student, teacher, temperature, ce_weight, chunk=5)
    g_fused = torch.autograd.grad(fused, params)
    zt, zs = teacher.head(ht) / temperature, student.head(hs) / temperature
    kl = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True, reduction="none").sum(-1)
    ce = F.cross_entropy((zs * temperature).flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
    plain = (temperature ** 2 * kl.sum() + ce_weight * ce) / y.numel()
    g_plain = torch.autograd.grad(plain, params)
    assert torch.allclose(fused, plain, rtol=1e-5)
    for a, b in zip(g_fused, g_plain):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_clear_errors(setup):
    tmp, common = setup
    with pytest.raises(ValueError, match="--hyena-layers 'x' must be"):
        distill.main(common + ["--hyena-layers", "x", "--max-tokens", "100"])
    with pytest.raises(ValueError, match="--block-size 64 exceeds"):
        distill.main([*common, "--block-size", "64", "--max-tokens", "100"])
    with pytest.raises(ValueError, match="no budget"):
        distill.main(common)
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


def test_loss_chunk_falls_back_to_eager_when_compiling_fails(monkeypatch):
    """On CUDA the loss chunk runs compiled; where inductor cannot work, it warns once and runs eagerly."""
    from fast import losses

    def broken_compile(fn):
        def run(*args):
            raise RuntimeError("no working C compiler")
        return run
    monkeypatch.setattr(losses.torch, "compile", broken_compile)
    losses._compiled_chunk_fn.cache_clear()
    try:
        fn = losses._compiled_chunk_fn()
        zs, zt, tgt = torch.randn(4, 11), torch.randn(4, 11), torch.randint(11, (4,))
        with pytest.warns(UserWarning, match="running it eagerly"):
            loss, grad = fn(zs, tgt, 1.0, zt, 2.0)
        ref = losses.chunk_loss_and_grad(zs, tgt, 1.0, zt, 2.0)
        assert torch.equal(loss, ref[0]) and torch.equal(grad, ref[1])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # stays eager, without warning again
            assert torch.equal(fn(zs, tgt, 1.0, zt, 2.0)[1], ref[1])
    finally:
        losses._compiled_chunk_fn.cache_clear()


def test_modal_conversion_then_kl_repair(setup):
    """--modal-state converts a Hyena student (its own teacher), writes the filter errors, repairs by KL."""
    tmp, common = setup
    student = make_student(GPTNeoX.from_pretrained(tmp / "teacher"))
    student.save_pretrained(tmp / "conv")
    common = [a if a != str(tmp / "teacher") else str(tmp / "conv") for a in common]
    distill.main(common + ["--modal-state", "4", "--layers", "none", "--out-dir", str(tmp / "only")])
    fit = json.loads((tmp / "only" / "modal_fit.json").read_text())["layers"]
    assert [f["layer"] for f in fit] == [0, 1] and all(0 <= f["rel_error"] < 1 for f in fit)
    converted = GPTNeoX.from_pretrained(tmp / "only" / "final")
    assert converted.config.hyena_modal_state == [4, 4] and not (tmp / "only" / "e2e").exists()
    distill.main(common + ["--modal-tol", "1e-2", "--modal-max-state", "8", "--layers", "none", "--e2e-tokens",
                           str(20 * 4 * 32), "--e2e-lr", "3e-3", "--out-dir", str(tmp / "repair")])
    rows = log(tmp / "repair" / "e2e" / "log.jsonl")
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
    repaired = GPTNeoX.from_pretrained(tmp / "repair" / "final")
    fresh = to_modal(student, state_size=None, tol=1e-2, max_state=8)  # the fit is deterministic
    assert repaired.config.hyena_modal_state == fresh.config.hyena_modal_state
    assert all(d in (1, 2, 4, 8) for d in repaired.config.hyena_modal_state)
    before = GPTNeoX.from_pretrained(tmp / "repair" / "converted")  # saved before the repair, for comparison
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


@pytest.mark.skipif(sys.platform != "linux", reason="page-fault counts and mallopt are glibc/Linux specifics")
def test_cpu_loss_steps_do_not_page_fault_their_memory_in_again():
    """A CPU step of KD on a 50k vocabulary (512 tokens: 100 MB of logits) reuses memory freed by the last step:
    the loss's chunks stay under glibc's largest heap block and train.keep_freed_memory stops heap trimming,
    instead of every step mmap-ing, page-faulting and unmapping its logits again. In a fresh process, as a
    training run is (the test process's heap holds whatever earlier tests left)."""
    code = """if True:
        import resource, torch, train
        from fast.losses import FusedHeadLoss, default_chunk
        assert default_chunk(torch.device("cpu"), 50304) * 50304 * 4 < 32 << 20
        assert train.keep_freed_memory()
        g = torch.Generator().manual_seed(0)
        xs = torch.randn(512, 16, generator=g, requires_grad=True)
        ws = (0.1 * torch.randn(50304, 16, generator=g)).requires_grad_()
        xt, wt = torch.randn(512, 16, generator=g), 0.1 * torch.randn(50304, 16, generator=g)
        tgt, chunk = torch.zeros(512).long(), default_chunk(xs.device, ws.shape[0])
        step = lambda: FusedHeadLoss.apply(xs, ws, tgt, 0.5, xt, wt, 2.0, chunk, True).backward()
        for _ in range(3):  # the heap grows to what a step needs
            step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            step()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * resource.getpagesize())
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    faulted = int(out.stdout.split()[-1])
    # one step's logits are 100 MB; the churn this guards against faulted in about 3 GB a step
    assert faulted < 512 * 50304 * 4, f"{faulted / 1e6:.0f} MB page-faulted in by 3 steps"


def test_stages_are_planned_from_the_config():
    """progressive: one stage per Hyena layer, the budget split evenly; then the end-to-end stage with its own
    budget and lr. DistillConfig refuses contradictions by flag."""
    cfg = TrainConfig(out_dir="x", max_tokens=300, max_minutes=6.0, lr=1e-3)
    dcfg = distill.DistillConfig(teacher="t", e2e_tokens=50, e2e_lr=2e-4, train="block")
    stages = distill.plan_stages(dcfg, cfg, [0, 2, 3])
    assert [(s.name, s.mode, s.layer, s.trains, s.layers) for s in stages] == [
        ("stage-00", "progressive", 0, "block", [0]), ("stage-02", "progressive", 2, "block", [2]),
        ("stage-03", "progressive", 3, "block", [3]), ("e2e", "e2e", None, "all", [0, 2, 3])]
    assert [(s.cfg.max_tokens, s.cfg.max_minutes, s.cfg.lr) for s in stages] == [(100, 2.0, 1e-3)] * 3 + [(50, 0.0, 2e-4)]
    joint = distill.plan_stages(distill.DistillConfig(teacher="t", layers="joint"), cfg, [1])
    assert [(s.name, s.mode, s.layers, s.cfg) for s in joint] == [("joint", "joint", [1], cfg)]
    with pytest.raises(ValueError, match="--kd-temperature must be > 0"):
        distill.DistillConfig(teacher="t", kd_temperature=0)
    with pytest.raises(ValueError, match="nothing to do: --layers none"):
        distill.DistillConfig(teacher="t", layers="none")
