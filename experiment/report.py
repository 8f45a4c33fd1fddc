"""Turn an experiment's runs (training logs, eval JSON) into results/: JSON, a markdown table, PNG plots (the
harness and long-context pages: experiment/pages.py; the sweep's: experiment/scaling.py).

    python experiment/report.py --runs runs/experiment --results results      # experiment.py calls this at the end
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python experiment/report.py`: import from the repo root
from experiment.pages import write_harness, write_longctx  # noqa: E402
from experiment.runner import spent, stages  # noqa: E402
from experiment.scaling_report import write_scaling  # noqa: E402
from cli import write_atomic  # noqa: E402

# Row label -> (run folders whose training stages it spent, in order; eval JSON name). Folders may be missing
# (e.g. a teacher loaded from the hub was not trained here).
ROWS = {
    "teacher (GPT-NeoX, attention)": (["teacher"], "teacher"),
    "pre-trained Hyena (from scratch)": (["scratch"], "scratch"),
    "distilled (paper: progressive MSE)": (["paper"], "paper"),
    "distilled + fine-tuned (paper)": (["paper", "paper-ft"], "paper-ft"),
    "best recipe (teacher init, align, KL)": (["best"], "best"),
    "teacher init, progressive, KL": (["best-ce"], "best-ce-kd"),
    "teacher init, progressive, KL, then CE": (["best-ce", "best-ce-ft"], "best-ce"),
}
CURVES = {"scratch (CE)": ["scratch"], "paper (progressive, CE)": ["paper", "paper-ft"],
          "best (independent, KL)": ["best"], "progressive, KL, CE": ["best-ce", "best-ce-ft"]}
PAPER = "Paper (Pythia-70M on OpenWebText, WikiText ppl): teacher 51.4, distilled Hyena 121.2 (2.36x)."


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def training_mode(runs):
    """How the training steps ran, from every stage's summary.json ("compiled" in train.py's summary): "compiled",
    "eager", or "mixed" naming the eager stages; None when no summary records it."""
    modes = {str(f.parent.relative_to(runs)): json.loads(f.read_text()).get("compiled")
             for f in sorted(runs.glob("**/summary.json")) if (f.parent / "log.jsonl").exists()}
    modes = {k: v for k, v in modes.items() if v is not None}
    if not modes:
        return None
    if len(set(modes.values())) == 1:
        return "compiled (torch.compile)" if next(iter(modes.values())) else "eager"
    return "mixed; eager: " + ", ".join(k for k, v in modes.items() if not v)


def curve(runs, folders):
    """(tokens, minutes, val CE) along the training of these folders, stages laid end to end."""
    pts, tok0, min0 = [], 0, 0.0
    for folder in folders:
        for st in stages(runs / folder):
            last = {"tokens": 0, "elapsed_s": 0.0}  # the step record a validation line follows
            for r in read_jsonl(st / "log.jsonl"):
                if "val" in r and "ce" in r["val"]:
                    pts.append((tok0 + r["tokens"], min0 + last["elapsed_s"] / 60, r["val"]["ce"]))
                elif "elapsed_s" in r:
                    last = r
            tok0, min0 = tok0 + last["tokens"], min0 + last["elapsed_s"] / 60
    return pts


def load_eval(path):
    return json.loads(Path(path).read_text())["results"] if Path(path).exists() else []


def build(runs):
    ev, out = runs / "eval", {"rows": {}, "curves": {}, "progressive_mse": [], "dtype": {}}
    for label, (folders, name) in ROWS.items():
        res = load_eval(ev / f"{name}.json")
        if res:
            tokens, minutes = spent(runs, folders)
            out["rows"][label] = {"datasets": res[0]["datasets"], "tokens": tokens, "gpu_minutes": minutes}
    for name, folders in CURVES.items():
        out["curves"][name] = curve(runs, folders)
    for st in sorted((runs / "paper").glob("stage-*")):  # per-layer MSE after each progressive stage
        vals = [r["val"] for r in read_jsonl(st / "log.jsonl") if "val" in r]
        if vals:
            out["progressive_mse"].append({k: v for k, v in vals[-1].items() if k.startswith("mse_")})
    for f in sorted(ev.glob("dtype-*.json")):
        for r in load_eval(f):
            for ds, v in r["datasets"].items():
                out["dtype"].setdefault(r["model"], {})[f.stem[len("dtype-"):]] = {"dataset": ds, **v}
    return out


def modal_study(runs):
    """The modal students (runs/modal/dD): per-layer filter errors, perplexity before and after the KL repair,
    against the convolutional student they came from (runs/eval/modal.json: eval.py on the training data)."""
    results = load_eval(runs / "eval" / "modal.json")
    first = next(iter(results[0]["datasets"]), None) if results else None
    by_path = {r["path"]: r["datasets"][first] for r in results if first in r["datasets"]}
    conv = next((v for p, v in by_path.items() if Path(p).parent.name == "best"), None)
    rows = []
    for d in sorted((runs / "modal").glob("d*"), key=lambda p: int(p.name[1:])):
        fit = json.loads((d / "modal_fit.json").read_text())["layers"] if (d / "modal_fit.json").exists() else []
        before, after = (by_path.get(str(d / s)) for s in ("converted", "final"))
        summary = json.loads((d / "e2e" / "summary.json").read_text()) if (d / "e2e" / "summary.json").exists() else {}
        rows.append({"state_size": int(d.name[1:]), "layers": fit, "before": before, "after": after,
                     "repair_tokens": summary.get("tokens"), "repair_minutes": summary.get("minutes")})
    return {"dataset": first, "conv": conv, "rows": rows} if rows else {}


def modal_markdown(m):
    """The modal study's table: filter error per layer, perplexity before/after repair and over the conv student."""
    conv = m["conv"]["token_ppl"] if m["conv"] else None
    head = "| d | filter rel. error per layer | ppl converted | ppl repaired | repaired / conv | repair tokens, min |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in m["rows"]:
        errs = " ".join(f"{f['rel_error']:.1e}" for f in r["layers"])
        b, a = (r[k]["token_ppl"] if r[k] else None for k in ("before", "after"))
        cell = (lambda v, f: format(v, f) if v is not None else "-")
        budget = f"{r['repair_tokens'] / 1e6:.1f}M, {r['repair_minutes']:.2f}" if r["repair_tokens"] else "-"
        lines.append(f"| {r['state_size']} | {errs} | {cell(b, '.2f')} | {cell(a, '.2f')} | "
                     f"{cell(a / conv if a and conv else None, '.4f')} | {budget} |")
    return (f"Modal students on {m['dataset']} (token perplexity); the convolutional student: "
            f"{conv:.2f}\n\n" if conv else "") + "\n".join(lines) + "\n"


def minutes_label(gpus):
    """The table's unit: minutes of the devices that trained (GPU-minutes, or CPU-minutes for --gpus 0)."""
    return "CPU" if str(gpus) == "0" else "GPU"


def markdown(res, meta, unit="GPU"):
    datasets = sorted({d for r in res["rows"].values() for d in r["datasets"]}, key=lambda d: (d != "gutenberg", d))
    head = "| model | " + " | ".join(f"{d} ppl | {d} word ppl | {d} bits/byte" for d in datasets) + \
        f" | vs teacher | tokens | {unit}-min |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    teacher = next(iter(res["rows"].values()), None)
    first = datasets[0] if datasets else None
    for label, r in res["rows"].items():
        cells = []
        for d in datasets:
            v = r["datasets"].get(d, {})
            cells += [f"{v['token_ppl']:.2f}" if "token_ppl" in v else "-",
                      f"{v['word_ppl']:.2f}" if v.get("word_ppl") else "-",
                      f"{v['bits_per_byte']:.4f}" if v.get("bits_per_byte") else "-"]
        ratio = r["datasets"][first]["token_ppl"] / teacher["datasets"][first]["token_ppl"]
        tokens = f"{r['tokens'] / 1e6:.1f}M" if r["tokens"] >= 1e5 else f"{r['tokens'] / 1e3:.1f}k"  # CPU-sized
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio:.3f}x | {tokens} | "
                     f"{r['gpu_minutes']:.2f} |")
    text = "\n".join(lines) + f"\n\n'vs teacher': token perplexity on {first} over the teacher's. {PAPER}\n"
    if res["dtype"]:
        dts = ["fp64", "fp32", "bf16", "fp16"]
        text += "\n| model (evaluation precision) | " + " | ".join(dts) + " |\n|---|" + "---|" * len(dts) + "\n"
        for model, by in res["dtype"].items():
            label = Path(model).parent.name if Path(model).name in ("final", "ckpt") else model  # hub ids as given
            text += f"| {label} | " + " | ".join(
                f"{by[d]['token_ppl']:.4f}" if d in by else "-" for d in dts) + " |\n"
    return text + "\n" + " ".join(f"{k}: {v}." for k, v in meta.items()) + "\n"


PLOTS = ("val_loss.png", "progressive_mse.png", "perplexity.png")


def plots(res, out, unit="GPU"):
    """Draws PLOTS into out; returns False (saying so) where matplotlib, an optional dependency, is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"report.py: plots skipped: matplotlib is not installed, so {', '.join(PLOTS)} were not drawn in "
              f"{out} (the table and JSON were written). pip install matplotlib, then run experiment/report.py again",
              file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, pts in res["curves"].items():
        if pts:
            axes[0].plot([p[0] / 1e6 for p in pts], [p[2] for p in pts], label=name, marker=".")
            axes[1].plot([p[1] for p in pts], [p[2] for p in pts], label=name, marker=".")
    teacher = next((r for label, r in res["rows"].items() if label.startswith("teacher")), None)
    for ax, xl in zip(axes, ["tokens (M)", f"{unit}-minutes"]):
        if teacher and "gutenberg" in teacher["datasets"]:
            ax.axhline(teacher["datasets"]["gutenberg"]["nll"] / teacher["datasets"]["gutenberg"]["tokens"],
                       color="k", ls="--", label="teacher")
        ax.set(xlabel=xl, ylabel="validation CE (nats/token)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=110)
    if res["progressive_mse"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        layers = sorted(res["progressive_mse"][0], key=lambda k: int(k.split("_")[1]))
        for k in layers:
            ax.plot(range(len(res["progressive_mse"])), [m[k] for m in res["progressive_mse"]], marker="o", label=k)
        ax.set(xlabel="after progressive stage", ylabel="relative MSE vs teacher", yscale="log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "progressive_mse.png", dpi=110)
    if res["rows"]:
        labels = list(res["rows"])
        datasets = list(next(iter(res["rows"].values()))["datasets"])
        fig, ax = plt.subplots(figsize=(10, 4))
        w = 0.8 / len(labels)
        for i, label in enumerate(labels):
            ax.bar([j + i * w for j in range(len(datasets))],
                   [res["rows"][label]["datasets"].get(d, {}).get("token_ppl", 0) for d in datasets], w, label=label)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(datasets))], datasets)
        ax.set(ylabel="token perplexity", yscale="log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "perplexity.png", dpi=110)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/experiment")
    p.add_argument("--results", default="results")
    p.add_argument("--paper-minutes", help="student budget (device-minutes), recorded in the table's notes")
    p.add_argument("--student-tokens", help="student budget in tokens (the CPU-sized run's), recorded likewise")
    p.add_argument("--wall-minutes", help="the experiment's wall time, recorded in the notes")
    p.add_argument("--gpus", help="GPUs used, recorded in the notes (0: a CPU run, timed in CPU-minutes)")
    args = p.parse_args(argv)
    runs, out = Path(args.runs), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    res = build(runs)
    unit = minutes_label(args.gpus)
    meta = {k: v for k, v in {f"student budget ({unit}-minutes)": args.paper_minutes,
                              "student budget (tokens)": args.student_tokens, "GPUs": args.gpus,
                              "experiment wall time (minutes)": args.wall_minutes,
                              "training steps": training_mode(runs)}.items() if v}
    res["meta"] = meta
    for name, text in [("experiment.json", json.dumps(res, indent=1)), ("RESULTS.md", markdown(res, meta, unit))]:
        write_atomic(out / name, text)
    res["modal"] = modal_study(runs)
    if res["modal"]:
        text = modal_markdown(res["modal"])
        write_atomic(out / "MODAL.md", text)
        write_atomic(out / "experiment.json", json.dumps(res, indent=1))
    write_harness(runs, out, {name: label for label, (_, name) in ROWS.items()})
    plots(res, out, unit)
    write_longctx(runs, out)
    write_scaling(runs, out)
    print((out / "RESULTS.md").read_text())


if __name__ == "__main__":
    import cli  # the one error path: exit 2 and one line, no traceback (--debug shows it)
    cli.run(main)
