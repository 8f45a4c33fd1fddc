"""The whole method end to end, as the README's CPU quick start runs it, only smaller: real text and the real GPT-NeoX
tokenizer -> prepare.py -> a tiny attention teacher pretrained from scratch -> distill.py (progressive layer
transfer, then end-to-end KL) into an all-Hyena student -> finetune.py (CE) -> eval.py's table and a sample ->
report.py's table; then experiment.py's own logic on stubbed steps (report.py alone: tests/test_report.py).

(experiment.py itself runs ~20 subprocesses and its tiny preset gives each student 40,000 tokens, so a whole run
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
from test_report import table_rows, write_eval, write_harness_eval

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"  # beside the repository
TOKENIZER = SHARED / "tokenizer" / "20B_tokenizer.json"
SHAKESPEARE = SHARED / "corpus" / "tinyshakespeare" / "input.txt"
# The 50k-token vocabulary dominates every step's cost (~0.4 s per 256-token step on one core), so budgets are
# counted in steps of 4 x 64 tokens and validation uses one batch.
TRAIN = ["--batch-size", "4", "--block-size", "64", "--device", "cpu", "--log-interval", "4", "--eval-batches", "1"]
STEP = 4 * 64



def val_losses(run, key="loss"):
    return [r["val"][key] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "val" in r]


@pytest.mark.skipif(not (TOKENIZER.is_file() and SHAKESPEARE.is_file()),
                    reason=f"needs the shared offline data ({TOKENIZER}, {SHAKESPEARE})")
def test_quick_start_chain_teacher_student_finetune_eval_report(tmp_path, capsys):
    text = tmp_path / "shakespeare.txt"  # ~12k tokens: one document, its last 10% (by lines) becomes val
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    root, runs = tmp_path / "data", tmp_path / "runs"  # runs/ laid out as experiment.py lays it out
    prepare.main(["text", str(text), "--val-fraction", "0.1", "--name", "shakespeare", "--tokenizer", str(TOKENIZER),
                  "--out-dir", str(root), "--workers", "1", "--min-tokens", "129"])  # the evaluations' context + 1
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


# ---------------------------------------------------------------------------------------- experiment.py's logic

def test_experiment_without_a_gpu_runs_the_cpu_size_and_says_so_first(tmp_path, monkeypatch, capsys):
    """No flags and no GPU: the tiny preset, said (with its time) in the first line, its students budgeted in tokens;
    --full (or --allow-cpu) insists on the full sizes; --student-tokens and --student-minutes together are refused."""
    from experiment import experiment

    class Started(Exception):
        pass
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(runner, "run", lambda cmd, *a, **kw: (_ for _ in ()).throw(Started(cmd)))
    with pytest.raises(Started) as e:
        experiment.main(["--runs", str(tmp_path / "runs")])
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("experiment.py: the CPU-sized comparison (--preset tiny, the default without a GPU): "
                            f"about {experiment.TINY_MINUTES} minutes on 2 idle CPU cores") and "--full" in first
    assert "shakespeare" in map(str, e.value.args[0])  # the tiny data
    for flags in (["--full"], ["--allow-cpu"]):
        with pytest.raises(Started) as e:
            experiment.main(["--runs", str(tmp_path / "runs"), *flags])
        assert "CPU-sized" not in capsys.readouterr().err and "gutenberg" in map(str, e.value.args[0])
    with pytest.raises(ValueError, match="--student-tokens or --student-minutes, not both"):
        experiment.main(["--student-tokens", "1e4", "--student-minutes", "1"])


def test_the_cpu_sized_students_get_token_budgets(tmp_path, monkeypatch):
    """Each student's stages share --student-tokens as the GPU run shares its minutes (paper 1/2 + 1/2, best 1/4
    alignment + 3/4 KL, best-ce 1/4 + 0.45 + 0.3 CE, scratch all): step counts, not the machine's load, decide."""
    from experiment import experiment
    runs, T = tmp_path / "runs", experiment.TINY_STUDENT_TOKENS
    (runs / "teacher" / "final").mkdir(parents=True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(experiment, "prepare_commands", lambda *a: [])
    calls = []  # run_parallel's jobs: the students', then the (here empty) modal repairs', then the evaluations'
    monkeypatch.setattr(runner, "run_parallel", lambda steps, gpus, logs: calls.append(steps))
    monkeypatch.setattr(report, "main", lambda argv: calls.append(argv))
    experiment.main(["--runs", str(runs), "--results", str(tmp_path / "res")])
    jobs, argv = calls[0], calls[-1]
    assert not any(name.startswith("dtype-") for name in calls[2])  # the precision study: off in a CPU-sized run

    def flags(cmd):
        return {str(a): float(b) for a, b in zip(cmd, cmd[1:]) if str(a).startswith(("--max-", "--e2e-t", "--e2e-m"))}
    assert [flags(c) for c in jobs["paper"]] == [{"--max-tokens": T // 2}] * 2
    assert [flags(c) for c in jobs["best"]] == [{"--max-tokens": T // 4, "--e2e-tokens": int(0.75 * T)}]
    assert [flags(c) for c in jobs["best-ce"]] == [{"--max-tokens": T // 4, "--e2e-tokens": int(0.45 * T)},
                                                   {"--max-tokens": int(0.3 * T)}]
    assert [flags(c) for c in jobs["scratch"]] == [{"--max-tokens": T}]
    assert argv[argv.index("--student-tokens") + 1] == str(T) and "--paper-minutes" not in argv


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


@pytest.mark.skipif(not os.environ.get("EXPERIMENT_TINY"), reason="minutes on a CPU (the tiny preset's fixed teacher "
                    "and student budgets): set EXPERIMENT_TINY=1")
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm-eval")
def test_experiment_tiny_with_harness_end_to_end(tmp_path):
    """The real thing on a CPU: experiment.py --students best --harness gutenberg_lambada (no GPU: the tiny preset
    by default), from the repo root (the task YAMLs read data/harness/ there), ends in results/harness/ with the
    teacher and best."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "experiment/experiment.py", "--students", "best", "--gpus", "0", "--harness",
                    "gutenberg_lambada", "--shared", str(SHARED), "--runs", str(tmp_path / "runs"),
                    "--results", str(tmp_path / "results")], cwd=root, check=True)
    h = json.loads((tmp_path / "results" / "harness" / "harness.json").read_text())
    assert list(h["models"]) == ["teacher", "best"]
    for r in h["models"].values():
        lam = r["tasks"]["gutenberg_lambada"]
        assert 0 <= lam["acc"] <= 1 and lam["perplexity"] > 1 and lam["acc_stderr"] is not None
    assert list(h["commands"]) == ["data", "teacher", "best"]
