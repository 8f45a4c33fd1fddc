"""The paper's comparison end to end, with the project's own scripts: data -> teacher -> students -> evaluation.

    python experiment/experiment.py                           # every GPU here; results/ gets table + plots
    python experiment/experiment.py --teacher EleutherAI/pythia-70m --train-data openwebtext  # real Pythia, real data
    python experiment/experiment.py --preset tiny             # the whole chain on a CPU in minutes

Students, each given the same GPU-minutes (--student-minutes) on one GPU, run in parallel, one per GPU:
  paper    Hyena from random init, `progressive` layer-output MSE transfer, then CE fine-tuning (half each)
  best     Hyena projections from the teacher's attention, `independent` alignment, then end-to-end KL
  best+ce  teacher init, `progressive` alignment, end-to-end KL, then the last 30% of the budget on CE
           fine-tuning (evaluated before and after the CE stage: where does CE help, where does it hurt?)
  scratch  the paper's baseline: Hyena of the same shape trained from scratch with CE
--harness TASKS also scores teacher, paper-ft, best, scratch and the modal students on offline lm-eval tasks
(results/harness/HARNESS.md). Every step is skipped when its output exists, so an interrupted experiment resumes by
running it again; the console shows each running step's output (its progress lines), and runs/logs/ keeps all of it.
Without a GPU only `--preset tiny` runs (or `--allow-cpu` to insist on the full sizes).
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python experiment/experiment.py`: import from the repo root
from lib.cli import write_atomic
from experiment import report

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]  # the scripts it launches; data and run paths stay relative to the cwd
EVAL_SETS = ["gutenberg", "wikitext2", "owt-sample"]  # eval.py scores each one's test split, else its val
STUDENTS = ("paper", "best", "best-ce", "scratch")  # the student jobs below
HARNESS_TASKS = ROOT / "harness" / "tasks"  # the offline lm-eval tasks (--harness); eval.py --tasks reads them
HARNESS_DATA = Path("data") / "harness"  # where their YAMLs read the data: relative to the cwd, as they say


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


def relay(pipe, log, prefix):
    """Copy a step's output to its log and to the console, each console line prefixed with the step's name."""
    with log:
        for line in pipe:
            log.write(line)
            log.flush()
            sys.stderr.write(prefix + line)
            sys.stderr.flush()


def run(cmd, log, env=None):
    """Start one step, its output appended to log and shown on the console; finish(proc) waits for it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(map(str, cmd))}", file=sys.stderr, flush=True)
    f = open(log, "a")
    f.write(f"$ {' '.join(map(str, cmd))}\n")
    f.flush()
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}  # progress reaches the console as it is printed
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True, errors="replace")
    proc.relay = threading.Thread(target=relay, args=(proc.stdout, f, f"[{log.stem}] "), daemon=True)
    proc.relay.start()
    return proc


def finish(proc):
    """Wait for a step and for the last of its output; returns its exit status."""
    proc.wait()
    proc.relay.join()
    return proc.returncode


def run_parallel(jobs, gpus, logs):
    """jobs: {name: [cmd, ...]} run one job per GPU (commands of a job in order), waves when jobs > GPUs."""
    pending, running = list(jobs.items()), {}
    while pending or running:
        free = [g for g in range(max(gpus, 1)) if g not in running]
        while pending and free:
            name, cmds = pending.pop(0)
            g = free.pop(0)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(g)} if gpus else None
            running[g] = [name, cmds, env, run(cmds[0], logs / f"{name}.log", env)]
        time.sleep(1)
        for g, job in list(running.items()):
            name, cmds, env, proc = job
            if proc.poll() is None:
                continue
            if finish(proc):
                raise SystemExit(f"experiment.py: step {name!r} failed (exit {proc.returncode}); see {logs / name}.log")
            cmds.pop(0)
            if cmds:
                job[3] = run(cmds[0], logs / f"{name}.log", env)
            else:
                del running[g]


def add_wall_time(runs, phase, seconds):
    """Add a phase's wall time to runs/wall_time.json: a rerun that skips or resumes steps adds only the time
    it spends, so the experiment's recorded wall time stays the sum of the work actually done."""
    path = Path(runs) / "wall_time.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    times[phase] = times.get(phase, 0.0) + seconds
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(times, indent=1) + "\n")
    return sum(times.values())


def todo(cmd, out):
    """cmd unless out already exists (a finished step); --resume when the step left checkpoints behind."""
    if Path(out).exists():
        return []
    run_dir = Path(cmd[cmd.index("--out-dir") + 1]) if "--out-dir" in cmd else None
    started = run_dir is not None and any(run_dir.glob("**/ckpt*/train_state.pt"))
    return [cmd + ["--resume"] if started else cmd]


def add_long_args(p):
    g = p.add_argument_group("long context (issue 15)")
    g.add_argument("--long-context", type=int, default=0, help="after the modal students, CE fine-tune runs/modal/dD "
                   "at this many tokens per sequence (same tokens per step as the 2k runs) into runs/long, then sweep "
                   "context, probe passkeys and time training steps (default 0: off; needs --modal)")
    g.add_argument("--long-minutes", type=float, help="budget of that fine-tuning (default: --student-minutes)")
    g.add_argument("--long-modal", type=int, help="which modal student D to fine-tune (default: the first of --modal)")


def long_scale(contexts, long):
    """Lengths given for a 16k run, scaled to --long-context (at least 128 tokens each)."""
    return sorted({max(128, c * long // 16384) for c in contexts})


def long_context_steps(args, modal, teacher, runs, root, data, tok, logs):
    """The long-context study: fine-tune the modal student at --long-context, then context sweeps with eval.py
    (teacher: sliding window and its own RoPE extrapolation; conv `best`, modal dD and the long student), the
    passkey probe of the same models, and 2k vs long training-step speed. Every step skipped once its output
    exists. runs/longctx/models.json tells report.py which label is which model."""
    long, d = args.long_context, args.long_modal or modal[0]
    if d not in modal:
        raise ValueError(f"--long-modal {d}: not among --modal {args.modal}")
    tokens = args.batch_size * args.block_size
    if long <= args.block_size or tokens % long:
        raise ValueError(f"--long-context {long}: must exceed --block-size {args.block_size} and divide the "
                         f"{tokens} tokens per step (--batch-size x --block-size), so the step keeps its size")
    tiny, out = args.preset == "tiny", runs / "longctx"
    best = runs / "best" / "final"
    start, final = runs / "modal" / f"d{d}" / "final", runs / "long" / "final"
    models = {"teacher": str(teacher), "best": str(best), f"modal d{d}": str(start), "long": str(final)}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "models.json", json.dumps({"models": models, "block": args.block_size, "long": long,
                                                  "modal": d}, indent=1) + "\n")
    minutes = args.long_minutes if args.long_minutes is not None else args.student_minutes
    tune = todo([PY, ROOT / "finetune.py", "--init", start, "--data", data, "--data-root", root, "--block-size", long,
                 "--batch-size", tokens // long, "--seed", args.seed, "--eval-interval", 50 if tiny else 100,
                 "--eval-batches", 4 if tiny else 8, "--log-interval", 10, "--lr", "1e-4", "--compile", args.compile,
                 "--max-minutes", minutes, "--out-dir", runs / "long"], final)
    run_parallel({"long": tune} if tune else {}, args.gpus, logs)
    contexts = long_scale([512, 1024, 2048, 4096, 8192, 16384, 32768], long)
    lengths = long_scale([2048, 4096, 8192, 16384, 32768], long)
    score = max(16, 512 * long // 16384)
    compiled = ["--compile"] if args.gpus and args.compile != "off" else []  # a CPU compile costs more than the tiny sweep
    sweep = [PY, ROOT / "eval.py", "--data", data, "--data-root", root, "--context", *contexts, "--score-tokens",
             score, "--window-stride", score, *compiled]
    probe = [PY, ROOT / "experiment" / "longctx.py", "passkey", "--lengths", *lengths, "--trials", 4 if tiny else 20,
             "--tokenizer", tok, "--seed", args.seed]
    every = [teacher, best, start, final]
    jobs = {
        "sweep-window": todo(sweep + ["--ckpt", *every, "--beyond", "window", "--json", out / "sweep-window.json"],
                             out / "sweep-window.json"),
        "sweep-extrapolate": todo(sweep + ["--ckpt", teacher, "--beyond", "extrapolate",
                                           "--json", out / "sweep-extrapolate.json"], out / "sweep-extrapolate.json"),
        "passkey-window": todo(probe + ["--ckpt", *every, "--beyond", "window", "--json", out / "passkey-window.json"],
                               out / "passkey-window.json"),
        "passkey-extrapolate": todo(probe + ["--ckpt", teacher, "--beyond", "extrapolate",
                                             "--json", out / "passkey-extrapolate.json"], out / "passkey-extrapolate.json"),
        "infer": todo([PY, ROOT / "experiment" / "longctx.py", "infer", "--ckpt", teacher, final, "--contexts",
                       *long_scale([16384, 32768], long), "--tokens", 2 * long_scale([32768], long)[0], "--stride",
                       score, *(["--compile"] if args.gpus else []), "--json", out / "infer.json"],
                      out / "infer.json"),  # inference compiles on a GPU whatever --compile says (no training)
        "speed": todo([PY, ROOT / "experiment" / "longctx.py", "speed", "--ckpt", start, "--contexts", args.block_size,
                       long, "--tokens-per-step", tokens, "--steps", 4 if tiny else 10, *compiled,
                       "--json", out / "speed.json"], out / "speed.json"),
    }
    run_parallel({k: v for k, v in jobs.items() if v}, args.gpus, logs)


def add_harness_args(p):
    g = p.add_argument_group("lm-evaluation-harness", "the offline harness tasks on the experiment's checkpoints")
    g.add_argument("--harness", default="", metavar="TASK[,TASK]", help="offline lm-eval tasks from harness/tasks "
                   "(e.g. wikitext2_offline,gutenberg_lambada,gutenberg_next_sentence): prepare.py harness builds "
                   "their data, then eval.py --tasks scores teacher, paper-ft, best, scratch and each modal dD "
                   "into <runs>/eval/harness-<model>.json; report.py writes <results>/harness/ (needs lm-eval)")


def harness_tasks(spec):
    """--harness's task names, checked (known offline task, lm-eval installed) before any step runs."""
    names = [t for t in spec.split(",") if t]
    known = sorted(p.stem for p in HARNESS_TASKS.glob("*.yaml"))
    unknown = [t for t in names if t not in known]
    if unknown:
        raise ValueError(f"--harness {spec!r}: {', '.join(unknown)} is no offline task; choose from "
                         f"{', '.join(known)} (harness/tasks). lm-eval's own tasks download their data: run "
                         "eval.py --tasks on the checkpoints for those")
    if names and importlib.util.find_spec("lm_eval") is None:
        raise ValueError("--harness needs EleutherAI's lm-evaluation-harness, which is not installed: "
                         "pip install lm-eval==0.4.13 (requirements-dev.txt), or drop --harness")
    return names


def harness_prepare(shared):
    """prepare.py harness: deterministic and seconds long, so it runs every time, as the other data steps do."""
    return [PY, ROOT / "prepare.py", "harness", "--shared", shared, "--out-dir", HARNESS_DATA]


def harness_steps(tasks, models, runs, context, tok):
    """One eval.py --tasks step per model ({label: checkpoint}), each skipped once its JSON exists."""
    ev = Path(runs) / "eval"
    return {f"harness-{name}": todo([PY, ROOT / "eval.py", "--ckpt", ckpt, "--tasks", ",".join(tasks), "--context",
                                     context, "--tokenizer", tok, "--json", ev / f"harness-{name}.json"],
                                    ev / f"harness-{name}.json")  # no --include-path: eval.py knows harness/tasks
            for name, ckpt in models.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default="../shared/data", help="the offline data folder (corpus/, wikitext/, ...)")
    p.add_argument("--tokenizer", default=None, help="default: <shared>/tokenizer/20B_tokenizer.json")
    p.add_argument("--teacher", default="train", help="'train' (pretrain our own) or a hub id / checkpoint dir")
    p.add_argument("--train-data", default=None, help="prepared dataset to train on (default gutenberg)")
    p.add_argument("--teacher-tokens", type=float, help="teacher pretraining budget (default 160e6; tiny 1.5e5)")
    p.add_argument("--student-minutes", type=float, help="GPU-minutes per student (default 2; tiny 0.5)")
    p.add_argument("--batch-size", type=int, help="sequences per GPU per step (default 16; tiny 8)")
    p.add_argument("--block-size", type=int, help="context (default 2048; tiny 128)")
    p.add_argument("--gpus", type=int, default=None, help="default: all visible (0 = CPU)")
    p.add_argument("--allow-cpu", action="store_true", help="run the full-size comparison without a GPU "
                   "(weeks on a CPU; --preset tiny is the CPU-sized run)")
    p.add_argument("--preset", choices=["tiny"], help="tiny: CPU-sized model, data and budgets")
    p.add_argument("--runs", help="checkpoints and logs (default runs/experiment; tiny: runs/tiny)")
    p.add_argument("--data-root", default="data")
    p.add_argument("--results", help="table, JSON and plots (default results; tiny: runs/tiny/results, so a CPU "
                   "try-out never overwrites the committed GPU results)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--students", default=",".join(STUDENTS), help="which students to train (comma-separated, "
                   f"from {','.join(STUDENTS)})")
    p.add_argument("--compile", choices=("off", "auto", "on"), default="auto", help="torch.compile in the "
                   "training steps (train.py --compile; auto = on CUDA) and the long-context sweeps")
    p.add_argument("--dtype-study", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the teacher and `best` at fp64/fp32/bf16/fp16")
    p.add_argument("--modal", default="", help="state sizes d (e.g. 4,8,16,32,64): convert `best` to modal filters "
                   "with each (distill.py --modal-state), repair each by KL, and evaluate before and after")
    p.add_argument("--modal-repair-minutes", type=float, default=0.5, help="KL repair budget per modal student")
    add_long_args(p)
    add_harness_args(p)
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
    tiny = args.preset == "tiny"
    if args.gpus == 0 and not tiny and not args.allow_cpu:
        raise ValueError("no GPU here, and the full comparison (a 160M-token pythia-70m-shaped "
                         "teacher, then four students) would take weeks on a CPU. Run `python experiment/experiment.py "
                         "--preset tiny` for the whole chain at CPU size, or pass --allow-cpu to run the full "
                         "sizes anyway")
    defaults = dict(teacher_tokens=1.5e5, student_minutes=0.5, batch_size=8, block_size=128) if tiny else \
        dict(teacher_tokens=160e6, student_minutes=2.0, batch_size=16, block_size=2048)
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
        if finish(run(cmd, logs / "prepare.log")):
            raise SystemExit(f"experiment.py: data preparation failed; see {logs / 'prepare.log'}")
    if harness:
        if finish(run(harness_prepare(args.shared), logs / "prepare.log")):
            raise SystemExit(f"experiment.py: the harness tasks' data failed; see {logs / 'prepare.log'}")

    common = ["--data", data, "--data-root", root, "--block-size", args.block_size, "--batch-size",
              args.batch_size, "--seed", args.seed, "--eval-interval", 50 if tiny else 100, "--eval-batches",
              4 if tiny else 8, "--log-interval", 10, "--compile", args.compile]
    teacher = args.teacher
    if teacher == "train":
        teacher = runs / "teacher" / "final"
        launcher = [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}"] \
            if args.gpus > 1 else [PY]
        cfg = ["--config", "tiny", "--preset", "tiny"] if tiny else ["--config", "pythia-70m", "--lr", "1e-3"]
        for cmd in todo(launcher + [ROOT / "finetune.py", "--init", "scratch", "--mixer", "attention", *cfg, *common,
                                    "--max-tokens", int(args.teacher_tokens), "--out-dir", runs / "teacher"], teacher):
            if finish(run(cmd, logs / "teacher.log")):
                raise SystemExit(f"experiment.py: teacher pretraining failed; see {logs / 'teacher.log'}")

    phase_done("data and teacher")

    M = args.student_minutes
    distill = [PY, ROOT / "distill.py", "--teacher", teacher, *common, "--lr", "1e-3"]
    finetune = [PY, ROOT / "finetune.py", *common, "--lr", "3e-4"]
    scratch_cfg = ["--config", "tiny", "--preset", "tiny"] if tiny else ["--config", "pythia-70m"]
    jobs = {
        "paper": todo(distill + ["--init", "random", "--layers", "progressive", "--train", "block",
                                 "--max-minutes", M / 2, "--out-dir", runs / "paper"], runs / "paper" / "final")
        + todo(finetune + ["--init", runs / "paper" / "final", "--max-minutes", M / 2,
                           "--out-dir", runs / "paper-ft"], runs / "paper-ft" / "final"),
        "best": todo(distill + ["--init", "teacher", "--layers", "independent", "--max-minutes", 0.25 * M,
                                "--e2e-minutes", 0.75 * M, "--out-dir", runs / "best"], runs / "best" / "final"),
        "best-ce": todo(distill + ["--init", "teacher", "--layers", "progressive", "--max-minutes", 0.25 * M,
                                   "--e2e-minutes", 0.45 * M, "--out-dir", runs / "best-ce"], runs / "best-ce" / "final")
        + todo(finetune + ["--init", runs / "best-ce" / "final", "--max-minutes", 0.3 * M, "--lr", "1e-4",
                           "--out-dir", runs / "best-ce-ft"], runs / "best-ce-ft" / "final"),
        "scratch": todo([PY, ROOT / "finetune.py", "--init", "scratch", "--mixer", "hyena", *scratch_cfg, *common,
                         "--lr", "1e-3", "--max-minutes", M, "--out-dir", runs / "scratch"], runs / "scratch" / "final"),
    }
    run_parallel({k: v for k, v in jobs.items() if v and k in students}, args.gpus, logs)
    phase_done("students")

    best = runs / "best" / "final"
    repair = [PY, ROOT / "distill.py", "--teacher", best, *common, "--layers", "none", "--e2e-minutes",
              args.modal_repair_minutes, "--e2e-lr", "1e-4", "--compile", "off"]  # too short to pay for compiling
    repairs = {f"modal-d{d}": todo(repair + ["--modal-state", d, "--out-dir", runs / "modal" / f"d{d}"],
                                   runs / "modal" / f"d{d}" / "final") for d in modal}
    run_parallel({k: v for k, v in repairs.items() if v}, args.gpus, logs)  # a finished one has no command left
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
    run_parallel({k: v for k, v in evals.items() if v}, args.gpus, logs)
    wall = phase_done("evaluation")
    if harness:  # the paper recipe's final, the best recipe, the baseline, and every modal student there is
        picked = {"teacher": teacher, **{n: models[n] for n in ("paper-ft", "best", "scratch") if n in trained},
                  **{f"modal-d{d}": runs / "modal" / f"d{d}" / "final" for d in modal
                     if (runs / "modal" / f"d{d}" / "final").exists()}}
        run_parallel({k: v for k, v in harness_steps(harness, picked, runs, args.block_size, tok).items() if v},
                     args.gpus, logs)
        wall = phase_done("harness tasks")

    report.main(["--runs", str(runs), "--results", args.results, "--paper-minutes", str(M),
                 "--wall-minutes", f"{wall / 60:.1f}", "--gpus", str(args.gpus)])


if __name__ == "__main__":
    from lib import cli  # the one error path: exit 2 and one line, no traceback (--debug shows it)
    cli.run(main)
