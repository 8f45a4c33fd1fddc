"""The sweep's page (experiment.py --sweep, experiment/scaling.py): <runs>/sweep/points.json joined with each
point's eval.py perplexity and the tokens and minutes its runs spent, into <results>/scaling/SCALING.md,
scaling.json, ratio_vs_params.png (question 1: does distillation hold up with size?) and ppl_vs_minutes.png
(question 2: when does scratch catch up?). report.py writes it whenever points.json exists.
"""
import json
import math
import statistics
import sys
from pathlib import Path

from experiment.runner import spent, stages
from experiment.scaling import RECIPES
from cli import write_atomic


def collect(runs):
    """points.json joined with each point's perplexity and spend: {size: {recipe: {budget: [point, ...]}}}. Folders
    are read from <runs>; a point is matched to its eval row by the checkpoint argument eval.py was given. A finished
    point the eval step never scored (a sweep cut short) falls back to its run's own final validation (train.py's
    --eval-batches windows of the val split, the same for every run of a seed), marked source "train-val"; the
    teacher carries both, so that a ratio always divides like by like."""
    plan = json.loads((runs / "sweep" / "points.json").read_text())
    evals, table = {}, {}
    for p in plan["points"]:
        if p["eval"] not in evals:
            path = runs / p["eval"]
            rows = json.loads(path.read_text())["results"] if path.exists() else []
            evals[p["eval"]] = {r["path"]: next(iter(r["datasets"].values()))["token_ppl"] for r in rows}
        scored = {"eval": evals[p["eval"]].get(p["final"]), "train-val": run_validation(runs, p["folders"][0])}
        source = next((k for k, v in scored.items() if v is not None), None)
        if source is None:
            continue
        tokens, minutes = spent(runs, p["folders"])
        point = dict(seed=p.get("seed"), ppl=scored[source], source=source, scored=scored, tokens=tokens,
                     minutes=minutes, params=p["params"], teacher_tokens=p["teacher_tokens"])
        table.setdefault(p["size"], {}).setdefault(p["recipe"], {}).setdefault(p.get("budget", 0), []).append(point)
    return plan, table


def run_validation(runs, folder):
    """The token perplexity of a finished run's last validation (its last stage's summary.json), else None."""
    last = stages(runs / folder)[-1:]
    summary = last[0] / "summary.json" if last else None
    ce = (json.loads(summary.read_text()).get("val") or {}).get("ce") if summary and summary.exists() else None
    return math.exp(ce) if ce is not None else None


def mean_sd(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def crossover(by_recipe, budgets, recipe="best"):
    """The smallest budget where scratch's mean ppl is at or below recipe's, else None (not within the largest)."""
    best, scratch = by_recipe.get(recipe, {}), by_recipe.get("scratch", {})
    for b in budgets:
        if b in best and b in scratch and mean_sd([p["ppl"] for p in scratch[b]])[0] <= \
                mean_sd([p["ppl"] for p in best[b]])[0]:
            return b
    return None


def summarize(runs):
    plan, table = collect(runs)
    budgets, rows, answers = plan["budgets"], [], {}
    params = {p["size"]: p["params"] for p in plan["points"]}
    for size in sorted(table, key=params.get):
        by = table[size]
        teacher = by.get("teacher", {}).get(0, [None])[0]
        for recipe in (r for r in RECIPES if r in by):
            for b, pts in sorted(by[recipe].items()):
                m, sd = mean_sd([p["ppl"] for p in pts])
                like = [p["ppl"] / teacher["scored"][p["source"]] for p in pts
                        if teacher and teacher["scored"][p["source"]] is not None]  # like by like
                ratio, ratio_sd = mean_sd(like) if len(like) == len(pts) else (None, None)
                rows.append(dict(size=size, params=params[size], recipe=recipe, budget=b, ppl=m, ppl_sd=sd,
                                 seeds=[p["seed"] for p in pts], ratio=ratio, ratio_sd=ratio_sd,
                                 source="+".join(sorted({p["source"] for p in pts})),
                                 tokens=statistics.fmean(p["tokens"] for p in pts),
                                 minutes=statistics.fmean(p["minutes"] for p in pts)))
        measured = sorted(set(by.get("best", {})) & set(by.get("scratch", {})))
        paper = sorted(set(by.get("paper", {})) & set(by.get("scratch", {})))
        answers[size] = dict(params=params[size], teacher_ppl=teacher and teacher["ppl"],
                             teacher_source=teacher and teacher["source"],
                             teacher_tokens=teacher and teacher["tokens"], teacher_minutes=teacher and teacher["minutes"],
                             crossover=crossover(by, measured), bound=measured[-1] if measured else None,
                             paper_vs_scratch={b: (mean_sd([p["ppl"] for p in by["paper"][b]])[0],
                                                   mean_sd([p["ppl"] for p in by["scratch"][b]])[0]) for b in paper})
    return dict(data=plan["data"], context=plan["context"], gpus=plan.get("gpus"), budgets=budgets,
                budget_unit=plan.get("budget_unit", "minutes"), align_minutes=plan["align_minutes"], rows=rows,
                answers=answers)


def unit(s):
    """GPU, or CPU for a sweep run without a GPU (the tiny preset): what a budget's minutes are minutes of."""
    return "CPU" if s.get("gpus") == 0 else "GPU"


def budget_label(s, b=None):
    """How a budget reads: '0.25x' the teacher's training GPU-minutes, or '2 GPU-min'."""
    if s["budget_unit"] == "teacher":
        return f"of the teacher's {unit(s)}-time" if b is None else f"{b:g}x"
    return f"{unit(s)}-minutes" if b is None else f"{b:g}"


def mark(source):
    return "" if source == "eval" else " †"


def markdown(s):
    u, rel = unit(s), s["budget_unit"] == "teacher"
    what = (f"fractions of the teacher's own training {u}-time (its minutes: the teacher tokens column's cost)"
            if rel else f"{u}-minutes per recipe")
    out = ["# Scale and crossover (experiment.py --sweep)\n",
           f"{s['data']}-val token perplexity at context {s['context']}. Budgets are {what}; best's "
           f"alignment and paper's MSE stage take a fixed {budget_label(s, s['align_minutes'])} of each; every budget's point "
           "is a warmup-stable-decay branch of one run (train.py --branches). ± is the standard deviation over "
           f"seeds; tokens and {u}-minutes are what the point's runs spent (seed mean), compiling excluded. † marks a "
           "perplexity from the run's own final validation (train.py's --eval-batches windows of the val split), "
           "where the sweep's eval step did not run; its ratio divides by the teacher's on the same windows.\n",
           "| size | params | teacher ppl | teacher tokens | recipe | budget | ppl | / teacher | seeds | tokens | "
           f"{u}-min |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in s["rows"]:
        a = s["answers"][r["size"]]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}" + \
            (f" ± {r['ratio_sd']:.3f}" if r["ratio_sd"] is not None else "")
        teacher = ("-", "-") if a["teacher_ppl"] is None else \
            (f"{a['teacher_ppl']:.2f}" + mark(a["teacher_source"]), f"{a['teacher_tokens'] / 1e6:.1f}M")
        out.append(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {teacher[0]} | {teacher[1]} | {r['recipe']} | "
                   f"{budget_label(s, r['budget'])} | {r['ppl']:.2f}{mark(r['source'])} | {ratio} | {len(r['seeds'])} | {r['tokens'] / 1e6:.1f}M | "
                   f"{r['minutes']:.2f} |")
    out += ["", "## When does scratch catch up? (question 2)", ""]
    for size, a in s["answers"].items():
        if a["bound"] is None:
            out.append(f"- {size}: not measured (needs both best and scratch)")
        elif a["crossover"] is None:
            out.append(f"- {size}: no crossover within {budget_label(s, a['bound'])} {budget_label(s)}: best stays "
                       "ahead at every measured budget")
        else:
            out.append(f"- {size}: scratch catches up by {budget_label(s, a['crossover'])} {budget_label(s)} (the "
                       "first measured budget where its perplexity is at or below best's)")
    if any(a["paper_vs_scratch"] for a in s["answers"].values()):
        out += ["", "## The paper's recipe (progressive MSE, then CE) against scratch", "",
                f"| size | budget ({budget_label(s)}) | paper ppl | scratch ppl | paper / scratch |", "|---|---:|---:|---:|---:|"]
        for size, a in s["answers"].items():
            for b, (pp, sp) in sorted(a["paper_vs_scratch"].items()):
                out.append(f"| {size} | {budget_label(s, b)} | {pp:.2f} | {sp:.2f} | {pp / sp:.3f} |")
    return "\n".join(out) + "\n"


def plot(s, out):
    """ratio_vs_params.png (question 1) and ppl_vs_minutes.png (question 2); False where matplotlib is missing."""
    u = unit(s)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"report.py: {out}/*.png skipped: matplotlib is not installed", file=sys.stderr)
        return False
    if not s["rows"]:
        print(f"report.py: {out}/*.png skipped: no sweep point has been evaluated yet", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for recipe in RECIPES:
        for b in s["budgets"]:
            rs = [r for r in s["rows"] if r["recipe"] == recipe and r["budget"] == b and r["ratio"] is not None]
            if rs:
                ax.errorbar([r["params"] for r in rs], [r["ratio"] for r in rs], yerr=[r["ratio_sd"] or 0 for r in rs],
                            marker="o", capsize=3, label=f"{recipe}, {budget_label(s, b)} {budget_label(s)}")
    ax.set(xscale="log", xlabel="parameters", ylabel="ppl / teacher ppl", title="Does distillation hold up with size?")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ratio_vs_params.png", dpi=120)
    plt.close(fig)
    sizes = list(s["answers"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.5), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for recipe in RECIPES:
            rs = sorted((r for r in s["rows"] if r["size"] == size and r["recipe"] == recipe), key=lambda r: r["budget"])
            if rs:
                ax.errorbar([r["minutes"] for r in rs], [r["ppl"] for r in rs], yerr=[r["ppl_sd"] or 0 for r in rs],
                            marker="o", capsize=3, label=recipe)
        if s["answers"][size]["teacher_ppl"]:
            ax.axhline(s["answers"][size]["teacher_ppl"], color="gray", ls="--", label="teacher")
        ax.set(xscale="log", ylabel="ppl", title=size, xlabel=f"{u}-minutes" if s["budget_unit"] == "minutes" else
               f"x teacher's {u}-time; {u}-min")
        ticks = [statistics.fmean(r["minutes"] for r in s["rows"] if r["size"] == size and r["budget"] == b)
                 for b in s["budgets"] if any(r["size"] == size and r["budget"] == b for r in s["rows"])]
        shown = [b for b in s["budgets"] if any(r["size"] == size and r["budget"] == b for r in s["rows"])]
        ax.set_xticks(ticks, [f"{budget_label(s, b)}\n{t:.2g}" if s["budget_unit"] == "teacher" else f"{t:.2g}"
                              for b, t in zip(shown, ticks)], minor=False)
        ax.minorticks_off()  # the budgets, not log-scale minor labels
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_minutes.png", dpi=120)
    plt.close(fig)
    return True


def write_scaling(runs, results):
    """<results>/scaling/: SCALING.md, scaling.json and the two plots, when <runs>/sweep/points.json exists."""
    if not (Path(runs) / "sweep" / "points.json").exists():
        return None
    s = summarize(Path(runs))
    out = Path(results) / "scaling"
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "scaling.json", json.dumps(s, indent=1) + "\n")
    write_atomic(out / "SCALING.md", markdown(s))
    plot(s, out)
    return s
