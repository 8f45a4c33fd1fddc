"""The paper's comparison end to end, with the project's own scripts: data -> teacher -> students -> evaluation.

    python experiment/experiment.py                           # every GPU here; results/ gets table + plots
    python experiment/experiment.py --teacher EleutherAI/pythia-70m --train-data openwebtext  # real Pythia, real data
    python experiment/experiment.py                           # no GPU: the CPU-sized chain (--preset tiny)

Students, each given the same GPU-minutes (--student-minutes) on one GPU, run in parallel, one per GPU:
  paper    Hyena from random init, `progressive` layer-output MSE transfer, then CE fine-tuning (half each)
  best     Hyena projections from the teacher's attention, `independent` alignment, then end-to-end KL
  best+ce  teacher init, `progressive` alignment, end-to-end KL, then the last 30% of the budget on CE
           fine-tuning (evaluated before and after the CE stage: where does CE help, where does it hurt?)
  scratch  the paper's baseline: Hyena of the same shape trained from scratch with CE
--harness TASKS also scores teacher, paper-ft, best, scratch and the modal students on offline lm-eval tasks
(results/harness/HARNESS.md). --sweep SIZES runs the scale and crossover sweep instead of the four students
(experiment/scaling.py; results/scaling/SCALING.md). Every step is skipped when its output exists, so an interrupted experiment resumes by
running it again; the console shows each running step's output (its progress lines), and runs/logs/ keeps all of it.
Without a GPU the default is `--preset tiny`: a CPU-sized model, data and budgets, whose students get TOKENS
(--student-tokens), not minutes, so its table does not depend on the machine's load (a loaded 2-core machine once
gave the minute-budgeted scratch student 10 steps); --full runs the full sizes on a CPU anyway (weeks).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python experiment/experiment.py`: import from the repo root
from experiment import report, runner
from experiment.runner import PY, ROOT, add_wall_time, todo
from experiment.scaling import add_sweep_args, sweep_steps
from experiment.scaling_report import write_scaling
from experiment.studies import (add_harness_args, add_long_args, harness_prepare, harness_steps, harness_tasks,
                                long_context_steps)

# The CPU-sized run (--preset tiny, the default without a GPU): its students' token budget (40 steps of 8 x 128:
# distilled students reach the teacher, scratch stays far behind), and the whole run's time said in its first line,
# measured on a 2-core machine: 4.2 and 4.9 minutes at load 1.6-2; other jobs keeping the load at 3.5-4 made it 15
# minutes, with the same table to the last digit.
TINY_STUDENT_TOKENS = 40_000
TINY_MINUTES = 5
EVAL_SETS = ["gutenberg", "wikitext2", "owt-sample"]  # eval.py scores each one's test split, else its val
STUDENTS = ("paper", "best", "best-ce", "scratch")  # the student jobs below


def prepare_commands(shared, tok, root, data):
    """Offline: tokenize ../shared/data (Gutenberg with its fixed VAL.txt split, WikiText-2 valid/test, the
    OpenWebText sample). Any other --train-data is a hub dataset, evaluated beside WikiText-2 from the hub."""
    if data not in ("gutenberg", "shakespeare"):
        return [[PY, ROOT / "prepare.py", name, "--tokenizer", tok, "--out-dir", root] for name in (data, "wikitext2")]
    opts = ["--tokenizer", tok, "--out-dir", root]
    text = [PY, ROOT / "prepare.py", "text"]  # paths first: argparse takes them only right after the positional
    if data == "shakespeare":
        return [text + [f"{shared}/corpus/tinyshakespeare/input.txt", "--val-fraction", "0.1", "--name",
                        "shakespeare", *opts]]
    return [text + [f"{shared}/corpus/gutenberg.tar.xz", "--val-list", f"{shared}/corpus/VAL.txt", "--name",
                    "gutenberg", *opts],
            text + ["--val", f"{shared}/wikitext/wikitext-2-raw/wiki.valid.raw", "--test",
                    f"{shared}/wikitext/wikitext-2-raw/wiki.test.raw", "--name", "wikitext2", *opts],
            text + ["--val", f"{shared}/openwebtext/owt10k_val500.jsonl", "--name", "owt-sample", *opts]]


def main(argv=None):
    """The experiment; on Ctrl-C (SIGINT reaches the whole process group) it waits for the running steps, which
    stop after their current step with a checkpoint, relaying their output meanwhile: a driver that died first
    would close their pipes, and their last words, checkpoint included, would be lost."""
    try:
        drive(argv)
    except KeyboardInterrupt:
        print("experiment.py: Ctrl-C: waiting for the running steps to save their checkpoints (Ctrl-C again "
              "stops at once)", file=sys.stderr, flush=True)
        while True:
            try:
                os.wait()
            except ChildProcessError:  # none left
                break
        time.sleep(0.5)  # the relay threads' last lines
        raise KeyboardInterrupt("stopped; the same command resumes every step where it stopped") from None


def drive(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default="../shared/data", help="the offline data folder (corpus/, wikitext/, ...)")
    p.add_argument("--tokenizer", default=None, help="default: <shared>/tokenizer/20B_tokenizer.json")
    p.add_argument("--teacher", default="train", help="'train' (pretrain our own) or a hub id / checkpoint dir")
    p.add_argument("--train-data", default=None, help="prepared dataset to train on (default gutenberg)")
    p.add_argument("--teacher-tokens", type=float, help="teacher pretraining budget (default 160e6; tiny 1.5e5)")
    p.add_argument("--student-minutes", type=float, help="GPU-minutes per student (default 2)")
    p.add_argument("--student-tokens", type=float, help="tokens per student instead of minutes (default with "
                   f"--preset tiny: {TINY_STUDENT_TOKENS:,}): the same table on any machine, at any load")
    p.add_argument("--batch-size", type=int, help="sequences per GPU per step (default 16; tiny 8)")
    p.add_argument("--block-size", type=int, help="context (default 2048; tiny 128)")
    p.add_argument("--gpus", type=int, default=None, help="default: all visible (0 = CPU)")
    p.add_argument("--full", "--allow-cpu", dest="full", action="store_true", help="without a GPU, run the "
                   "full-size comparison anyway (weeks on a CPU) instead of the default --preset tiny")
    p.add_argument("--preset", choices=["tiny"], help="tiny: CPU-sized model, data and budgets (the default "
                   "without a GPU)")
    p.add_argument("--runs", help="checkpoints and logs (default runs/experiment; tiny: runs/tiny)")
    p.add_argument("--data-root", default="data")
    p.add_argument("--results", help="table, JSON and plots (default results; tiny: runs/tiny/results, so a CPU "
                   "try-out never overwrites the committed GPU results)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--eval-interval", type=int, help="every training step's validation interval (default 100; "
                   "tiny 10, as its students run 10-40 steps): each validation is eager and outside the budgets, but "
                   "costs device time")
    p.add_argument("--students", default=",".join(STUDENTS), help="which students to train (comma-separated, "
                   f"from {','.join(STUDENTS)})")
    p.add_argument("--compile", choices=("off", "auto", "on"), default="auto", help="torch.compile in the "
                   "training steps (train.py --compile; auto = on CUDA) and the long-context sweeps")
    p.add_argument("--dtype-study", action=argparse.BooleanOptionalAction, help="evaluate the teacher and `best` "
                   "at fp64/fp32/bf16/fp16 (default: on, but off with --preset tiny, where it would take a CPU "
                   "run's longest step)")
    p.add_argument("--modal", default="", help="state sizes d (e.g. 4,8,16,32,64): convert `best` to modal filters "
                   "with each (distill.py --modal-state), repair each by KL, and evaluate before and after")
    p.add_argument("--modal-repair-minutes", type=float, default=0.5, help="KL repair budget per modal student")
    add_long_args(p)
    add_harness_args(p)
    add_sweep_args(p)
    args = p.parse_args(argv)
    harness = harness_tasks(args.harness)
    students = [s for s in args.students.split(",") if s]
    modal = [int(d) for d in args.modal.split(",") if d]
    if not set(students) <= set(STUDENTS) or not students:
        raise ValueError(f"--students {args.students!r}: choose from {', '.join(STUDENTS)}")
    if modal and "best" not in students:
        raise ValueError("--modal converts the `best` student: keep `best` in --students")
    if args.long_context and not modal:
        raise ValueError("--long-context fine-tunes a modal student (its filters are defined at any length): add "
                         "--modal D")
    if any(d < 1 for d in modal):
        raise ValueError(f"--modal {args.modal!r}: state sizes must be >= 1")
    if args.gpus is None:
        import torch
        args.gpus = torch.cuda.device_count()
    if args.student_tokens and args.student_minutes:
        raise ValueError("give --student-tokens or --student-minutes, not both: a student's budget has one unit")
    if args.gpus == 0 and not args.full:  # the full comparison would take weeks on a CPU
        args.preset = "tiny"
    tiny = args.preset == "tiny"
    if tiny:  # the first line: what runs, and for how long
        why = "the default without a GPU" if not args.gpus else "as asked"
        print(f"experiment.py: the CPU-sized comparison (--preset tiny, {why}): about {TINY_MINUTES} minutes on 2 idle "
              "CPU cores (longer when busy); --full runs the full sizes", file=sys.stderr, flush=True)
    defaults = dict(teacher_tokens=1.5e5, batch_size=8, block_size=128, dtype_study=False) if tiny else \
        dict(teacher_tokens=160e6, batch_size=16, block_size=2048, dtype_study=True)
    if not (args.student_tokens or args.student_minutes):  # tiny: tokens, the same on any machine; GPU: minutes
        defaults.update(dict(student_tokens=TINY_STUDENT_TOKENS) if tiny else dict(student_minutes=2.0))
    defaults.update(runs="runs/tiny", results="runs/tiny/results") if tiny else \
        defaults.update(runs="runs/experiment", results="results")
    for k, v in defaults.items():  # explicit flags win over the preset
        if getattr(args, k) is None:
            setattr(args, k, v)
    runs, root, logs = Path(args.runs), args.data_root, Path(args.runs) / "logs"
    data = args.train_data or ("shakespeare" if tiny else "gutenberg")
    offline = data in ("gutenberg", "shakespeare")
    tok = args.tokenizer or (f"{args.shared}/tokenizer/20B_tokenizer.json" if offline else "EleutherAI/pythia-70m")
    eval_sets = [data] if data == "shakespeare" else list(EVAL_SETS) if offline else [data, "wikitext2"]
    t0 = time.time()

    def phase_done(name):  # adds the time since the last phase ended
        nonlocal t0
        now = time.time()
        total = add_wall_time(runs, name, now - t0)
        t0 = now
        return total

    for cmd in prepare_commands(args.shared, tok, root, data):
        if runner.finish(runner.run(cmd, logs / "prepare.log")):
            raise SystemExit(f"experiment.py: data preparation failed; see {logs / 'prepare.log'}")
    if harness:
        if runner.finish(runner.run(harness_prepare(args.shared), logs / "prepare.log")):
            raise SystemExit(f"experiment.py: the harness tasks' data failed; see {logs / 'prepare.log'}")

    common = ["--data", data, "--data-root", root, "--block-size", args.block_size, "--batch-size",
              args.batch_size, "--seed", args.seed, "--eval-interval", args.eval_interval or (10 if tiny else 100), "--eval-batches",
              4 if tiny else 8, "--log-interval", 10, "--compile", args.compile]
    launcher = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}"] \
        if args.gpus > 1 else [PY]
    if args.sweep:  # instead of the four students: teachers per size, then every recipe at every budget
        if args.teacher != "train":
            raise ValueError("--sweep pretrains a teacher per size: drop --teacher")
        vocab = json.loads((Path(root) / data / "meta.json").read_text())["vocab_size"]
        sweep_steps(args, runs, root, data, tok, logs, common, launcher, vocab)
        phase_done("sweep")
        write_scaling(runs, args.results)
        print(f"experiment.py: the sweep's page is {Path(args.results) / 'scaling' / 'SCALING.md'}", file=sys.stderr)
        return
    teacher = args.teacher
    if teacher == "train":
        teacher = runs / "teacher" / "final"
        cfg = ["--config", "tiny", "--preset", "tiny"] if tiny else ["--config", "pythia-70m", "--lr", "1e-3"]
        for cmd in todo(launcher + [ROOT / "finetune.py", "--init", "scratch", "--mixer", "attention", *cfg, *common,
                                    "--data-stream", "teacher", "--max-tokens", int(args.teacher_tokens),
                                    "--out-dir", runs / "teacher"], teacher):
            if runner.finish(runner.run(cmd, logs / "teacher.log")):
                raise SystemExit(f"experiment.py: teacher pretraining failed; see {logs / 'teacher.log'}")

    phase_done("data and teacher")

    T, M = args.student_tokens, args.student_minutes

    def budget(frac, stage="max"):  # a share of a student's budget in its unit, as --max-* or --e2e-* flags
        return [f"--{stage}-tokens", int(frac * T)] if T else [f"--{stage}-minutes", frac * M]

    def distill(name):  # each student reads its own stream of training windows
        return [PY, ROOT / "distill.py", "--teacher", teacher, *common, "--lr", "1e-3", "--data-stream", name]

    def finetune(name):
        return [PY, ROOT / "finetune.py", *common, "--lr", "3e-4", "--data-stream", name]
    scratch_cfg = ["--config", "tiny", "--preset", "tiny"] if tiny else ["--config", "pythia-70m"]
    jobs = {
        "paper": todo(distill("paper") + ["--init", "random", "--layers", "progressive", "--train", "block",
                                          *budget(0.5), "--out-dir", runs / "paper"], runs / "paper" / "final")
        + todo(finetune("paper") + ["--init", runs / "paper" / "final", *budget(0.5),
                                    "--out-dir", runs / "paper-ft"], runs / "paper-ft" / "final"),
        "best": todo(distill("best") + ["--init", "teacher", "--layers", "independent", *budget(0.25),
                                        *budget(0.75, "e2e"), "--out-dir", runs / "best"], runs / "best" / "final"),
        "best-ce": todo(distill("best-ce") + ["--init", "teacher", "--layers", "progressive", *budget(0.25),
                                              *budget(0.45, "e2e"), "--out-dir", runs / "best-ce"],
                        runs / "best-ce" / "final")
        + todo(finetune("best-ce") + ["--init", runs / "best-ce" / "final", *budget(0.3), "--lr", "1e-4",
                                      "--out-dir", runs / "best-ce-ft"], runs / "best-ce-ft" / "final"),
        "scratch": todo([PY, ROOT / "finetune.py", "--init", "scratch", "--mixer", "hyena", *scratch_cfg, *common,
                         "--lr", "1e-3", "--data-stream", "scratch", *budget(1), "--out-dir", runs / "scratch"],
                        runs / "scratch" / "final"),
    }
    runner.run_parallel({k: v for k, v in jobs.items() if v and k in students}, args.gpus, logs)
    phase_done("students")

    best = runs / "best" / "final"
    repair = [PY, ROOT / "distill.py", "--teacher", best, *common, "--layers", "none", "--e2e-minutes",
              args.modal_repair_minutes, "--e2e-lr", "1e-4", "--compile", "off"]  # too short to pay for compiling
    repairs = {f"modal-d{d}": todo(repair + ["--modal-state", d, "--out-dir", runs / "modal" / f"d{d}"],
                                   runs / "modal" / f"d{d}" / "final") for d in modal}
    runner.run_parallel({k: v for k, v in repairs.items() if v}, args.gpus, logs)  # a finished one has no command left
    if modal:
        phase_done("modal students")
    if args.long_context:
        long_context_steps(args, modal, teacher, runs, root, data, tok, logs)
        phase_done("long context")

    models = {"teacher": teacher, "scratch": runs / "scratch" / "final", "paper": runs / "paper" / "final",
              "paper-ft": runs / "paper-ft" / "final", "best": runs / "best" / "final",
              "best-ce-kd": runs / "best-ce" / "final", "best-ce": runs / "best-ce-ft" / "final"}
    trained = {"teacher", *students, *(f"{s}-ft" for s in students), "best-ce-kd" if "best-ce" in students else ""}
    evals, ev = {}, Path(args.runs) / "eval"
    for name, ckpt in ((n, c) for n, c in models.items() if n in trained):
        evals[name] = todo([PY, ROOT / "eval.py", "--ckpt", ckpt, "--data", *eval_sets, "--data-root", root,
                            "--context", args.block_size, "--tokenizer", tok, "--json", ev / f"{name}.json"],
                           ev / f"{name}.json")
    if modal:  # the conv student and every modal one before and after its repair, in one process
        evals["modal"] = todo([PY, ROOT / "eval.py", "--ckpt", best, *[runs / "modal" / f"d{d}" / stage for d in modal
                                                               for stage in ("converted", "final")],
                               "--data", data, "--data-root", root, "--context", args.block_size, "--tokenizer", tok,
                               "--json", ev / "modal.json"], ev / "modal.json")
    for dtype in ["fp64", "fp32", "bf16", "fp16"] if args.dtype_study else []:  # does precision move perplexity?
        evals[f"dtype-{dtype}"] = todo([PY, ROOT / "eval.py", "--ckpt", teacher, models["best"], "--data", data,
                                        "--data-root", root, "--context", args.block_size, "--dtype", dtype,
                                        "--max-tokens", 20000 if tiny else 262144, "--tokenizer", tok,
                                        "--json", ev / f"dtype-{dtype}.json"], ev / f"dtype-{dtype}.json")
    runner.run_parallel({k: v for k, v in evals.items() if v}, args.gpus, logs)
    wall = phase_done("evaluation")
    if harness:  # the paper recipe's final, the best recipe, the baseline, and every modal student there is
        picked = {"teacher": teacher, **{n: models[n] for n in ("paper-ft", "best", "scratch") if n in trained},
                  **{f"modal-d{d}": runs / "modal" / f"d{d}" / "final" for d in modal
                     if (runs / "modal" / f"d{d}" / "final").exists()}}
        runner.run_parallel({k: v for k, v in harness_steps(harness, picked, runs, args.block_size, tok).items() if v},
                     args.gpus, logs)
        wall = phase_done("harness tasks")

    report.main(["--runs", str(runs), "--results", args.results, *(["--student-tokens", f"{int(T)}"] if T else
                 ["--paper-minutes", str(M)]), "--wall-minutes", f"{wall / 60:.1f}", "--gpus", str(args.gpus)])


if __name__ == "__main__":
    import cli  # the one error path: exit 2 and one line, no traceback (--debug shows it)
    cli.run(main)
