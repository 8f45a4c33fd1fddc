"""What distill.py computes, held to its definition (issue 27): each test fails under one deliberate mistake,
named in its docstring. test_distill.py runs the modes; here a 3-layer teacher and an all-Hyena student, whose
layers compute other functions than the teacher's, make every wrong input, target or weight visible.

  progressive stage l   rel_mse(student layer l(the student's own layer l-1 output), the teacher's layer l output)
  a stage               moves exactly the parameters it trains; the teacher never moves
  the teacher           frozen and in eval mode inside every training step
  end to end            tau^2 KL(teacher || student) per token, both the plain loss and its fused twin
  accumulation          8 sequences x 1 micro-batch = 4 x 2, in loss and gradient norm
  relative MSE          mse / mean(target^2): scale-free
  window streams        each stage and each --data-stream its own; summaries count the unique tokens read
"""
import copy
import json

import numpy as np
import pytest
import torch

import data
import distill
import fast.losses
import modal.student
from hyena import Config, GPTNeoX, make_student
from test_distill import TINY, write_tokens

STEP = 4 * 32  # tokens per step: batch 4, block 32
RANDOM_BATCH = data.random_batch  # the sampler train.py calls, before any test wraps it


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    teacher = GPTNeoX(Config(**{**TINY, "num_hidden_layers": 3}))
    with torch.no_grad():  # logits of order 1 (not GPT-NeoX's initial ~0.01): far from uniform, so a KD mistake shows
        teacher.embed_out.weight.mul_(100)
    teacher.save_pretrained(tmp_path / "teacher")
    write_tokens(tmp_path / "data")
    common = ["--teacher", str(tmp_path / "teacher"), "--data", "toy", "--data-root", str(tmp_path / "data"),
              "--batch-size", "4", "--block-size", "32", "--eval-batches", "0", "--log-interval", "1000",
              "--ckpt-interval", "1000", "--init", "random"]
    return tmp_path, common


def steps(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def spy_on_stages(monkeypatch, seen):
    """distill.train records, in seen[stage] as each stage starts, its objective and a copy of the student."""
    real = distill.train

    def train(objective, cfg, dist, stage="", **kw):
        seen[stage] = {"objective": objective, "student": copy.deepcopy(objective.model)}
        return real(objective, cfg, dist, stage=stage, **kw)
    monkeypatch.setattr(distill, "train", train)


def record_windows(monkeypatch, into):
    """Appends to `into` every batch train.py draws, as (x, y, starts): the starts read off the sampler itself."""

    class Recorder:  # the sampler's generator, noting each draw
        def __init__(self, rng):
            self.rng, self.starts = rng, None

        def integers(self, *args, **kw):
            self.starts = self.rng.integers(*args, **kw)
            return self.starts

    def random_batch(tokens, batch_size, block_size, rng, device="cpu"):
        rec = Recorder(rng)
        x, y = RANDOM_BATCH(tokens, batch_size, block_size, rec, device)
        assert np.array_equal(x.numpy(), tokens[rec.starts[:, None] + np.arange(block_size)])  # what was read
        into.append((x, y, rec.starts))
        return x, y
    monkeypatch.setattr(data, "random_batch", random_batch)


def rel_mse_by_hand(out, target):
    out, target = out.double(), target.double()
    return ((out - target) ** 2).mean() / (target ** 2).mean()


def test_relative_mse_divides_by_the_targets_mean_square_so_it_is_scale_free():
    """Mutation caught: rel_mse without its division (a plain MSE)."""
    g = torch.Generator().manual_seed(0)
    out, target = torch.randn(2, 5, 8, generator=g), 3 * torch.randn(2, 5, 8, generator=g)
    want = rel_mse_by_hand(out, target).item()
    assert distill.rel_mse(out, target).item() == pytest.approx(want, rel=1e-6)
    for c in (1e-3, 1e3):  # the residual stream's scale, which grows with depth, drops out
        assert distill.rel_mse(c * out, c * target).item() == pytest.approx(want, rel=1e-5)


def test_progressive_stage_maps_the_students_own_lower_layers_to_the_teachers_layer_output(setup):
    """Stage l's loss is rel_mse(layer l of the student applied to the student's own layer l-1 output, the teacher's
    layer l output). Mutations caught: the teacher's hidden state fed in; the target one layer early or late."""
    tmp, _ = setup
    teacher = GPTNeoX.from_pretrained(tmp / "teacher").eval()
    torch.manual_seed(1)
    student = make_student(teacher, init="random")  # Hyena everywhere: its layer outputs are not the teacher's
    x = torch.randint(0, 64, (2, 32))
    loss, metrics = distill.Distill(teacher, student, "progressive", layer=1).train()(x, x)
    with torch.no_grad():
        th, sh = teacher.hidden_states(x), student.hidden_states(x)  # [embedding, layer 0's output, ...]
        layer = student.gpt_neox.layers[1]
        want = rel_mse_by_hand(layer(sh[1]), th[2])
        wrong = {"teacher's input": rel_mse_by_hand(layer(th[1]), th[2]),
                 "target a layer early": rel_mse_by_hand(layer(sh[1]), th[1]),
                 "target a layer late": rel_mse_by_hand(layer(sh[1]), th[3])}
    assert loss.item() == pytest.approx(want.item(), rel=1e-5) and metrics["mse_1"] == loss
    for what, value in wrong.items():  # the example tells each mistake apart
        assert abs(value / want - 1) > 0.05, what


def test_each_stage_moves_exactly_the_parameters_it_trains(setup, monkeypatch):
    """A progressive stage (--train mixer) moves layer l's Hyena operator and nothing else; the end-to-end stage
    with --e2e-train mixer every operator and nothing else; the teacher nothing. Mutation caught: set_trainable
    leaving other parameters trainable."""
    tmp, common = setup
    seen, moved = {}, {}
    spy_on_stages(monkeypatch, seen)
    distill.main(common + ["--layers", "progressive", "--max-tokens", str(3 * 3 * STEP), "--e2e-tokens", str(3 * STEP),
                           "--e2e-train", "mixer", "--out-dir", str(tmp / "out")])
    final = GPTNeoX.from_pretrained(tmp / "out" / "final").state_dict()
    names = [n for n, _ in seen["stage-00"]["student"].named_parameters()]  # (a shared module's once)
    for stage, after in zip(seen, [s["student"].state_dict() for s in list(seen.values())[1:]] + [final]):
        before = seen[stage]["student"].state_dict()
        moved[stage] = {n for n in names if not torch.equal(before[n], after[n])}
    mixer = {l: {n for n in names if n.startswith(f"gpt_neox.layers.{l}.hyena.")} for l in range(3)}
    trains = {"stage-00": mixer[0], "stage-01": mixer[1], "stage-02": mixer[2], "e2e": mixer[0] | mixer[1] | mixer[2]}
    assert list(moved) == list(trains)
    for stage in trains:
        assert moved[stage] == trains[stage], (stage, "moved but not trained:", moved[stage] - trains[stage],
                                               "trained but did not move:", trains[stage] - moved[stage])
    teacher = GPTNeoX.from_pretrained(tmp / "teacher").state_dict()
    assert all(torch.equal(p, teacher[n]) for n, p in seen["e2e"]["objective"].teacher.state_dict().items())


def test_the_teacher_is_frozen_and_in_eval_mode_inside_every_training_step(setup, monkeypatch):
    """Forward pre-hooks on every module of the teacher see it in eval mode with no parameter requiring a gradient,
    in every stage's steps; no teacher parameter gets a .grad. Mutations caught: Distill.train's override removed
    (train() switching the objective to training reaches the teacher); the teacher's requires_grad_(False) removed."""
    tmp, common = setup
    calls, teachers = [], []
    load = modal.student.load_pretrained  # distill() imports it when it runs

    def load_and_watch(path, revision="main"):
        model = load(path, revision)
        teachers.append(model)
        for m in model.modules():
            m.register_forward_pre_hook(lambda m, args: calls.append(
                (m.training, any(p.requires_grad for p in m.parameters(recurse=False)))))
        return model
    monkeypatch.setattr(modal.student, "load_pretrained", load_and_watch)
    distill.main(common + ["--layers", "progressive", "--max-tokens", str(3 * 2 * STEP), "--e2e-tokens", str(2 * STEP),
                           "--out-dir", str(tmp / "out")])  # --eval-batches 0: every call is inside a training step
    assert len(teachers) == 1 and len(calls) > 4 * 2 * 3  # 4 stages of 2 steps, several modules each
    assert {training for training, _ in calls} == {False}
    assert {grad for _, grad in calls} == {False}
    assert all(p.grad is None and not p.requires_grad for p in teachers[0].parameters())


def log_softmax_by_hand(z):
    z = z - z.max(-1, keepdim=True).values
    return z - z.exp().sum(-1, keepdim=True).log()


@pytest.mark.parametrize("fast_flag", ["off", "on"])
def test_end_to_end_loss_is_tau_squared_kl_of_teacher_to_student(setup, monkeypatch, fast_flag):
    """The first end-to-end step's logged loss at --kd-temperature 2 equals tau^2 mean over tokens of
    sum_v p_t (log p_t - log p_s), p = softmax(logits / tau), from the two models' logits in fp64 by hand: the plain
    loss (distill.kd_loss) and, --fast on, its fused twin (fast.losses.kd_loss). Mutations caught: tau^2 dropped;
    the KL reversed (student || teacher); the teacher's logits not divided by tau."""
    tmp, common = setup
    seen, batches = {}, []
    spy_on_stages(monkeypatch, seen)
    record_windows(monkeypatch, batches)
    distill.main(common + ["--layers", "none", "--e2e-tokens", str(STEP), "--kd-temperature", "2", "--fast", fast_flag,
                           "--out-dir", str(tmp / "out")])
    assert seen["e2e"]["objective"].kd is (fast.losses.kd_loss if fast_flag == "on" else distill.kd_loss)
    x, _, _ = batches[0]
    tau = 2.0
    with torch.no_grad():
        zs = seen["e2e"]["student"](x)[0].double()  # (B, L, V): the student as the step found it
        zt = seen["e2e"]["objective"].teacher(x)[0].double()
    log_pt, log_ps = log_softmax_by_hand(zt / tau), log_softmax_by_hand(zs / tau)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()  # per token, averaged over the B x L positions
    assert steps(tmp / "out" / "e2e")[0]["loss"] == pytest.approx(tau ** 2 * kl.item(), rel=1e-5)


def test_accumulating_two_micro_batches_of_4_equals_one_batch_of_8(setup, monkeypatch):
    """One end-to-end step of batch 8 and one of batch 4 x --grad-accum 2 read the same windows in the same order
    (the sampler draws batch-size starts per micro-batch) and log the same loss and gradient norm. Mutation caught:
    the micro-batch loss not divided by --grad-accum before backward."""
    tmp, common = setup
    runs = {}
    for name, batch, accum in (("8x1", "8", "1"), ("4x2", "4", "2")):
        runs[name] = []
        record_windows(monkeypatch, runs[name])
        distill.main(common + ["--layers", "none", "--e2e-tokens", str(8 * 32), "--batch-size", batch, "--grad-accum",
                               accum, "--out-dir", str(tmp / name)])
    assert [len(runs["8x1"]), len(runs["4x2"])] == [1, 2]
    assert torch.equal(runs["8x1"][0][0], torch.cat([x for x, _, _ in runs["4x2"]]))
    one, two = steps(tmp / "8x1" / "e2e"), steps(tmp / "4x2" / "e2e")
    assert len(one) == len(two) == 1
    assert one[0]["loss"] == pytest.approx(two[0]["loss"], rel=1e-5)
    assert one[0]["grad_norm"] == pytest.approx(two[0]["grad_norm"], rel=1e-5)


def test_each_stage_and_each_data_stream_draws_its_own_windows_and_summaries_count_them(setup, monkeypatch):
    """Within a run, every stage reads other windows; the same run repeated reads the same ones, stage by stage;
    another --data-stream other ones. summary.json's unique_tokens (each stage's, and distill_summary.json's over
    all stages) equals the count of tokens the drawn windows (block + 1 tokens from each start) cover. Mutations
    caught: the sampler's seed not folded with the stage, or not with the stream's name; a wrong count."""
    tmp, common = setup
    seen, drawn = {}, {}
    spy_on_stages(monkeypatch, seen)
    for run, stream in (("a", ""), ("again", ""), ("other", "other")):
        batches = []
        record_windows(monkeypatch, batches)
        distill.main(common + ["--layers", "progressive", "--max-tokens", str(3 * 2 * STEP), "--e2e-tokens",
                               str(2 * STEP), "--data-stream", stream, "--out-dir", str(tmp / run)])
        stages = [s for s in seen for _ in range(2)]  # two steps of one micro-batch each, stage after stage
        assert len(batches) == len(stages) == 8
        drawn[run] = {s: np.concatenate([b[2] for b, st in zip(batches, stages) if st == s]) for s in seen}
    names = list(seen)
    assert names == ["stage-00", "stage-01", "stage-02", "e2e"]
    for i, s in enumerate(names):
        assert all(not np.array_equal(drawn["a"][s], drawn["a"][t]) for t in names[i + 1:])
        assert np.array_equal(drawn["a"][s], drawn["again"][s])
        assert not np.array_equal(drawn["a"][s], drawn["other"][s])
    n = json.loads((tmp / "data" / "toy" / "meta.json").read_text())["splits"]["train"]["tokens"]

    def covered(starts):
        mask = np.zeros(n, dtype=bool)
        for s in starts:
            mask[s:s + 32 + 1] = True
        return int(mask.sum())
    for s in names:
        assert json.loads((tmp / "a" / s / "summary.json").read_text())["unique_tokens"] == covered(drawn["a"][s])
    total = json.loads((tmp / "a" / "distill_summary.json").read_text())["unique_tokens"]
    assert total == covered(np.concatenate(list(drawn["a"].values())))


def test_unique_tokens_are_counted_in_memory_per_window_not_per_token_of_the_split():
    """OpenWebText's 9B training tokens must not cost a mask of 9B: the union is taken over the windows drawn."""
    sampler = {"steps": 3, "streams": [{"first_step": 0, "world": 1, "batch_size": 2, "block_size": 4,
                                        "grad_accum": 1, "seeds": [[1, 0, 7]]}]}
    assert 6 <= data.unique_tokens(10 ** 13, [sampler]) <= 30  # 6 windows of 5 tokens in 10^13
    assert data.unique_tokens(10 ** 13, [{**sampler, "streams": []}]) is None  # nothing recorded: unknown


def test_a_resume_on_as_many_gpus_keeps_the_generators_it_had_even_restarted_ones():
    """Streams record each rank's seed: a change of GPU count restarts them (seeded with the step), and a later
    resume on the same count with another batch shape continues those same generators, as the sampler does."""
    from types import SimpleNamespace

    from training.checkpoint import note_stream
    cfg = SimpleNamespace(seed=1, data_stream="", batch_size=2, block_size=8, grad_accum=1)
    streams = note_stream([], 0, cfg, "", SimpleNamespace(world=2))
    streams = note_stream(streams, 4, SimpleNamespace(**{**vars(cfg), "batch_size": 4}), "", SimpleNamespace(world=1))
    restarted = streams[-1]["seeds"]
    assert restarted[0][-1] == 4 and len(restarted) == 1
    streams = note_stream(streams, 6, SimpleNamespace(**{**vars(cfg), "grad_accum": 2}), "", SimpleNamespace(world=1))
    assert streams[-1]["seeds"] == restarted and streams[-1]["grad_accum"] == 2
