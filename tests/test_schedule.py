"""train.py's learning-rate schedules: warmup + cosine, warmup-stable-decay, and --branches, each finished inside a
wsd run where its decay starts, bitwise the run of that budget (the loop's other behaviour:
test_train.py, whose tiny dataset and model these tests share)."""
import json
import shutil

import pytest
import torch

from hyena import GPTNeoX
from test_train import data_dir  # noqa: F401 (the fixture: the tests below take it by name)
from test_train import STEP_TOKENS, Interrupt, config, interrupt_at, read_log, tiny_model
from training import TrainConfig
from train import CrossEntropy, lr_factor, train


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(out_dir="x", max_tokens=1, warmup_frac=0.1, min_lr_frac=0.1)
    assert lr_factor(0.05, cfg) == pytest.approx(0.5) and lr_factor(0.1, cfg) == pytest.approx(1.0)
    assert lr_factor(0.55, cfg) == pytest.approx(0.55) and lr_factor(1.0, cfg) == pytest.approx(0.1)
    assert lr_factor(0.3, cfg) > lr_factor(0.6, cfg) > lr_factor(0.9, cfg)


def test_wsd_holds_the_rate_then_decays_linearly_over_its_last_fraction():
    cfg = TrainConfig(out_dir="x", max_tokens=1, schedule="wsd", warmup_frac=0.1, decay_frac=0.2, min_lr_frac=0.1)
    assert lr_factor(0.05, cfg) == pytest.approx(0.5)
    assert lr_factor(0.1, cfg) == lr_factor(0.5, cfg) == lr_factor(0.8, cfg) == 1.0
    assert lr_factor(0.9, cfg) == pytest.approx(0.55) and lr_factor(1.0, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("b, warmup", [(5 * STEP_TOKENS, 0.4), (576, 0.0)])  # 576: decay from mid-step 4
def test_a_wsd_branch_is_finished_in_process_bitwise_as_a_run_of_its_own_budget(tmp_path, data_dir, b, warmup):
    """--branches: where the next step would decay in a run of budget B, the run finishes B's run in OUT_DIR@B
    (its decay, validation, checkpoint, summary, and the script's on_branch), then goes on as if it had not: the
    branch equals a run of B from the start (the main run's warmup), the main run equals a run without branches."""
    wsd = dict(schedule="wsd", warmup_frac=warmup, decay_frac=0.2)
    called = []
    train(CrossEntropy(tiny_model()), config(tmp_path / "main", data_dir, max_tokens=10 * STEP_TOKENS,
                                             branches=str(b), **wsd),
          on_branch=lambda cfg, summary: called.append((cfg.out_dir, summary["steps"])))
    branch = tmp_path / f"main@{b}"
    state = torch.load(branch / "ckpt" / "train_state.pt", weights_only=True)
    assert state["config"]["max_tokens"] == b and state["config"]["branches"] == ""
    assert called == [(str(branch), state["step"])] and state["step"] == 5
    alone = {**wsd, "warmup_frac": state["config"]["warmup_frac"]}  # the main run's warmup, as B's fraction
    train(CrossEntropy(tiny_model()), config(tmp_path / "alone", data_dir, max_tokens=b, **alone))
    shared = {**wsd, "warmup_frac": warmup * b / (10 * STEP_TOKENS)}  # a branched run warms up as its smallest budget
    train(CrossEntropy(tiny_model()), config(tmp_path / "plain", data_dir, max_tokens=10 * STEP_TOKENS, **shared))
    for x, y in (("main@%d" % b, "alone"), ("main", "plain")):
        wx = GPTNeoX.from_pretrained(tmp_path / x / "ckpt").state_dict()
        wy = GPTNeoX.from_pretrained(tmp_path / y / "ckpt").state_dict()
        assert all(torch.equal(wx[k], wy[k]) for k in wx), (x, y)
        (sx, vx), (sy, vy) = read_log(tmp_path / x), read_log(tmp_path / y)
        assert [(r["loss"], r["lr"]) for r in sx] == [(r["loss"], r["lr"]) for r in sy]
        assert [r["val"] for r in vx][-1] == [r["val"] for r in vy][-1]
    steps_b, steps_m = read_log(branch)[0], read_log(tmp_path / "main")[0]
    assert steps_b[-1]["lr"] == pytest.approx(3e-4)  # decayed to min_lr_frac at B
    if warmup:  # one warm-up step, the same in the main run and in the run of budget B
        assert [r["lr"] for r in steps_m[:8]] == [1.5e-3] + [3e-3] * 7 and steps_b[0]["lr"] == 1.5e-3
    again = []  # a finished branch is not run again when the main run is rerun
    shutil.rmtree(tmp_path / "main")
    train(CrossEntropy(tiny_model()), config(tmp_path / "main", data_dir, max_tokens=10 * STEP_TOKENS,
                                             branches=str(b), **wsd), on_branch=lambda *a: again.append(a))
    assert again == []


def test_branches_are_checked_and_a_passed_branch_point_is_refused(tmp_path, data_dir):
    wsd = dict(schedule="wsd", decay_frac=0.2)
    with pytest.raises(ValueError, match="--branches 5000: 5000 is not below this run's budget 1280"):
        train(CrossEntropy(tiny_model()), config(tmp_path / "big", data_dir, max_tokens=10 * STEP_TOKENS,
                                                 branches="5000", **wsd))
    for bad, match in ((dict(branches="2"), "needs --schedule wsd"),
                       (dict(branches="x", schedule="wsd"), "comma-separated numbers"),
                       (dict(branches="2", schedule="wsd", max_minutes=1.0), "exactly one budget")):
        with pytest.raises(ValueError, match=match):
            config(tmp_path / "bad", data_dir, **bad)
    run = tmp_path / "late"  # checkpoint at step 6, then resumed asking for a branch whose decay began at step 4
    with pytest.raises(Interrupt):
        train(CrossEntropy(tiny_model()), config(run, data_dir, max_tokens=10 * STEP_TOKENS, **wsd),
              on_step=interrupt_at(7))
    with pytest.raises(ValueError, match="budget 640's decay began before step 6"):
        train(CrossEntropy(tiny_model()), config(run, data_dir, max_tokens=10 * STEP_TOKENS, resume=True,
                                                 branches="640", **wsd))


def test_a_minutes_branch_is_charged_only_its_steps_and_resumes_into_itself(tmp_path, data_dir, monkeypatch):
    """A time-budgeted branch's minutes count its own steps from the fork, not the setting up of its folder (made
    slow here); a run stopped inside the branch resumes from the checkpoint saved at the fork and finishes that
    branch, though its decay began before the step resumed (the fork's checkpoint says so)."""
    import time

    from training import branches
    opened = branches.open_branch

    def slow_open(*a):
        time.sleep(1.0)  # longer than the branch's whole budget
        opened(*a)
    monkeypatch.setattr(branches, "open_branch", slow_open)
    wsd = dict(schedule="wsd", decay_frac=0.5, max_tokens=0, max_minutes=0.03, branches="0.015", eval_batches=0,
               ckpt_interval=10_000)
    branch = tmp_path / "main@0.015"

    def stop_inside_the_branch(step):
        if (branch / "log.jsonl").exists() and len(read_log(branch)[0]) > forked[0] + 1:
            raise Interrupt
    forked = []
    monkeypatch.setattr(branches, "set_aside", lambda *a, f=branches.set_aside: forked.append(
        len(read_log(tmp_path / "main")[0])) or f(*a))
    with pytest.raises(Interrupt):
        train(CrossEntropy(tiny_model()), config(tmp_path / "main", data_dir, **wsd), on_step=stop_inside_the_branch)
    summary = train(CrossEntropy(tiny_model()), config(tmp_path / "main", data_dir, resume=True, **wsd))
    done = json.loads((branch / "summary.json").read_text())
    assert done["steps"] > done["forked_at_step"] + 1  # decay steps ran: the slow set-up was not the branch's
    assert done["minutes"] == pytest.approx(0.015, rel=0.5) and summary["minutes"] >= 0.03


def test_a_branch_whose_final_weights_failed_is_finished_again(tmp_path, data_dir):
    """The script's on_branch (its final/) runs before the branch's summary.json, which marks it finished: a failure
    there (a full disk) leaves the branch to be redone by --resume."""
    wsd = dict(schedule="wsd", decay_frac=0.2, max_tokens=10 * STEP_TOKENS, branches=str(5 * STEP_TOKENS))

    def fail(branch, summary):
        raise OSError("disk full")
    with pytest.raises(OSError):
        train(CrossEntropy(tiny_model()), config(tmp_path / "main", data_dir, **wsd), on_branch=fail)
    assert not (tmp_path / f"main@{5 * STEP_TOKENS}" / "summary.json").exists()
    called = []
    train(CrossEntropy(tiny_model()), config(tmp_path / "main", data_dir, resume=True, **wsd),
          on_branch=lambda branch, summary: called.append(summary["steps"]))
    assert called == [5]
