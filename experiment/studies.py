"""experiment.py's two optional studies: the long-context study (--long-context: a long fine-tune, context sweeps,
passkeys, inference and training speed) and the lm-evaluation-harness tasks on the experiment's checkpoints
(--harness). Each adds its flags and its steps.
"""
import importlib.util
import json
from pathlib import Path

from experiment import runner
from experiment.runner import PY, ROOT, todo
from cli import write_atomic

HARNESS_TASKS = ROOT / "harness" / "tasks"  # the offline lm-eval tasks (--harness); eval.py --tasks reads them
HARNESS_DATA = Path("data") / "harness"  # where their YAMLs read the data: relative to the cwd, as they say


def add_long_args(p):
    g = p.add_argument_group("long context (issue 15)")
    g.add_argument("--long-context", type=int, default=0, help="after the modal students, CE fine-tune runs/modal/dD "
                   "at this many tokens per sequence (same tokens per step as the 2k runs) into runs/long, then sweep "
                   "context, probe passkeys and time training steps (default 0: off; needs --modal)")
    g.add_argument("--long-minutes", type=float, help="budget of that fine-tuning (default: --student-minutes; "
                   "0.5 with token budgets)")
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
    # A tiny run's students have token budgets (--student-tokens): its long fine-tune takes 0.5 minutes then.
    minutes = args.long_minutes if args.long_minutes is not None else args.student_minutes or 0.5
    tune = todo([PY, ROOT / "finetune.py", "--init", start, "--data", data, "--data-root", root, "--block-size", long,
                 "--batch-size", tokens // long, "--seed", args.seed, "--eval-interval", 50 if tiny else 100,
                 "--eval-batches", 4 if tiny else 8, "--log-interval", 10, "--lr", "1e-4", "--compile", args.compile,
                 "--max-minutes", minutes, "--out-dir", runs / "long"], final)
    runner.run_parallel({"long": tune} if tune else {}, args.gpus, logs)
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
    runner.run_parallel({k: v for k, v in jobs.items() if v}, args.gpus, logs)


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
