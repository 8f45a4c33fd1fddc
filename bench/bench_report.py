"""bench.py's reporting: the targets (speed and memory goals) judged from its results, and bench.json /
bench.md / bench.png, each written atomically (a killed run leaves the last good one)."""
import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/bench_report.py`: import from the repo root

from cli import write_atomic

MODAL_STATE = 16  # modes per channel of the decode and serve sections' (and checks') modal student
SECTIONS = ("check", "conv", "mixer", "model", "train", "decode", "kd", "serve")  # the order they run in
MODES = {"on": [True], "off": [False], "both": [True, False]}  # --compile: which of compiled / eager run


def modal_cfg(cfg):
    """cfg with every layer a Hyena layer of MODAL_STATE modes (a modal student, built by modal.student.build)."""
    n = cfg.num_hidden_layers
    return replace(cfg, mixers=["hyena"] * n, hyena_modal_state=[MODAL_STATE] * n)


def fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)


def table(rows):
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return [" | ".join(cols), " | ".join("---" for _ in cols), *(" | ".join(fmt(r.get(c)) for c in cols) for r in rows)]


def get(res, section, key, match):
    """`key` of the first row of `section` whose fields equal `match` (and that has a value for key)."""
    return next((r[key] for r in res.get(section, [])
                 if r.get(key) is not None and all(r.get(k) == v for k, v in match.items())), None)


def ratio(res, section, key, a, b):
    num, den = get(res, section, key, a), get(res, section, key, b)
    return num / den if num is not None and den else None


def targets(res, s, modes):
    """The issue's targets, each with its measured value (None when its rows are missing) and PASS/FAIL."""
    c = max(modes)  # compiled vs compiled where compiled was measured
    tag, hf, ctx = "compiled" if c else "eager", dict(case="transformers", compiled=c), s["decode_ctx"][1]
    ls = s["ls"]
    hy = [r for r in res["mixer"]
          if r["op"] == "hyena" and r["run"] == "fwd+bwd" and not r.get("compiled") and r.get("peak_gb")]
    per_tok = [r["peak_gb"] / (r["B"] * r["L"]) for r in hy]
    modes_of = lambda: sorted({False, c})  # noqa: E731 (eager, and compiled when measured)
    name = lambda k: "compiled" if k else "eager"  # noqa: E731
    rows = [(f"our GPT-NeoX train tok/s / transformers' ({tag})",
             ratio(res, "train", "tok_s", dict(case="gpt-neox (ours)", compiled=c), hf), ">=", 1.0),
            *((f"distill {m} step tok/s / transformers train tok/s ({tag})",
               ratio(res, "train", "tok_s", dict(case=f"distill {m}", compiled=c), hf), ">=", goal)
              for m, goal in (("e2e", 1.0), ("joint", 0.75))),
            (f"student CE step tok/s / teacher's (ours), L={s['train_len']} ({tag})",
             ratio(res, "train", "tok_s", dict(case="finetune", compiled=c), dict(case="gpt-neox (ours)", compiled=c)),
             ">=", 1.2),
            *((f"Hyena / SDPA mixer fwd+bwd time, L={L} ({name(k)})", ratio(
                res, "mixer", "ms", dict(op="hyena", run="fwd+bwd", L=L, compiled=k),
                dict(op="sdpa", run="fwd+bwd", L=L, compiled=k)), "<=", goal)
              for L, goal in ((ls[0], 0.5), (ls[2], 0.5), (ls[5], 0.25)) for k in modes_of()),
            *((f"student / teacher forward time, L={ls[4]} ({name(k)})", ratio(
                res, "model", "ms", dict(model="student", L=ls[4], compiled=k),
                dict(model="teacher", L=ls[4], compiled=k)), "<=", 0.5) for k in modes_of()),
            ("Hyena mixer fwd+bwd peak bytes/token, max/min over L (linear memory)",
             max(per_tok) / min(per_tok) if len(per_tok) > 1 else None, "<=", 1.5),
            (f"student train step L={s['long_len']} B=1, peak GB",
             get(res, "train", "peak_gb", dict(case="finetune long")), "<=", 40.0),
            *((f"student / teacher decode tok/s, ctx={ctx}, B={B} ({'CUDA graph' if g else 'eager'})", ratio(
                res, "decode", "tok_s", dict(model="student", ctx=ctx, B=B, graph=g),
                dict(model="teacher", ctx=ctx, B=B, graph=g)), ">=", 1.0)
              for g in (False, True) for B in s["decode_batch"]),
            (f"kd_loss share of a distill e2e step ({tag})", get(res, "kd", "share", dict(compiled=c)), "<=", 0.25),
            *((f"modal student decode tok/s, ctx={s.get('serve_ctx')}, B={B}, CUDA graph (H100 goal)",
               get(res, "serve", "tok_s", dict(model="modal", run="serve", B=B)), ">=", goal)
              for B, goal in ((1, 10000), (64, 500000))),
            *((f"{m} generate tok/s / raw step's, ctx={s.get('serve_short')}, B={B}",
               get(res, "serve", "share_of_step", dict(model=m, run="generate", B=B)), ">=", 0.9)
              for m in ("modal", "teacher") for B in s.get("serve_generate_batch", []))]  # (runs before serve: none)
    return [{"target": t, "measured": v, "goal": f"{op} {g:g}",
             "ok": "n/a" if v is None else "PASS" if (v >= g if op == ">=" else v <= g) else "FAIL"}
            for t, v, op, g in rows]


def keep_previous(res, out, only):
    """Sections not in `only` take their rows (and errors) from the last bench.json in `out`, if it was measured
    on the same device at the same sizes (sizes added since, which its sections did not use, aside); env.kept says
    when each kept section ran."""
    last = out / "bench.json"
    try:
        old = json.loads(last.read_text()) if last.exists() else None
    except ValueError as e:
        raise ValueError(f"{last}: not JSON ({e}); delete it, or pass another --out") from None
    if not old or old["env"]["sizes"] != {k: v for k, v in res["env"]["sizes"].items() if k in old["env"]["sizes"]} \
            or old["env"]["device"] != res["env"]["device"] or not set(SECTIONS) - set(only):
        return
    res["env"]["kept"] = {n: old["env"].get("kept", {}).get(n, old["env"]["started"]) for n in SECTIONS if n not in only}
    for name in res["env"]["kept"]:
        res[name] = old.get(name, [])
        res["errors"].update({name: old["errors"][name]} if name in old["errors"] else {})


def write(out, res, sizes, modes, plot=False):
    """bench.json and bench.md (and bench.png)."""
    env, lines, tg = res["env"], [], targets(res, sizes, modes)
    for name in SECTIONS:
        lines += [f"## {name}", "", *table(res[name]), ""] if res.get(name) else []
    lines += [f"section {name} failed: {err}\n" for name, err in res["errors"].items()]
    md = [f"# bench.py: {env['device']}, torch {env['torch']}", "",
          "ms: median per call; tok_s: tokens/s; peak_gb: max allocated; spread: (max-min)/median", "",
          *lines, "## targets", "", *table(tg), ""]
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("bench.json", json.dumps({**res, "targets": tg}, indent=1)), ("bench.md", "\n".join(md))):
        write_atomic(out / name, text)
    if plot:
        try:
            draw(out, res)
        except Exception as e:  # noqa: BLE001 (a broken plot must not cost the measurements)
            res["errors"]["plot"] = f"{type(e).__name__}: {e}"


def draw(out, res):
    """bench.png: ns per token and peak memory against L, for the mixer and model sections."""
    try:  # matplotlib is optional at runtime (requirements-dev.txt)
        from matplotlib.figure import Figure
    except ImportError:
        res["errors"]["plot"] = "matplotlib not installed: no bench.png"
        return
    fig = Figure(figsize=(22, 4.8), layout="constrained")
    lat, mem, dec, srv = fig.subplots(1, 4)
    series = {}
    for r in res["mixer"] + res["model"]:
        key = f"mixer {r['op']} {r['run']}" if "op" in r else f"model {r['model']} fwd"
        key += " (compiled)" if r.get("compiled") else ""
        if "ms" in r:
            series.setdefault(key, []).append(r)
    for key, rows in series.items():
        L = [r["L"] for r in rows]
        style = dict(marker="o", linestyle="--" if "compiled" in key else "-")
        lat.plot(L, [1e6 * r["ms"] / (r["B"] * r["L"]) for r in rows], label=key, **style)
        if rows[0]["peak_gb"] is not None:
            mem.plot(L, [r["peak_gb"] for r in rows], label=key, **style)
    decoding = {}
    for r in res["decode"]:
        if "tok_s" in r:
            decoding.setdefault((r["model"], r["B"], r.get("graph", False)), []).append(r)
    for (model, B, graph), rows in sorted(decoding.items()):
        dec.plot([r["ctx"] for r in rows], [r["tok_s"] for r in rows], marker="o", linestyle="--" if graph else "-",
                 color={"student": "C0", "teacher": "C1"}.get(model, "C2"), alpha=1.0 if B > 1 else 0.55,
                 label=f"{model} B={B}{' CUDA graph' if graph else ''}")
    for ax, rows in ((dec, decoding), (srv, res.get("serve"))):
        if not rows:
            ax.text(0.5, 0.5, "section not in this run", ha="center", transform=ax.transAxes)
    serving = {}
    for r in res.get("serve", []):
        if r.get("run") == "serve" and "tok_s" in r:
            serving.setdefault(r["model"], []).append(r)
    for model, rows in sorted(serving.items()):
        srv.plot([r["B"] for r in rows], [r["tok_s"] for r in rows], marker="o", label=model)
    ctx = next((rows[0]["ctx"] for rows in serving.values()), "")
    srv.set(yscale="log", xlabel="batch", ylabel="tokens/s", title=f"serving at {ctx} context (each to its memory limit)")
    lat.set(yscale="log", xlabel="L", ylabel="ns per token", title="latency (B*L constant)")
    mem.set(xlabel="L", ylabel="peak GB", title="peak memory (B*L constant)")
    dec.set(yscale="log", xlabel="context", ylabel="tokens/s", title="cached decoding")
    for ax in (lat, mem, dec, srv):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        if ax.lines:  # the memory panel stays empty on the CPU
            ax.legend(fontsize=7)
    write_atomic(out / "bench.png", lambda f: fig.savefig(f, format="png", dpi=110))


def main(argv=None):
    """Rewrite bench.md and bench.png from a bench.json (after a change to this file; no GPU needed)."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("out", nargs="?", default="results/bench", help="folder holding bench.json")
    out = Path(p.parse_args(argv).out)
    res = json.loads((out / "bench.json").read_text())
    res.pop("targets", None)
    args = res["env"]["args"]
    modes = MODES[args.get("compile") or ("off" if args.get("cpu_smoke") else "on")]
    write(out, res, res["env"]["sizes"], modes, plot=True)
    print(f"rewrote {out}/bench.md and bench.png")


if __name__ == "__main__":
    main()
