"""experiment.py --sweep: the plan of branched runs (experiment/scaling.py) and its page (scaling_report.py). The
branching itself (a branch equals a run of its own budget, bitwise) is held by tests/test_schedule.py and
tests/test_distill.py."""
import json
import math
from pathlib import Path

import pytest

from experiment import scaling, scaling_report

ALIGN = 0.25
COMMON = ["--data", "gutenberg", "--seed", "1"]


def flag(cmd, name):
    return str(cmd[cmd.index(name) + 1])


@pytest.mark.parametrize("recipe, branched, share", [("best", "--e2e-minutes", ALIGN), ("paper", "--max-minutes", ALIGN),
                                                      ("scratch", "--max-minutes", 0.0)])
def test_one_run_per_recipe_finishes_every_smaller_budget_as_a_branch(tmp_path, recipe, branched, share):
    """The largest budget runs once and names the smaller ones in --branches (their share after the fixed first
    stage), which train.py finishes inside that run into OUT_DIR@B; each recipe reads its own data stream and its
    alignment compiles as asked; a finished recipe has nothing left to run."""
    d = tmp_path / "seed1"
    steps, points = scaling.recipe_steps(recipe, d, "teacher/final", "pythia-70m", [1.0, 2.0, 5.0], ALIGN, COMMON,
                                         "off")
    head = d / ("paper-ft" if recipe == "paper" else recipe)
    first = 1 if recipe == "paper" else 0  # paper's MSE stage runs first, once
    if recipe == "paper":
        assert flag(steps[0], "--layers") == "progressive" and flag(steps[0], "--max-minutes") == "0.25"
    if recipe != "scratch":
        assert flag(steps[0], "--align-compile") == "off"
    [main] = steps[first:]
    assert flag(main, "--out-dir") == str(head) and float(flag(main, branched)) == 5.0 - share
    assert flag(main, "--branches") == ",".join(f"{b - share:g}" for b in (1.0, 2.0))
    assert flag(main, "--schedule") == "wsd" and "--resume" not in main and flag(main, "--data-stream") == recipe
    assert [(b, f) for b, f, _ in points] == [(1.0, Path(f"{head}@{1 - share:g}") / "final"),
                                              (2.0, Path(f"{head}@{2 - share:g}") / "final"), (5.0, head / "final")]
    if recipe == "paper":  # a paper point spent its MSE stage too
        assert all(d / "paper" in folders for _, _, folders in points)
    (head / "final").mkdir(parents=True)
    again, _ = scaling.recipe_steps(recipe, d, "teacher/final", "pythia-70m", [1.0, 2.0, 5.0], ALIGN, COMMON, "off")
    assert again[first:] == []
    with pytest.raises(ValueError, match="was run for budgets"):  # its main run saved other branches
        scaling.recipe_steps(recipe, d, "teacher/final", "pythia-70m", [1.0, 5.0, 10.0], ALIGN, COMMON, "off")


def test_budgets_are_minutes_or_fractions_of_the_teachers_minutes(tmp_path):
    assert scaling.budgets_of("2,1,5", "--sweep-minutes") == ([1.0, 2.0, 5.0], False)
    assert scaling.budgets_of("0.25x, 0.125x,1x", "--sweep-minutes") == ([0.125, 0.25, 1.0], True)
    with pytest.raises(ValueError, match="every budget with an x"):
        scaling.budgets_of("0.25x,1", "--sweep-minutes")
    (tmp_path / "summary.json").write_text(json.dumps({"minutes": 2.5, "world": 2}))
    assert scaling.teacher_minutes(tmp_path) == 5.0  # GPU-minutes: minutes x GPUs


def test_sizes_and_teacher_tokens_follow_pythia():
    assert scaling.shape_name("14m") == "pythia-14m" and scaling.shape_name("tiny") == "tiny"
    with pytest.raises(ValueError, match="--sweep 15m: no such shape"):
        scaling.shape_name("15m")
    counts = {s: scaling.parameters(f"pythia-{s}", 50277) for s in ("14m", "31m", "70m", "160m", "410m")}
    assert [round(n / 1e6) for n in counts.values()] == [14, 30, 70, 162, 405]  # Pythia's names, embeddings included
    assert scaling.parse_repeat("70m:2,10;31m:5") == {"pythia-70m": [2.0, 10.0], "pythia-31m": [5.0]}


def write_point_runs(root, name, minutes, tokens):
    """A finished run folder as train.py leaves it: summary.json beside log.jsonl."""
    run = root / name
    run.mkdir(parents=True)
    (run / "log.jsonl").write_text("")
    (run / "summary.json").write_text(json.dumps({"minutes": minutes, "tokens": tokens, "world": 1}))
    return run


def fake_sweep(tmp_path, ppl, gpus=1):
    """points.json and the eval JSON of a sweep of sizes {size: params}: ppl[(size, recipe, budget, seed)]."""
    runs, points, evals = tmp_path / "runs", [], {}
    for (size, recipe, budget, seed), value in ppl.items():
        name = f"{size}-{recipe}-{budget:g}-{seed}"
        write_point_runs(runs, name, budget, 1000 * budget)
        ev = str(runs / f"{size}.json")  # points.json names it from <runs>
        points.append(dict(size=size, params={"a": 14e6, "b": 70e6}[size], teacher_tokens=5, seed=seed, recipe=recipe,
                           budget=budget, final=f"elsewhere/{name}/final", folders=[name], eval=f"{size}.json"))
        evals.setdefault(ev, []).append({"path": f"elsewhere/{name}/final",  # eval.py's --ckpt as given
                                         "datasets": {"gutenberg": {"token_ppl": value}}})
    for ev, rows in evals.items():
        Path(ev).write_text(json.dumps({"results": rows}))
    (runs / "sweep").mkdir()
    (runs / "sweep" / "points.json").write_text(json.dumps({"data": "gutenberg", "context": 2048, "gpus": gpus,
                                                            "budgets": [1.0, 2.0], "align_minutes": 0.25,
                                                            "points": points}))
    return runs


def test_the_page_gives_ratios_with_seed_spread_and_the_crossover_or_its_bound(tmp_path):
    ppl = {("a", "teacher", 0, None): 50.0, ("b", "teacher", 0, None): 40.0,
           ("a", "best", 1.0, 1): 55.0, ("a", "scratch", 1.0, 1): 60.0,  # a: scratch catches up at 2
           ("a", "best", 2.0, 1): 54.0, ("a", "scratch", 2.0, 1): 53.0,
           ("b", "best", 1.0, 1): 44.0, ("b", "best", 1.0, 2): 46.0, ("b", "scratch", 1.0, 1): 60.0,  # b: never
           ("b", "best", 2.0, 1): 42.0, ("b", "scratch", 2.0, 1): 50.0}
    runs = fake_sweep(tmp_path, ppl)
    s = scaling_report.write_scaling(runs, tmp_path / "results")
    rows = {(r["size"], r["recipe"], r["budget"]): r for r in s["rows"]}
    assert rows[("b", "best", 1.0)]["ratio"] == pytest.approx(45 / 40)
    assert rows[("b", "best", 1.0)]["ratio_sd"] == pytest.approx(0.0353553, rel=1e-4)  # sd of 1.1 and 1.15
    assert rows[("a", "best", 2.0)]["minutes"] == 2.0 and rows[("a", "best", 2.0)]["tokens"] == 2000
    assert [r["size"] for r in s["rows"]][0] == "a"  # smallest first
    page = (tmp_path / "results" / "scaling" / "SCALING.md").read_text()
    assert "| b | 70.0M | 40.00 |" in page and "1.125 ± 0.035" in page
    assert "- a: scratch catches up by 2 GPU-minutes" in page
    assert "- b: no crossover within 2 GPU-minutes" in page
    assert (tmp_path / "results" / "scaling" / "ratio_vs_params.png").exists()


def test_a_sweep_with_nothing_evaluated_yet_writes_its_page_without_plots(tmp_path):
    runs = fake_sweep(tmp_path, {("a", "best", 1.0, 1): 55.0}, gpus=0)
    (runs / "a.json").unlink()  # the eval step has not run
    s = scaling_report.write_scaling(runs, tmp_path / "results")
    assert s["rows"] == [] and not (tmp_path / "results" / "scaling" / "ratio_vs_params.png").exists()
    page = (tmp_path / "results" / "scaling" / "SCALING.md").read_text()
    assert "## When does scratch catch up?" in page and "Budgets are CPU-minutes" in page  # a sweep run on a CPU


def test_a_cut_sweep_reports_finished_points_by_their_own_validation_and_skips_unfinished_ones(tmp_path):
    """The eval step never ran for size a (the sweep was cut): best's finished run and the teacher are read from
    their summary.json validation, the ratio divides like by like, and scratch's unfinished run is left out."""
    runs = fake_sweep(tmp_path, {("a", "teacher", 0, None): 50.0, ("a", "best", 1.0, 1): 55.0,
                                 ("a", "scratch", 1.0, 1): 60.0})
    (runs / "a.json").unlink()
    for name, ce in (("a-teacher-0-None", 4.0), ("a-best-1-1", 4.1)):
        summary = json.loads((runs / name / "summary.json").read_text())
        (runs / name / "summary.json").write_text(json.dumps(dict(summary, val={"loss": 0.2, "ce": ce})))
    (runs / "a-scratch-1-1" / "summary.json").unlink()  # still training when the sweep was cut
    s = scaling_report.write_scaling(runs, tmp_path / "results")
    assert [(r["recipe"], r["source"]) for r in s["rows"]] == [("best", "train-val")]
    assert s["rows"][0]["ppl"] == pytest.approx(math.exp(4.1)) and s["rows"][0]["ratio"] == pytest.approx(math.exp(0.1))
    page = (tmp_path / "results" / "scaling" / "SCALING.md").read_text()
    assert f"| {math.exp(4.0):.2f} † |" in page and f"| {math.exp(4.1):.2f} † | {math.exp(0.1):.3f} |" in page
    assert "- a: not measured (needs both best and scratch)" in page


def test_a_finished_point_scored_by_the_eval_step_is_read_from_it_not_from_its_validation(tmp_path):
    runs = fake_sweep(tmp_path, {("a", "teacher", 0, None): 50.0, ("a", "best", 1.0, 1): 55.0})
    for name in ("a-teacher-0-None", "a-best-1-1"):
        (runs / name / "summary.json").write_text(json.dumps({"minutes": 1, "tokens": 1, "val": {"ce": 9.0}}))
    s = scaling_report.write_scaling(runs, tmp_path / "results")
    assert s["rows"][0]["source"] == "eval" and s["rows"][0]["ratio"] == pytest.approx(55 / 50)


@pytest.mark.parametrize("minutes, align, scale", [("0.5,1", "0.25", 1.0), ("0.5x,1x", "0.25x", 4.0)])
def test_the_driver_writes_each_sizes_planned_points_before_its_runs_start(tmp_path, monkeypatch, minutes, align,
                                                                            scale):
    """A sweep cut inside a size's runs (a machine taken back) must still know that size's points, so its page can
    report what finished: points.json lists them before the first run starts. Budgets with an x are fractions of
    the teacher's own training minutes (here 4): the runs are asked for those minutes."""
    from argparse import Namespace
    from experiment import runner
    seen, teacher = [], tmp_path / "runs" / "sweep" / "tiny" / "teacher"
    teacher.mkdir(parents=True)
    (teacher / "summary.json").write_text(json.dumps({"minutes": 4.0, "world": 1}))

    def cut(jobs, gpus, logs):  # the machine is taken back as the size's runs start
        seen.append((json.loads((tmp_path / "runs" / "sweep" / "points.json").read_text()), jobs))
        raise KeyboardInterrupt
    monkeypatch.setattr(runner, "run", lambda cmd, log: None)
    monkeypatch.setattr(runner, "finish", lambda proc: 0)
    monkeypatch.setattr(runner, "run_parallel", cut)
    args = Namespace(sweep="tiny", sweep_minutes=minutes, sweep_recipes="best,scratch", sweep_align_minutes=align,
                     sweep_align_compile="off", sweep_repeat_recipes="", sweep_seeds="", seed=1, sweep_repeat=None, sweep_teacher_tokens=None,
                     teacher_tokens=1e6, block_size=128, gpus=1, sweep_eval_tokens=1000)
    with pytest.raises(KeyboardInterrupt):
        scaling.sweep_steps(args, tmp_path / "runs", "data", "gutenberg", "tok.json", tmp_path / "logs",
                            [*COMMON, "--block-size", "128"], ["python"], 50304)
    plan, jobs = seen[0]
    points = plan["points"]
    assert [(p["recipe"], p.get("budget"), p.get("minutes_budget")) for p in points] == \
        [("teacher", None, None), ("best", 0.5, 0.5 * scale), ("best", 1.0, scale), ("scratch", 0.5, 0.5 * scale),
         ("scratch", 1.0, scale)]
    assert {p["eval"] for p in points} == {"sweep/tiny/eval.json"} and plan["budgets"] == [0.5, 1.0]
    [best] = jobs["tiny-best-s1"]
    assert flag(best, "--max-minutes") == f"{0.25 * scale:g}" and flag(best, "--e2e-minutes") == f"{0.75 * scale:g}"
    assert flag(best, "--e2e-lr") == "1e-3"  # the measured rate (results/claim/TUNED.md), not distill.py's default
    assert plan["budget_unit"] == ("teacher" if scale == 4.0 else "minutes")
