"""The whole method end to end, as the README's CPU quick start runs it, only smaller: real text and the real GPT-NeoX
tokenizer -> prepare.py -> a tiny attention teacher pretrained from scratch -> distill.py (progressive layer
transfer, then end-to-end KL) into an all-Hyena student -> finetune.py (CE) -> eval.py's table and a sample ->
report.py's table. Then report.py alone on a hand-made runs folder, to pin down its arithmetic and plots.

(experiment.py itself runs ~20 subprocesses and its tiny preset fixes a 0.5-minute budget per student, so a whole run
takes minutes on a CPU: too slow for the suite. The chain below is the same sequence of scripts, in process.)"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distill
import eval as ev
import finetune
import prepare
from experiment import report, runner
from hyena import GPTNeoX

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"  # beside the repository
TOKENIZER = SHARED / "tokenizer" / "20B_tokenizer.json"
SHAKESPEARE = SHARED / "corpus" / "tinyshakespeare" / "input.txt"
# The 50k-token vocabulary dominates every step's cost (~0.4 s per 256-token step on one core), so budgets are
# counted in steps of 4 x 64 tokens and validation uses one batch.
TRAIN = ["--batch-size", "4", "--block-size", "64", "--device", "cpu", "--log-interval", "4", "--eval-batches", "1"]
STEP = 4 * 64



def val_losses(run, key="loss"):
    return [r["val"][key] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "val" in r]


def table_rows(markdown):
    """The body rows of the first markdown table, as lists of cells."""
    lines = markdown[markdown.index("|"):].split("\n\n")[0].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


@pytest.mark.skipif(not (TOKENIZER.is_file() and SHAKESPEARE.is_file()),
                    reason=f"needs the shared offline data ({TOKENIZER}, {SHAKESPEARE})")
def test_quick_start_chain_teacher_student_finetune_eval_report(tmp_path, capsys):
    text = tmp_path / "shakespeare.txt"  # ~12k tokens: one document, its last 10% (by lines) becomes val
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    root, runs = tmp_path / "data", tmp_path / "runs"  # runs/ laid out as experiment.py lays it out
    prepare.main(["text", str(text), "--val-fraction", "0.1", "--name", "shakespeare", "--tokenizer", str(TOKENIZER),
                  "--out-dir", str(root), "--workers", "1"])
    meta = json.loads((root / "shakespeare" / "meta.json").read_text())
    assert set(meta["splits"]) == {"train", "val"} and meta["splits"]["val"]["tokens"] > 1000
    data = ["--data", "shakespeare", "--data-root", str(root), *TRAIN]

    # The teacher: GPT-NeoX (attention) pretrained from scratch; its validation loss falls at every validation.
    finetune.main(["--init", "scratch", "--mixer", "attention", "--config", "tiny", *data, "--lr", "1e-2",
                   "--max-tokens", str(12 * STEP), "--eval-interval", "4", "--out-dir", str(runs / "teacher")])
    vals = val_losses(runs / "teacher")
    print("teacher val loss:", vals)
    assert len(vals) == 3 and vals[0] > vals[1] > vals[2] and vals[2] < vals[0] - 0.5
    teacher = GPTNeoX.from_pretrained(runs / "teacher" / "final")
    assert teacher.config.mixers == ["attention", "attention"]

    # The student: every attention replaced by Hyena, aligned layer by layer, then end-to-end KL on the logits.
    distill.main(["--teacher", str(runs / "teacher" / "final"), *data, "--layers", "progressive",
                  "--max-tokens", str(2 * 2 * STEP), "--e2e-tokens", str(2 * STEP), "--eval-interval", "100",
                  "--out-dir", str(runs / "best-ce")])
    assert [json.loads((runs / "best-ce" / s / "summary.json").read_text())["tokens"]
            for s in ("stage-00", "stage-01", "e2e")] == [2 * STEP, 2 * STEP, 2 * STEP]
    student = GPTNeoX.from_pretrained(runs / "best-ce" / "final")
    assert student.config.mixers == ["hyena", "hyena"]
    assert not torch.equal(student.gpt_neox.embed_in.weight, teacher.gpt_neox.embed_in.weight)  # e2e trains all

    # Cross-entropy fine-tuning of the student.
    finetune.main(["--init", str(runs / "best-ce" / "final"), *data, "--max-tokens", str(2 * STEP),
                   "--eval-interval", "100", "--out-dir", str(runs / "best-ce-ft")])
    assert GPTNeoX.from_pretrained(runs / "best-ce-ft" / "final").config.mixers == ["hyena", "hyena"]

    # eval.py: one table of all three models; every perplexity is finite.
    models = {"teacher": runs / "teacher" / "final", "best-ce-kd": runs / "best-ce" / "final",
              "best-ce": runs / "best-ce-ft" / "final"}
    capsys.readouterr()
    ev.main(["--ckpt", *map(str, models.values()), "--data", "shakespeare", "--data-root", str(root),
             "--context", "64", "--json", str(tmp_path / "eval.json")])
    assert [row[0] for row in table_rows(capsys.readouterr().out)] == list(map(str, models.values()))
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    for r in results:
        m = r["datasets"]["shakespeare"]
        assert m["split"] == "val" and m["tokens"] == meta["splits"]["val"]["tokens"] - 1
        assert all(math.isfinite(m[k]) for k in ("token_ppl", "word_ppl", "bits_per_byte")), r
    assert results[0]["datasets"]["shakespeare"]["token_ppl"] < meta["vocab_size"] / 10  # uniform would be 50k

    # A greedy sample continues the prompt (the fine-tuned folder carries the data's tokenizer.json).
    ev.main(["--ckpt", str(models["best-ce"]), "--prompt", "ROMEO:", "--max-new-tokens", "8", "--temperature", "0"])
    header, sample = capsys.readouterr().out.split("\n", 1)
    assert header.startswith(f"--- {models['best-ce']}") and sample.startswith("ROMEO:")
    assert len(sample) > len("ROMEO:\n")  # the 8 new tokens decode to something (here: newlines)

    # report.py reads these real logs and eval results, one eval JSON per model as experiment.py writes them.
    (runs / "eval").mkdir()
    for name, r in zip(models, results):
        (runs / "eval" / f"{name}.json").write_text(json.dumps({"results": [r]}))
    report.main(["--runs", str(runs), "--results", str(tmp_path / "results")])
    rows = table_rows((tmp_path / "results" / "RESULTS.md").read_text())
    assert [row[0] for row in rows] == ["teacher (GPT-NeoX, attention)", "teacher init, progressive, KL",
                                        "teacher init, progressive, KL, then CE"]
    assert rows[0][-3] == "1.000x"
    res = json.loads((tmp_path / "results" / "experiment.json").read_text())
    assert [r["tokens"] for r in res["rows"].values()] == [12 * STEP, 6 * STEP, 8 * STEP]  # every stage counted
    assert [ce for *_, ce in res["curves"]["progressive, KL, CE"]] == [
        *(val_losses(runs / "best-ce" / s, "ce")[-1] for s in ("stage-00", "stage-01", "e2e")),  # the student's CE
        val_losses(runs / "best-ce-ft", "ce")[-1]]


# ---------------------------------------------------------------------------------------------- report.py alone

def write_stage(folder, vals, tokens, minutes, world=1, compiled=None):
    """A training stage as train.py leaves it: log.jsonl (a step record, then a val record, per validation) and
    summary.json. vals: the val metrics of each validation, evenly spaced over `tokens` and `minutes`."""
    folder.mkdir(parents=True)
    lines = []
    for i, val in enumerate(vals, 1):
        t, s = tokens * i // len(vals), 60 * minutes * i / len(vals)
        lines += [{"step": i, "tokens": t, "lr": 1e-3, "loss": val["ce"], "elapsed_s": s},
                  {"step": i, "tokens": t, "val": {"loss": val["ce"], **val}}]
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (folder / "summary.json").write_text(json.dumps({"tokens": tokens, "minutes": minutes, "world": world,
                                                     **({} if compiled is None else {"compiled": compiled})}))


def write_eval(path, *rows):
    """eval.py --json's layout; rows: (model, {dataset: token_ppl})."""
    results = [{"model": model, "path": model, "datasets": {
        d: {"split": "val", "tokens": 1000, "nll": 1000 * math.log(ppl), "token_ppl": ppl, "word_ppl": 2 * ppl,
            "bits_per_byte": math.log(ppl) / 4} for d, ppl in ppls.items()}} for model, ppls in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"results": results}))


def test_report_table_sums_every_stage_and_lays_curves_end_to_end(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "results"
    write_stage(runs / "teacher", [{"ce": 4.0}, {"ce": 3.0}], tokens=1_000_000, minutes=2.0, world=4)
    write_stage(runs / "scratch", [{"ce": 6.0}, {"ce": 5.0}], tokens=600_000, minutes=2.0)
    for layer, mses in enumerate([(0.3, 0.9), (0.3, 0.2)]):  # progressive: stage 1 fixes layer 1
        write_stage(runs / "paper" / f"stage-{layer:02d}", [{"ce": 7.0, "mse_0": mses[0], "mse_1": mses[1]}],
                    tokens=100_000, minutes=0.5)
    write_stage(runs / "paper-ft", [{"ce": 4.5}, {"ce": 4.2}], tokens=300_000, minutes=1.0)
    write_stage(runs / "best" / "independent", [{"ce": 5.0}], tokens=100_000, minutes=0.25)
    write_stage(runs / "best" / "e2e", [{"ce": 3.4}], tokens=300_000, minutes=0.75)  # sorts last, not first
    (runs / "best" / "final").mkdir()  # no log.jsonl: not a stage
    ppl = {"teacher": 20.0, "scratch": 80.0, "paper": 60.0, "paper-ft": 50.0, "best": 30.0}
    for name, p in ppl.items():  # the best-ce runs are missing: their rows are left out
        write_eval(runs / "eval" / f"{name}.json", (f"runs/{name}/final", {"gutenberg": p, "wikitext2": 2 * p}))
    write_eval(runs / "eval" / "dtype-fp32.json", ("runs/teacher/final", {"gutenberg": 20.0}),
               ("runs/best/final", {"gutenberg": 30.0}))
    write_eval(runs / "eval" / "dtype-bf16.json", ("runs/teacher/final", {"gutenberg": 20.01}))

    report.main(["--runs", str(runs), "--results", str(out), "--paper-minutes", "2", "--gpus", "4"])
    md = (out / "RESULTS.md").read_text()
    assert md in capsys.readouterr().out  # printed, too
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    rows = {row[0]: dict(zip(header, row)) for row in table_rows(md)}
    assert list(rows) == ["teacher (GPT-NeoX, attention)", "pre-trained Hyena (from scratch)",
                          "distilled (paper: progressive MSE)", "distilled + fine-tuned (paper)",
                          "best recipe (teacher init, align, KL)"]
    expect = {  # label: (gutenberg ppl, vs teacher, tokens, GPU-minutes = minutes x GPUs over every stage spent)
        "teacher (GPT-NeoX, attention)": ("20.00", "1.000x", "1.0M", "8.00"),
        "pre-trained Hyena (from scratch)": ("80.00", "4.000x", "0.6M", "2.00"),
        "distilled (paper: progressive MSE)": ("60.00", "3.000x", "0.2M", "1.00"),
        "distilled + fine-tuned (paper)": ("50.00", "2.500x", "0.5M", "2.00"),
        "best recipe (teacher init, align, KL)": ("30.00", "1.500x", "0.4M", "1.00")}
    for label, (p, ratio, tokens, minutes) in expect.items():
        r = rows[label]
        assert (r["gutenberg ppl"], r["vs teacher"], r["tokens"], r["GPU-min"]) == (p, ratio, tokens, minutes), r
        assert r["wikitext2 ppl"] == f"{2 * float(p):.2f}" and r["gutenberg word ppl"] == f"{2 * float(p):.2f}"
    assert "| teacher | - | 20.0000 | 20.0100 | - |" in md and "| best | - | 30.0000 | - | - |" in md
    assert "student budget (GPU-minutes): 2. GPUs: 4." in md

    res = json.loads((out / "experiment.json").read_text())
    # Stages laid end to end: paper-ft's points start where paper's second stage ended (200k tokens, 1 minute).
    assert res["curves"]["paper (progressive, CE)"] == [[100_000, 0.5, 7.0], [200_000, 1.0, 7.0],
                                                        [350_000, 1.5, 4.5], [500_000, 2.0, 4.2]]
    assert res["curves"]["best (independent, KL)"] == [[100_000, 0.25, 5.0], [400_000, 1.0, 3.4]]
    assert res["curves"]["progressive, KL, CE"] == []
    assert res["progressive_mse"] == [{"mse_0": 0.3, "mse_1": 0.9}, {"mse_0": 0.3, "mse_1": 0.2}]

    pngs = {p.name for p in out.glob("*.png")}
    if importlib.util.find_spec("matplotlib"):
        assert pngs == {"val_loss.png", "progressive_mse.png", "perplexity.png"}
        assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    else:
        assert pngs == set()


def test_report_labels_a_cpu_run_in_cpu_minutes(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    write_stage(runs / "teacher", [{"ce": 4.0}], tokens=1000, minutes=3.0)
    write_eval(runs / "eval" / "teacher.json", ("runs/teacher/final", {"shakespeare": 20.0}))
    report.main(["--runs", str(runs), "--results", str(out), "--paper-minutes", "0.5", "--gpus", "0"])
    md = (out / "RESULTS.md").read_text()
    header = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    assert header[-1] == "CPU-min" and "GPU" not in md.replace("GPUs: 0", "")
    assert dict(zip(header, table_rows(md)[0]))["CPU-min"] == "3.00"


def test_report_says_whether_the_training_steps_ran_compiled(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    write_stage(runs / "teacher", [{"ce": 4.0}], tokens=1000, minutes=1.0, compiled=True)
    write_stage(runs / "scratch", [{"ce": 4.5}], tokens=1000, minutes=1.0, compiled=True)
    write_eval(runs / "eval" / "teacher.json", ("runs/teacher/final", {"gutenberg": 20.0}))
    report.main(["--runs", str(runs), "--results", str(out)])
    assert "training steps: compiled (torch.compile)" in (out / "RESULTS.md").read_text()
    write_stage(runs / "best" / "e2e", [{"ce": 4.2}], tokens=1000, minutes=1.0, compiled=False)
    report.main(["--runs", str(runs), "--results", str(out)])
    assert "training steps: mixed; eager: best/e2e" in (out / "RESULTS.md").read_text()


def test_report_says_plainly_when_plots_are_skipped(tmp_path, capsys, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kw):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kw)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    runs, out = tmp_path / "runs", tmp_path / "results"
    write_stage(runs / "teacher", [{"ce": 4.0}], tokens=1000, minutes=1.0)
    write_eval(runs / "eval" / "teacher.json", ("runs/teacher/final", {"gutenberg": 20.0}))
    report.main(["--runs", str(runs), "--results", str(out)])
    err = capsys.readouterr().err
    assert "plots skipped: matplotlib is not installed" in err and "pip install matplotlib" in err
    assert all(p in err for p in report.PLOTS) and str(out) in err
    assert (out / "RESULTS.md").is_file() and not list(out.glob("*.png"))


# ---------------------------------------------------------------------------------------- experiment.py's logic

def test_experiment_refuses_the_full_run_without_a_gpu(tmp_path, monkeypatch, capsys):
    from experiment import experiment
    started = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(runner, "run", lambda cmd, *a, **kw: started.append(cmd) or pytest.fail("ran a step"))
    with pytest.raises(ValueError, match=r"no GPU.*python experiment/experiment.py --preset tiny.*--allow-cpu") as e:
        experiment.main(["--runs", str(tmp_path / "runs")])
    assert not started and not (tmp_path / "runs").exists() and "Traceback" not in str(e.value)

    class Started(Exception):
        pass
    for flags in (["--allow-cpu"], ["--preset", "tiny"]):  # insisting, or the CPU-sized run: it starts
        monkeypatch.setattr(runner, "run", lambda cmd, *a, **kw: (_ for _ in ()).throw(Started(cmd)))
        with pytest.raises(Started):
            experiment.main(["--runs", str(tmp_path / "runs"), *flags])


def test_experiment_shows_the_running_steps_output_on_the_console(tmp_path, capsys):
    log = tmp_path / "logs" / "teacher.log"
    script = "import sys, time; print('step 10 | loss 9.7'); sys.stderr.write('step 20 | ETA 0h00m01s\\n')"
    proc = runner.run([runner.PY, "-c", script], log)
    assert runner.finish(proc) == 0
    err = capsys.readouterr().err
    assert "[teacher] step 10 | loss 9.7\n" in err and "[teacher] step 20 | ETA 0h00m01s\n" in err
    assert log.read_text().splitlines()[1:] == ["step 10 | loss 9.7", "step 20 | ETA 0h00m01s"]  # log has it too


def test_experiment_rerun_keeps_the_recorded_wall_time(tmp_path, monkeypatch):
    """Every step already done: the rerun skips them all, and the report still gets the time they took."""
    from experiment import experiment
    runs = tmp_path / "runs"
    for d in ["teacher", "scratch", "paper", "paper-ft", "best", "best-ce", "best-ce-ft"]:
        (runs / d / "final").mkdir(parents=True)
    for name in ["teacher", "scratch", "paper", "paper-ft", "best", "best-ce-kd", "best-ce",
                 *(f"dtype-{d}" for d in ("fp64", "fp32", "bf16", "fp16"))]:
        write_eval(runs / "eval" / f"{name}.json", (name, {"shakespeare": 20.0}))
    (runs / "wall_time.json").write_text(json.dumps({"data and teacher": 300.0, "students": 240.0,
                                                     "evaluation": 60.0}))
    reported = []
    monkeypatch.setattr(experiment, "prepare_commands", lambda *a: [])
    monkeypatch.setattr(runner, "run", lambda cmd, *a, **kw: pytest.fail(f"reran a finished step: {cmd}"))
    monkeypatch.setattr(report, "main", reported.append)
    experiment.main(["--preset", "tiny", "--gpus", "0", "--runs", str(runs), "--results", str(tmp_path / "res")])
    args = reported[0]
    assert args[args.index("--wall-minutes") + 1] == "10.0"
    assert sum(json.loads((runs / "wall_time.json").read_text()).values()) < 600 + 30


# ------------------------------------------------------------------------- --harness: lm-eval tasks on the results

def write_harness_eval(path, model, tasks):
    """eval.py --tasks --json's layout for one checkpoint; tasks: {task: {metric: value, metric_stderr: value}}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"context": 128, "dtype": "fp32", "tasks": list(tasks), "results": [
        {"model": model, "path": model, "context": 128, "datasets": {}, "tasks": tasks}]}))


def test_experiment_harness_prepares_the_data_then_scores_each_checkpoint_in_its_own_step(tmp_path, monkeypatch):
    """--harness: prepare.py harness joins the data phase; after the evaluations one eval.py --tasks step per model
    (teacher, paper-ft, best, scratch, each modal student whose final exists), each skipped once its JSON is there."""
    from experiment import experiment
    runs = tmp_path / "runs"
    for d in ["teacher", "scratch", "paper", "paper-ft", "best", "best-ce", "best-ce-ft", "modal/d4"]:
        (runs / d / "final").mkdir(parents=True)
    for name in ["teacher", "scratch", "paper", "paper-ft", "best", "best-ce-kd", "best-ce", "modal",
                 *(f"dtype-{d}" for d in ("fp64", "fp32", "bf16", "fp16"))]:
        write_eval(runs / "eval" / f"{name}.json", (name, {"shakespeare": 20.0}))
    write_harness_eval(runs / "eval" / "harness-scratch.json", "scratch", {})  # a step finished before
    started = []
    monkeypatch.setattr(experiment, "prepare_commands", lambda *a: [])
    done = type("Done", (), {"poll": lambda self: 0, "returncode": 0})()  # a step that finished at once
    monkeypatch.setattr(runner, "run", lambda cmd, *a, **kw: started.append([str(c) for c in cmd]) or done)
    monkeypatch.setattr(runner, "finish", lambda proc: 0)
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    monkeypatch.setattr(report, "main", lambda argv: None)
    experiment.main(["--preset", "tiny", "--gpus", "0", "--runs", str(runs), "--results", str(tmp_path / "res"),
                     "--modal", "4,8", "--shared", "/shared", "--harness", "gutenberg_lambada,wikitext2_offline"])
    assert started[0] == [runner.PY, str(runner.ROOT / "prepare.py"), "harness", "--shared", "/shared",
                          "--out-dir", "data/harness"]  # where the task YAMLs read their data
    assert [c[c.index("--out-dir") + 1] for c in started if c[1].endswith("distill.py")] == [
        str(runs / "modal" / "d8")]  # d4's repair is done; d8's only pretends to run, so d8/final never appears
    evals = {Path(c[c.index("--json") + 1]).name: c for c in started if c[1].endswith("eval.py")}
    # d4 exists, d8 was never repaired (its distill step only pretended to run), scratch's JSON was there already.
    assert sorted(evals) == ["harness-best.json", "harness-modal-d4.json", "harness-paper-ft.json",
                             "harness-teacher.json"]
    cmd = evals["harness-modal-d4.json"]
    assert cmd[cmd.index("--ckpt") + 1] == str(runs / "modal" / "d4" / "final")
    assert cmd[cmd.index("--tasks") + 1] == "gutenberg_lambada,wikitext2_offline"
    assert "--include-path" not in cmd  # eval.py always reads harness/tasks (again here: every task overridden)
    assert cmd[cmd.index("--context") + 1] == "128"  # the block size the other evaluations use
    assert "harness tasks" in json.loads((runs / "wall_time.json").read_text())


def test_experiment_harness_refuses_an_unknown_task_before_any_step(tmp_path, monkeypatch):
    from experiment import experiment
    monkeypatch.setattr(runner, "run", lambda cmd, *a, **kw: pytest.fail(f"ran a step: {cmd}"))
    with pytest.raises(ValueError, match=r"--harness .*lambada_openai is no offline task; choose from "
                                         r".*gutenberg_lambada.*eval.py --tasks"):
        experiment.main(["--preset", "tiny", "--gpus", "0", "--runs", str(tmp_path), "--harness",
                         "gutenberg_lambada,lambada_openai"])


def test_report_harness_table_tasks_and_commands(tmp_path):
    """results/harness/: one row per model, one column per task metric, ± lm-eval's stderr where it gives one
    (None for the rolling metrics), the tasks' definitions from their YAMLs, the commands from the steps' logs."""
    runs, out = tmp_path / "runs", tmp_path / "results"
    lam = {"perplexity": 123.456, "perplexity_stderr": 4.0, "acc": 0.4, "acc_stderr": 0.02}
    write_harness_eval(runs / "eval" / "harness-modal-d4.json", "m", {"gutenberg_lambada": dict(lam, acc=0.1)})
    write_harness_eval(runs / "eval" / "harness-best.json", "b", {"gutenberg_lambada": dict(lam, acc=0.3)})
    write_harness_eval(runs / "eval" / "harness-teacher.json", "t", {
        "gutenberg_lambada": lam, "wikitext2_offline": {"word_perplexity": 55.5, "word_perplexity_stderr": None}})
    (runs / "logs").mkdir(parents=True)
    (runs / "logs" / "harness-best.log").write_text(
        "$ /venv/bin/python3 /x/repo/eval.py --ckpt runs/best/final --tasks gutenberg_lambada "
        "--include-path /x/repo/harness/tasks --json runs/eval/harness-best.json\nprogress...\n")
    (runs / "logs" / "prepare.log").write_text("$ /venv/bin/python3 /x/repo/prepare.py text a.txt\n"
                                               "$ /venv/bin/python3 /x/repo/prepare.py harness --shared /s\n")
    report.main(["--runs", str(runs), "--results", str(out)])
    md = (out / "harness" / "HARNESS.md").read_text()
    assert md.splitlines()[2] == ("| model | gutenberg_lambada perplexity | gutenberg_lambada acc | "
                                  "wikitext2_offline word_perplexity |")
    assert table_rows(md) == [  # teacher, the recipes, then the modal students
        ["teacher (GPT-NeoX, attention)", "123.46 ± 4.00", "0.4000 ± 0.0200", "55.50"],
        ["best recipe (teacher init, align, KL)", "123.46 ± 4.00", "0.3000 ± 0.0200", "-"],
        ["best, modal filters d=4 (KL-repaired)", "123.46 ± 4.00", "0.1000 ± 0.0200", "-"]]
    assert "- `gutenberg_lambada`: LAMBADA-style last-word prediction on passages of the Gutenberg" in md
    assert ("python prepare.py harness --shared /s\npython eval.py --ckpt runs/best/final --tasks gutenberg_lambada "
            "--include-path harness/tasks --json runs/eval/harness-best.json\n") in md
    h = json.loads((out / "harness" / "harness.json").read_text())
    assert list(h["models"]) == ["teacher", "best", "modal-d4"]
    assert h["models"]["best"]["tasks"]["gutenberg_lambada"]["acc"] == 0.3
    assert h["tasks"]["wikitext2_offline"]["metrics"] == ["word_perplexity"]
    assert list(h["commands"]) == ["data", "best"]


def test_report_without_harness_results_writes_no_harness_folder(tmp_path):
    write_eval(tmp_path / "runs" / "eval" / "teacher.json", ("teacher", {"gutenberg": 20.0}))
    report.main(["--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])
    assert not (tmp_path / "results" / "harness").exists()


@pytest.mark.skipif(not os.environ.get("EXPERIMENT_TINY"), reason="minutes on a CPU (the tiny preset's fixed teacher "
                    "and student budgets): set EXPERIMENT_TINY=1")
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm-eval")
def test_experiment_tiny_with_harness_end_to_end(tmp_path):
    """The real thing on a CPU: experiment.py --preset tiny --students best --harness gutenberg_lambada, from the
    repo root (the task YAMLs read data/harness/ there), ends in results/harness/ with the teacher and best."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "experiment/experiment.py", "--preset", "tiny", "--students", "best", "--gpus",
                    "0", "--harness", "gutenberg_lambada", "--shared", str(SHARED), "--runs", str(tmp_path / "runs"),
                    "--results", str(tmp_path / "results")], cwd=root, check=True)
    h = json.loads((tmp_path / "results" / "harness" / "harness.json").read_text())
    assert list(h["models"]) == ["teacher", "best"]
    for r in h["models"].values():
        lam = r["tasks"]["gutenberg_lambada"]
        assert 0 <= lam["acc"] <= 1 and lam["perplexity"] > 1 and lam["acc_stderr"] is not None
    assert list(h["commands"]) == ["data", "teacher", "best"]
