"""report.py's two further pages: results/harness/ (lm-evaluation-harness tasks per checkpoint, from
experiment.py --harness) and results/longctx/ (the long-context study, from experiment.py --long-context).
"""
import json
import sys
from pathlib import Path

from cli import write_atomic

HARNESS_ORDER = ["teacher", "paper-ft", "best", "scratch"]  # then modal-dD by d
TASK_YAMLS = Path(__file__).resolve().parents[1] / "harness" / "tasks"


def task_description(task):
    """A task's definition in one line: its YAML's leading comment (harness/tasks), else lm-eval's own task."""
    path = TASK_YAMLS / f"{task}.yaml"
    if not path.is_file():
        return "lm-eval's own task (see its documentation)"
    lines = path.read_text().splitlines()
    comment = [line.lstrip("#").strip() for line in lines[:next((i for i, x in enumerate(lines)
                                                                 if not x.startswith("#")), len(lines))]]
    return " ".join(comment)


def logged_command(log, needle):
    """The last command a step's log records ("$ ..." lines, appended per run) that contains needle, shown as run
    from the repo root: the interpreter as `python`, the repo's scripts and harness/tasks by their repo paths."""
    cmds = [line[2:].split() for line in (log.read_text().splitlines() if log.exists() else [])
            if line.startswith("$ ") and needle in line]
    if not cmds:
        return None
    out = ["python"]
    for arg in cmds[-1][1:]:
        if arg.startswith("/") and arg.endswith((".py", "/harness/tasks")):
            arg = "harness/tasks" if arg.endswith("/harness/tasks") else Path(arg).name
        out.append(arg)
    return " ".join(out)


def harness_results(runs, labels):
    """runs/eval/harness-<model>.json (eval.py --tasks, one model each) -> {tasks, models, commands}, or {};
    labels: {eval name: the row label report.py gives it}."""
    files = {f.stem[len("harness-"):]: f for f in (runs / "eval").glob("harness-*.json")}
    order = HARNESS_ORDER + sorted((n for n in files if n not in HARNESS_ORDER),
                                   key=lambda n: (not n.startswith("modal-d"), int(n[7:]) if n[7:].isdigit() else 0, n))
    models, tasks, commands = {}, {}, {}
    prep = logged_command(runs / "logs" / "prepare.log", "prepare.py harness")
    if prep:
        commands["data"] = prep
    for name in (n for n in order if n in files):
        out = json.loads(files[name].read_text())
        r = out["results"][0]
        label = labels.get(name) or (f"best, modal filters d={name[7:]} (KL-repaired)"
                                             if name.startswith("modal-d") else name)
        models[name] = {"label": label, "path": r["path"], "context": r["context"], "dtype": out["dtype"],
                        "tasks": r["tasks"]}
        for task, metrics in r["tasks"].items():
            known = tasks.setdefault(task, {"description": task_description(task), "metrics": []})["metrics"]
            known += [m for m in metrics if not m.endswith("_stderr") and m not in known]
        cmd = logged_command(runs / "logs" / f"harness-{name}.log", "eval.py")
        if cmd:
            commands[name] = cmd
    return {"tasks": tasks, "models": models, "commands": commands} if models else {}


def harness_markdown(h):
    """HARNESS.md: model x task metric (value ± stderr where lm-eval gives one), the tasks, the commands."""
    cols = [(t, m) for t, spec in h["tasks"].items() for m in spec["metrics"]]
    lines = ["| model | " + " | ".join(f"{t} {m}" for t, m in cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in h["models"].values():
        cells = []
        for t, m in cols:
            v, err = r["tasks"].get(t, {}).get(m), r["tasks"].get(t, {}).get(f"{m}_stderr")
            spec = ".2f" if v is not None and abs(v) >= 10 else ".4f"
            cells.append("-" if v is None else format(v, spec) + ("" if err is None else f" ± {format(err, spec)}"))
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    text = "# lm-evaluation-harness: the experiment's checkpoints on the offline tasks\n\n" + "\n".join(lines)
    text += ("\n\n± is lm-eval's standard error (bootstrap for perplexity, the mean's for acc); lm-eval gives none "
             "for the rolling-window metrics (word_perplexity, byte_perplexity, bits_per_byte).\n\n## Tasks\n\n")
    text += "".join(f"- `{t}`: {spec['description']}\n" for t, spec in h["tasks"].items())
    settings = sorted({f"context {r['context']} tokens, {r['dtype']}" for r in h["models"].values()})
    text += f"\neval.py scored every model with {'; '.join(settings)}.\n"
    if h["commands"]:
        text += "\n## Commands\n\nRun from the repo root (experiment/experiment.py --harness ran these).\n\n```bash\n"
        text += "".join(f"{cmd}\n" for cmd in h["commands"].values()) + "```\n"
    return text


def write_harness(runs, out, labels):
    """<results>/harness/HARNESS.md and harness.json, when runs/eval holds harness results; returns them or {}."""
    h = harness_results(runs, labels)
    if h:
        folder = out / "harness"
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in (("harness.json", json.dumps(h, indent=1) + "\n"), ("HARNESS.md", harness_markdown(h))):
            write_atomic(folder / name, text)
    return h


def read_json(path):
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


def longctx_study(runs):
    """The long-context study (experiment.py --long-context): runs/longctx/{models,sweep-*,passkey-*,speed}.json
    regrouped by model name ("teacher", "best", "modal dD", "long") instead of checkpoint label."""
    d = runs / "longctx"
    info = read_json(d / "models.json")
    if not info:
        return {}
    name = {label: n for n, label in info["models"].items()}
    out = {"block": info["block"], "long": info["long"], "sweep": {}, "passkey": {}, "speed": read_json(d / "speed.json"),
           "infer": {name.get(k, k): v for k, v in read_json(d / "infer.json").get("infer", {}).items()},
           "infer_meta": {k: v for k, v in read_json(d / "infer.json").items() if k != "infer"}}
    for way in ("window", "extrapolate"):
        for label, by in read_json(d / f"sweep-{way}.json").get("contexts", {}).items():
            out["sweep"][f"{name.get(label, label)} ({way})"] = by
        for label, by in read_json(d / f"passkey-{way}.json").get("passkey", {}).items():
            out["passkey"][f"{name.get(label, label)} ({way})"] = by
    return out


def longctx_targets(m):
    """Issue 15's targets: (text, reached or None where a number is missing)."""
    b, L = str(m["block"]), str(m["long"])
    sw, sp = m["sweep"], m["speed"].get("contexts", {})
    student, teacher = sw.get("long (window)", {}), sw.get("teacher (window)", {})

    def ppl(by, c):
        return by.get(c, {}).get("ppl")
    rows = []
    a, z = ppl(student, L), ppl(student, b)
    rows.append((f"long student ppl at {L} below its own at {b}: {a} vs {z}", a < z if a and z else None))
    t = ppl(teacher, L)
    rows.append((f"at {L}, long student beats the teacher's sliding window by >= 3 %: {a} vs {t}"
                 + (f" ({1 - a / t:+.1%})" if a and t else ""), a <= 0.97 * t if a and t else None))
    s2, s16 = (sp.get(c, {}).get("tokens_per_s") for c in (b, L))
    rows.append((f"training step at {L} runs at >= 0.9x the tokens/s of {b}: {s16} vs {s2}"
                 + (f" ({s16 / s2:.2f}x)" if s2 and s16 else ""), s16 >= 0.9 * s2 if s2 and s16 else None))
    far = str(2 * m["long"])
    si, ti = (m.get("infer", {}).get(k, {}).get(far, {}) for k in ("long", "teacher"))
    a, t = si.get("tokens_per_s"), ti.get("tokens_per_s")
    both = bool(si.get("compiled") and ti.get("compiled"))
    rows.append((f"inference at {far}: student tokens/s >= 2x the teacher's sliding window, both compiled: "
                 + (f"{a:,.0f} vs {t:,.0f} ({a / t:.2f}x; compiled: student {si.get('compiled')}, teacher "
                    f"{ti.get('compiled')})" if a and t else "no measurement"),
                 (a >= 2 * t and both) if a and t else None))
    return rows


def longctx_markdown(m):
    fmt = (lambda v, f: "-" if v is None else format(v, f))
    contexts = sorted({int(c) for by in m["sweep"].values() for c in by})
    lines = ["# Long context (issue 15)", "", "Perplexity against context (same scored tokens at every context; "
             "'skipped' where the mode does not apply):", "",
             "| model (mode past its native maximum) | " + " | ".join(map(str, contexts)) + " |",
             "|---|" + "---|" * len(contexts)]
    for label, by in m["sweep"].items():
        cells = [("skipped" if "skipped" in by.get(str(c), {}) else
                  fmt(by.get(str(c), {}).get("ppl"), ".2f") + (f" ({by[str(c)]['mode']})" if by.get(str(c), {})
                                                                .get("mode") not in (None, "native") else ""))
                 for c in contexts]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lengths = sorted({int(c) for by in m["passkey"].values() for c in by})
    lines += ["", "Passkey retrieval: accuracy (mean log-prob of the key's tokens):", "",
              "| model | " + " | ".join(map(str, lengths)) + " |", "|---|" + "---|" * len(lengths)]
    for label, by in m["passkey"].items():
        cells = [("skipped" if "skipped" in by.get(str(c), {"skipped": 1}) else
                  f"{by[str(c)]['accuracy']:.2f} ({by[str(c)]['mean_key_logprob']:.2f})") for c in lengths]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    inf = m.get("infer", {})
    if inf:
        meta = m.get("infer_meta", {})
        lines += ["", f"Inference: scoring every token of {meta.get('tokens', 0):,} tokens of sequences of each length "
                  f"({meta.get('device')}, bf16; the teacher past its maximum in sliding windows {meta.get('stride')} "
                  "apart; the head only on scored positions for both):", "",
                  "| model | context | mode | tokens/s | peak GB | compiled |", "|---|---|---|---|---|---|"]
        for name, by in inf.items():
            lines += [f"| {name} | {c} | {r.get('mode')} | {fmt(r.get('tokens_per_s'), ',.0f')} | "
                      f"{fmt(r.get('peak_mem_gb'), '.2f')} | {r.get('compiled')} |" for c, r in by.items()]
    sp = m["speed"].get("contexts", {})
    if sp:
        lines += ["", f"Training step (forward + backward + AdamW, {m['speed']['tokens_per_step']:,} tokens per step, "
                  f"{m['speed']['device']}):", "", "| context | batch | tokens/s | peak GB | compiled |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c} | {r['batch_size']} | {r['tokens_per_s']:,.0f} | {fmt(r['peak_mem_gb'], '.2f')} | "
                  f"{r['compiled']} |" for c, r in sp.items()]
    lines += ["", "Targets:", ""] + [f"- {'reached' if ok else 'NOT reached' if ok is False else 'no data'}: {text}"
                                     for text, ok in longctx_targets(m)]
    return "\n".join(lines) + "\n"


def longctx_plot(m, path):
    """ppl against context, log2 x axis; False where matplotlib is missing (said by plots())."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"report.py: {path} skipped: matplotlib is not installed", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, by in m["sweep"].items():
        pts = sorted((int(c), r["ppl"]) for c, r in by.items() if r.get("ppl") is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="context (tokens)", ylabel="perplexity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def write_longctx(runs, out):
    """results/longctx/: LONGCTX.md, longctx.json, longctx.png; nothing when the study did not run."""
    m = longctx_study(runs)
    if not m:
        return {}
    folder = out / "longctx"
    folder.mkdir(parents=True, exist_ok=True)
    m["targets"] = [{"target": t, "reached": ok} for t, ok in longctx_targets(m)]
    write_atomic(folder / "longctx.json", json.dumps(m, indent=1) + "\n")
    write_atomic(folder / "LONGCTX.md", longctx_markdown(m))
    longctx_plot(m, folder / "longctx.png")
    return m
