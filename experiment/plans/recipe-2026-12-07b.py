"""Issue 27's recipe search, one device call at a time: idempotent, it resumes where the last call stopped.
    python experiment/plans/recipe-2026-12-07b.py search SECONDS     # teacher, then the greedy search at 1/4
    python experiment/plans/recipe-2026-12-07b.py final SECONDS      # the winner at 1x, branches at 1/8, 1/4, 1/2
Carried: .carry/ (small.tar.xz: tokenizer, VAL.txt, WikiText-2, the OpenWebText sample; gutenberg.tar.xz).

The teacher is claim-2026-12-07.sh's (70m, 160M Gutenberg tokens, seed 1337). Every candidate is `best` (teacher
init, independent alignment of the mixers for a fixed share, then end-to-end KL, wsd) at 1/4 of the teacher's
training GPU-minutes, seed 1337, data stream "best": the control is bitwise the sweep's best@1/4. A greedy
coordinate search changes one setting of the incumbent at a time and keeps a change that lowers Gutenberg-val
perplexity (1M tokens, context 2048: the table's protocol) by more than KEEP (the two seeds of best@1/4 differed
by 0.16 %). Each move is decided from the results of the moves before it, all cached in runs/search/, so a call
replays the decisions and runs the first candidate without a score.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiment import runner  # noqa: E402
from experiment.experiment import prepare_commands  # noqa: E402
from experiment.runner import PY, ROOT, todo  # noqa: E402
from experiment.scaling import teacher_minutes  # noqa: E402
from training.branches import branch_folder, budget_name  # noqa: E402
from cli import write_atomic  # noqa: E402

KEEP = 0.003  # a change is kept when it lowers the perplexity by more than 0.3 %
BASE = dict(e2e_lr=3e-4, align=0.0625, train="all", tau=1.0, ce=0.0)  # the sweep's `best`
SHARED, DATA, RUNS, LOGS = Path("data/shared"), Path("data"), Path("runs"), Path("runs/logs")
TOK = SHARED / "tokenizer/20B_tokenizer.json"
SMOKE = os.environ.get("SMOKE") == "1"  # a CPU rehearsal of the plan: a tiny teacher, short windows
CTX, TEACHER_TOKENS, SHAPE = (128, 300_000, "tiny") if SMOKE else (2048, 160_000_000, "pythia-70m")
EVAL_TOKENS = 20_000 if SMOKE else 1_000_000
COMMON = ["--data", "gutenberg", "--data-root", DATA, "--block-size", CTX, "--batch-size", 16, "--seed", 1337,
          "--eval-interval", 250, "--eval-batches", 8, "--log-interval", 10, "--compile", "auto"]
T0 = time.time()


def left():
    return DEADLINE - (time.time() - T0)


def step(cmd, log):
    """Run cmd until done or the call's deadline; at the deadline SIGINT (the scripts checkpoint and stop), then
    this call ends: the next one resumes (runner.todo adds --resume)."""
    proc = runner.run(cmd, LOGS / log)
    try:
        proc.wait(timeout=max(1.0, left() - 40))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=35)
        except subprocess.TimeoutExpired:
            proc.kill()
        runner.finish(proc)
        raise SystemExit(f"deadline: {log} stopped with a checkpoint; call again")
    if runner.finish(proc):
        raise SystemExit(f"{log} failed (exit {proc.returncode}); see {LOGS / log}")


def setup():
    if not (DATA / "gutenberg" / "meta.json").exists():
        (SHARED / "corpus").mkdir(parents=True, exist_ok=True)
        with tarfile.open(".carry/small.tar.xz") as t:
            t.extractall(SHARED)
        shutil.copy(".carry/gutenberg.tar.xz", SHARED / "corpus")
        for cmd in prepare_commands(SHARED, TOK, DATA, "gutenberg"):
            step(cmd, "prepare.log")
    teacher = RUNS / "exp/teacher"
    for cmd in todo([PY, ROOT / "finetune.py", "--init", "scratch", "--mixer", "attention", "--config", SHAPE,
                     "--lr", 1e-3, *COMMON, "--eval-interval", 500, "--data-stream", "teacher", "--max-tokens",
                     TEACHER_TOKENS, "--out-dir", teacher], teacher / "final"):
        step(cmd, "teacher.log")
    return teacher / "final", teacher_minutes(teacher)


def name_of(s):
    return f"lr{s['e2e_lr']:g}-a{s['align']:g}-{s['train']}-t{s['tau']:g}-ce{s['ce']:g}"


def command(s, teacher, minutes, budget, out, branches=(), seed=1337):
    """distill.py for settings s at `budget` (a fraction of the teacher's minutes), as experiment/scaling.py's
    `best` builds it, with the searched settings."""
    align = float(budget_name(s["align"] * minutes))
    e2e = lambda b: budget_name(b * minutes - align)  # noqa: E731
    cmd = [PY, ROOT / "distill.py", "--teacher", teacher, *COMMON, "--lr", 1e-3, "--max-minutes", budget_name(align),
           "--init", "teacher", "--layers", "independent", "--align-compile", "off", "--schedule", "wsd",
           "--data-stream", "best", "--e2e-minutes", e2e(budget), "--e2e-lr", s["e2e_lr"], "--e2e-train", s["train"],
           "--kd-temperature", s["tau"], "--ce-weight", s["ce"], "--out-dir", out]
    cmd[cmd.index("--seed") + 1] = seed
    if branches:
        cmd += ["--branches", ",".join(e2e(b) for b in branches)]
    return cmd, {b: branch_folder(out, float(e2e(b))) for b in branches}


def score(finals, out):
    """Gutenberg-val perplexity of each final/ (1M tokens, context 2048), cached in `out`."""
    if not out.exists():
        step([PY, ROOT / "eval.py", "--ckpt", *finals, "--data", "gutenberg", "--split", "val", "--data-root", DATA,
              "--context", CTX, "--max-tokens", EVAL_TOKENS, "--tokenizer", TOK, "--json", out], "eval.log")
    return {r["path"]: r["datasets"]["gutenberg"]["token_ppl"] for r in json.loads(out.read_text())["results"]}


def trial(s, teacher, minutes):
    out = RUNS / "search" / name_of(s)
    for cmd in todo(command(s, teacher, minutes, 0.25, out)[0], out / "final"):
        step(cmd, f"{name_of(s)}.log")
    ppl = score([out / "final"], RUNS / "search" / f"{name_of(s)}.eval.json")[str(out / "final")]
    print(f"[search] {name_of(s)}: {ppl:.3f}", flush=True)
    return ppl


def moves(s):
    """The next candidates from incumbent s, in order: one change each (later ones read the kept ones)."""
    yield "e2e_lr", 1e-3
    if s["e2e_lr"] == 1e-3:
        yield "e2e_lr", 2e-3
    yield "train", "mixer"
    yield "align", s["align"] / 2


def search(teacher, minutes):
    best, tried = dict(BASE), []
    best_ppl = trial(best, teacher, minutes)
    tried.append((name_of(best), best_ppl, "control"))
    for key, value in moves(best):
        cand = {**best, key: value}
        if name_of(cand) in [t[0] for t in tried]:
            continue
        ppl = trial(cand, teacher, minutes)
        kept = ppl < best_ppl * (1 - KEEP)
        tried.append((name_of(cand), ppl, f"{key}={value}: {'kept' if kept else 'dropped'}"))
        if kept:
            best, best_ppl = cand, ppl
    write_atomic(RUNS / "search" / "winner.json", json.dumps({"settings": best, "ppl": best_ppl, "tried": tried},
                                                            indent=1) + "\n")
    return best


def final(teacher, minutes):
    w = json.loads((RUNS / "search" / "winner.json").read_text())["settings"]
    out = RUNS / "final" / name_of(w)
    cmd, branches = command(w, teacher, minutes, 1.0, out, branches=(0.125, 0.25, 0.5))
    for c in todo(cmd, out / "final"):
        step(c, "final.log")
    finals = [out / "final", *(b / "final" for b in branches.values())]
    print(json.dumps(score([teacher, *finals], RUNS / "final" / "eval.json"), indent=1))


if __name__ == "__main__":
    MODE, DEADLINE = sys.argv[1], float(sys.argv[2])
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        teacher, minutes = setup()
        print(f"[search] teacher {minutes:.3f} GPU-minutes", flush=True)
        winner = search(teacher, minutes) if MODE == "search" else None
        if MODE == "final":
            final(teacher, minutes)
    finally:
        out = Path(os.environ.get("OUT", "/tmp/out"))
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out / "out.tgz", "w:gz") as t:  # every log and JSON; no weights, no checkpoints
            for p in sorted(RUNS.rglob("*")):
                if p.is_file() and p.suffix in (".json", ".jsonl", ".log") and p.name != "tokenizer.json" \
                        and not {"ckpt", "ckpt.old"} & set(p.parts):
                    t.add(p)
