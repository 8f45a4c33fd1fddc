"""Issue 27's recipe search, one device call at a time: idempotent, it resumes where the last call stopped.
    python experiment/plans/recipe-2026-12-07b.py search SECONDS     # teacher, then the greedy search at 1/4
    python experiment/plans/recipe-2026-12-07b.py final SECONDS      # the winner at 1x, branches at 1/8, 1/4, 1/2
    python experiment/plans/recipe-2026-12-07b.py report RUNS CLAIM  # here: RUNS the runs/ brought back, CLAIM the
                                                                     # claim's results folder (scaling.json)
Carried: .carry/ (small.tar.xz: tokenizer, VAL.txt, WikiText-2, the OpenWebText sample; gutenberg.tar.xz).

The teacher is claim-2026-12-07.sh's (70m, 160M Gutenberg tokens, seed 1337). Every candidate is `best` (teacher
init, independent alignment of the mixers for a fixed share, then end-to-end KL, wsd) at 1/4 of the teacher's
training GPU-minutes, seed 1337, data stream "best": the control is the sweep's best at 1/4 (same command and
settings, this run's teacher, a run of its own rather than a branch). A greedy coordinate search changes one
setting of the incumbent at a time and keeps a change that lowers Gutenberg-val perplexity (1M tokens, context
2048: the table's protocol) by more than KEEP (the two seeds of the claim's best@1/4 differed by 0.25 %). Each move is decided from the results of the moves before it, all cached in runs/search/, so a call
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

KEEP = 0.003  # a change is kept when it lowers the perplexity by more than 0.3 % (seed noise: ~0.25 %)
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
            raise SystemExit(f"deadline: {log} killed before its checkpoint; call again (it resumes from the last one)")
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


# The candidates, in order: one change each to the incumbent of its turn (None: skip it). The run of 2026-12-07
# read every move from the control (a generator over the first incumbent's dict), so it never tried e2e lr 2e-3
# and halved the control's alignment; the winner's 1/16 -> 1/32 was the same change either way.
MOVES = [lambda s: ("e2e_lr", 1e-3),
         lambda s: ("e2e_lr", 2e-3) if s["e2e_lr"] == 1e-3 else None,
         lambda s: ("train", "mixer"),
         lambda s: ("align", s["align"] / 2)]


def search(teacher, minutes):
    best, tried = dict(BASE), []
    best_ppl = trial(best, teacher, minutes)
    tried.append((name_of(best), best_ppl, "control"))
    for move in MOVES:
        if move(best) is None:
            continue
        key, value = move(best)
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


def report(runs, claim):
    """CLAIM/TUNED.md and tuned_vs_budget.png: the search's trials, and the winner's points beside the claim run's
    recipes, each as a ratio to its own run's teacher (the two teachers: the same command and seed)."""
    from experiment.runner import spent
    won = json.loads((runs / "search/winner.json").read_text())
    s, name = won["settings"], name_of(won["settings"])
    claim_s = json.loads((claim / "scaling.json").read_text())
    ppl = json.loads((runs / "final/eval.json").read_text())["results"]
    ppl = {r["path"]: r["datasets"]["gutenberg"]["token_ppl"] for r in ppl}
    teacher = ppl["runs/exp/teacher/final"]
    minutes = json.loads((runs / "exp/teacher/summary.json").read_text())["minutes"]
    align = float(budget_name(s["align"] * minutes))
    tuned = {}
    for b in (0.125, 0.25, 0.5, 1.0):
        folder = RUNS / "final" / (name if b == 1.0 else f"{name}@{budget_name(float(budget_name(b * minutes - align)))}")
        tokens, used = spent(runs.parent, [Path("runs") / folder.relative_to(RUNS)])
        tuned[b] = dict(ppl=ppl[str(folder / "final")], tokens=tokens, minutes=used)
    old = {(r["recipe"], r["budget"]): r for r in claim_s["rows"]}
    ans = next(iter(claim_s["answers"].values()))
    lines = ["# `best`, tuned: issue 27's recipe search", "",
             "Made by `experiment/plans/recipe-2026-12-07b.py` (commit b222372) on one H100; logs and every run's JSON "
             "in `results/gpu-logs-2026-12-07b/`. The claim run beside it: `SCALING.md` (commit b4c8eb5).", "",
             f"Teacher: the claim's command and seed, retrained: {teacher:.2f} Gutenberg-val ppl after {minutes:.3f} "
             f"GPU-minutes (the claim's: {ans['teacher_ppl']:.2f} after {ans['teacher_minutes']:.3f}).", "",
             "## The search (every candidate at 1/4 of the teacher's GPU-time, seed 1337)", "",
             "| candidate | e2e lr | alignment (x teacher's time) | e2e trains | ppl | x teacher | decision |",
             "|---|---:|---:|---|---:|---:|---|"]
    for n, p_, what in won["tried"]:
        c = json.loads(json.dumps(n.split("-")))
        lines.append(f"| `{n}` | {c[0][2:]} | {c[1][1:]} | {c[2]} | {p_:.2f} | {p_ / teacher:.3f} | {what} |")
    lines += ["", f"Winner: `--e2e-lr {s['e2e_lr']:g}`, alignment {s['align']:g}x of the teacher's time, "
              f"`--e2e-train {s['train']}`, tau {s['tau']:g}.", "",
              "## The winner at every budget (one wsd run at 1x, branches at 1/8, 1/4, 1/2)", "",
              "| budget | tuned best | x its teacher | claim's best (x) | paper (x) | scratch (x) | tuned / scratch |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for b, t in tuned.items():
        o = {r: old.get((r, b)) for r in ("best", "paper", "scratch")}
        lines.append(f"| {b:g}x | **{t['ppl']:.2f}** | {t['ppl'] / teacher:.3f} | "
                     + " | ".join(f"{o[r]['ppl']:.2f} ({o[r]['ratio']:.3f})" for r in o)
                     + f" | {(t['ppl'] / teacher) / o['scratch']['ratio']:.3f} |")
    lines += ["", "Tokens and GPU-minutes the tuned runs spent (alignment + end to end): "
              + "; ".join(f"{b:g}x {t['tokens'] / 1e6:.1f}M in {t['minutes']:.2f} min" for b, t in tuned.items()), ""]
    write_atomic(claim / "TUNED.md", "\n".join(lines))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for r in ("best", "paper", "scratch"):
        rs = sorted((x for x in claim_s["rows"] if x["recipe"] == r), key=lambda x: x["budget"])
        ax.plot([x["budget"] for x in rs], [x["ratio"] for x in rs], marker="o", label=f"{r} (claim run)")
    ax.plot(list(tuned), [t["ppl"] / teacher for t in tuned.values()], marker="s", color="k", label="best, tuned")
    ax.axhline(1.10, color="gray", ls=":", lw=1, label="targets: 1.10 at 1/4, 1.05 at 1")
    ax.axhline(1.05, color="gray", ls=":", lw=1)
    ax.set(xscale="log", xlabel="student budget (x the teacher's training GPU-time)",
           ylabel="ppl / teacher's ppl", title="Gutenberg-val, 1M tokens, context 2048 (one H100)")
    ax.set_xticks(list(tuned), [f"{b:g}" for b in tuned])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(claim / "tuned_vs_budget.png", dpi=120)


if __name__ == "__main__":
    if sys.argv[1] == "report":
        report(Path(sys.argv[2]), Path(sys.argv[3]))
        raise SystemExit(0)
    MODE, DEADLINE = sys.argv[1], float(sys.argv[2])
    if MODE not in ("search", "final"):
        raise SystemExit(f"{sys.argv[0]}: mode {MODE!r}: choose search, final or report")
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
