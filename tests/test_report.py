"""report.py alone, on hand-made runs folders: its table's arithmetic (every stage's tokens and minutes, curves laid
end to end), CPU-minutes for a CPU run, the training mode, plots skipped plainly, and the harness page. The helpers
write what train.py and eval.py leave behind (test_experiment.py uses them too)."""
import importlib.util
import json
import math

from experiment import report


def table_rows(markdown):
    """The body rows of the first markdown table, as lists of cells."""
    lines = markdown[markdown.index("|"):].split("\n\n")[0].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


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


def write_harness_eval(path, model, tasks):
    """eval.py --tasks --json's layout for one checkpoint; tasks: {task: {metric: value, metric_stderr: value}}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"context": 128, "dtype": "fp32", "tasks": list(tasks), "results": [
        {"model": model, "path": model, "context": 128, "datasets": {}, "tasks": tasks}]}))


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
