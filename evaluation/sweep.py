"""eval.py's context sweep (several --context values): every model scores THE SAME tokens at every context.

From the split's documents at least max(C) tokens long, windows of max(C) tokens are cut back from each document's
end (windows.document_windows); at context C a model reads the last C tokens of each window and the last
--score-tokens are scored, in one forward per window or, past the model's maximum, as `plan` says (refused,
extrapolated, or sliding windows: windows.context_windows). Each context also records tokens/s read and scored and
peak GPU memory; --compile times the compiled forward.
"""
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import fast
from cli import write_atomic
from evaluation.windows import context_windows, document_windows
from modal.student import load_pretrained

BEYOND = ("refuse", "extrapolate", "window")
SWEEP = {"score_tokens": 512, "max_windows": 64, "beyond": "refuse", "window_stride": 512, "max_batch_tokens": 65536}


def sweep_check(p, args):
    """args.contexts: the list; args.context: the one value (today's single evaluation) or the list (a sweep).
    Sweep flags without a sweep, and single-evaluation flags in one, are refused by name."""
    args.contexts = args.context
    if min(args.contexts) < 1:
        p.error(f"--context must be >= 1, got {min(args.contexts)}")
    given = [f for f in (*SWEEP, "compile") if getattr(args, f) not in (None, False)]
    if len(args.contexts) == 1:
        args.context = args.contexts[0]
        if given:
            p.error(f"--{given[0].replace('_', '-')} is for a context sweep: give two or more --context values "
                    "(one evaluates every token of the split, as --stride says)")
        return
    for flag, value in (("--stride", args.stride), ("--max-tokens", args.max_tokens), ("--tasks", args.tasks or None),
                        ("--prompt", args.prompt), ("--protocol harness", args.protocol == "harness" or None)):
        if value is not None:
            p.error(f"{flag} does not apply to a context sweep (several --context values); run it with one --context")
    if len(args.data) != 1:
        p.error(f"a context sweep (several --context values) scores one dataset: give one --data, got {len(args.data)}")
    if len(set(args.contexts)) < len(args.contexts):
        p.error(f"--context {' '.join(map(str, args.contexts))} repeats a value: give each context once")
    for flag, default in SWEEP.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    for flag in ("score_tokens", "max_windows", "window_stride", "max_batch_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.score_tokens > min(args.contexts):
        p.error(f"--score-tokens {args.score_tokens} is longer than the shortest --context {min(args.contexts)}: "
                "every context must read the scored tokens; lower --score-tokens")


def plan(label, cfg, context, beyond, stride):
    """How a model runs at `context` in a sweep: (mode, window), mode "native" (within its maximum),
    "extrapolate" (RoPE positions past max_position_embeddings, as transformers computes them) or "window"
    (sliding windows of its maximum), or ("skipped", reason). beyond "refuse" raises past the maximum."""
    limit = cfg.native_context  # None: any length (an all-modal student)
    if limit is None or context <= limit:
        return "native", None
    conv = cfg.filter_context
    what = "conv Hyena filters' l_max" if conv == limit else "max_position_embeddings"
    if beyond == "refuse":
        raise ValueError(f"--context {context} is past {label}'s maximum of {limit} tokens (its {what}): pass "
                         "--beyond extrapolate (run it at that length anyway: RoPE positions past "
                         "max_position_embeddings as transformers computes them; conv Hyena filters past l_max are "
                         f"skipped) or --beyond window (sliding windows of {limit} tokens, --window-stride apart)")
    if beyond == "window":
        if stride > limit:
            raise ValueError(f"--window-stride {stride} is longer than {label}'s window of {limit} tokens: "
                             f"lower it to {limit} or less")
        return "window", limit
    if conv is not None and context > conv:
        return "skipped", (f"conv Hyena filters end at l_max {conv} and are not defined past it: no extrapolation "
                           f"(--beyond window runs it in windows of {limit})")
    return "extrapolate", None


def last_logits(model, x, n):
    """The logits of the last n positions of x (B, L): the head (B, n, V) only where tokens are scored."""
    h = model.gpt_neox.embed_in(x)  # (B, L, D)
    for block in model.gpt_neox.layers:
        h = block(h)
    return model.head(h[:, -n:])  # (B, n, V)


def compiled_forward(model):
    """torch.compile(last_logits) for one model: each (batch, length, n) shape its own static graph."""
    torch._dynamo.reset()  # the previous model's graphs would count against this one's recompile limit
    if hasattr(torch._dynamo.config, "recompile_limit"):  # a sweep's contexts and batch shapes: a few dozen graphs
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    fn = torch.compile(last_logits, dynamic=False)
    return lambda x, n: fn(model, x, n)


@torch.no_grad()
def evaluate_context(model, spans, context, score, window=None, stride=None, batch_size=8, max_batch_tokens=65536,
                     forward=None):
    """NLL of the last `score` tokens of every span (windows.document_windows' rows) read with `context` tokens
    before them, in one forward per span, or in sliding windows of `window` tokens `stride` apart
    (windows.context_windows). forward(x, n) -> the last n positions' logits (default: last_logits eagerly; a
    compiled one that fails in the warm-up falls back to eager with a warning). Batches hold up to batch_size
    spans and batch * length <= max_batch_tokens. Every forward shape runs once untimed first (warm-up, compiling).
    Returns {loss, ppl, scored_tokens, windows, read_tokens (through the model), seconds, read_tokens_per_s,
    scored_tokens_per_s, peak_mem_gb (CUDA, timed part; None on CPU), compiled[, compile_error]}."""
    p = next(model.parameters())
    length = spans.shape[1] - 1
    if not 1 <= score <= context <= length:
        raise ValueError(f"need 1 <= score {score} <= context {context} <= the spans' {length} tokens")
    off = length - context  # span[off + i] is input position i; its target is span[off + i + 1]
    jobs = []  # (x (B, L), y (B, n), n): every forward, in order
    for start, end, n in context_windows(context, score, window, stride):
        rows = max(1, min(batch_size, max_batch_tokens // (end - start)))
        for i in range(0, len(spans), rows):
            chunk = spans[i:i + rows]
            x = torch.from_numpy(chunk[:, off + start:off + end].astype(np.int64))  # (B, L)
            jobs.append((x, torch.from_numpy(chunk[:, off + end - n + 1:off + end + 1].astype(np.int64)), n))
    eager = lambda x, n: last_logits(model, x, n)  # noqa: E731
    forward, compiled, error = forward or eager, forward is not None, None
    for x, _, n in {(x.shape, n): (x, None, n) for x, _, n in jobs}.values():  # one warm-up per shape
        try:
            forward(x.to(p.device), n)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # compilers fail in many ways; eager computes the same numbers
            if not compiled:
                raise
            print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                  "running eagerly", file=sys.stderr)
            forward, compiled, error = eager, False, f"{type(e).__name__}: {e}"
            forward(x.to(p.device), n)
    cuda = p.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(p.device)
        torch.cuda.reset_peak_memory_stats(p.device)
    nll = torch.zeros((), dtype=torch.float64, device=p.device)
    read, t0 = 0, time.perf_counter()
    for x, y, n in jobs:
        logits = forward(x.to(p.device, non_blocking=True), n)  # (B, n, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        nll += F.cross_entropy(logits.flatten(0, 1), y.to(p.device).flatten(), reduction="sum").double()
        read += x.numel()
    nll = nll.item()  # waits for the GPU
    seconds = time.perf_counter() - t0
    scored = len(spans) * score
    out = {"loss": nll / scored, "ppl": math.exp(nll / scored), "scored_tokens": scored, "windows": len(spans),
           "read_tokens": read, "seconds": seconds, "read_tokens_per_s": read / seconds,
           "scored_tokens_per_s": scored / seconds,
           "peak_mem_gb": torch.cuda.max_memory_allocated(p.device) / 1e9 if cuda else None, "compiled": compiled}
    return out if error is None else {**out, "compile_error": error}


def run_sweep(args, device, ckpts, configs, data, dtype):
    """--context C1 C2 ...: every model at every context on the same scored tokens (see evaluate_context), its
    weights in `dtype` (eval.py's --dtype)."""
    if len(set(args.ckpt)) < len(args.ckpt):
        raise ValueError(f"--ckpt {' '.join(args.ckpt)} names a checkpoint twice: the JSON keys results by name")
    (name, (meta, split, tokens, _)), = data.items()
    length = max(args.contexts)
    spans, documents, longest = document_windows(tokens, meta["eot_token"], length, args.max_windows)
    if not len(spans):
        raise ValueError(f"no document of --data {name} ({split} split) is {length} tokens long, the largest "
                         f"--context: the longest has {longest}. Lower the largest --context to {longest} or less, "
                         "or use data with longer documents")
    plans = {label: {c: plan(label, cfg, c, args.beyond, args.window_stride) for c in args.contexts}
             for label, cfg in zip(args.ckpt, configs)}  # refusals come before any evaluation
    print(f"{name} {split}: {len(spans)} windows of {length} tokens from {documents} documents, the last "
          f"{args.score_tokens} of each scored", file=sys.stderr)
    contexts = {}
    for label, ckpt in zip(args.ckpt, ckpts):
        model = fast.install(load_pretrained(ckpt, dtype=dtype).to(device).eval(), fast.wanted(args.fast, device))
        forward = compiled_forward(model) if args.compile else None
        contexts[label] = {}
        for c, (mode, window) in plans[label].items():
            if mode == "skipped":
                print(f"{label} at context {c}: skipped: {window}", file=sys.stderr)
                contexts[label][str(c)] = {"skipped": window}
                continue
            r = evaluate_context(model, spans, c, args.score_tokens, window, args.window_stride, args.batch_size,
                                 args.max_batch_tokens, forward)
            if forward is not None and not r["compiled"]:
                forward = None  # compiling failed once: the other contexts run eagerly without trying again
            contexts[label][str(c)] = {"mode": mode, **({"window": window} if window else {}), **r}
            print(f"{label} at context {c} ({mode}): ppl {r['ppl']:.3f}, {r['read_tokens_per_s']:,.0f} tokens/s "
                  "read", file=sys.stderr)
        del model, forward
    sweep = {"data": name, "split": split, "score_tokens": args.score_tokens, "contexts": args.contexts,
             "beyond": args.beyond, "window_stride": args.window_stride, "max_windows": args.max_windows,
             "windows": len(spans), "documents": documents, "window_tokens": length, "dtype": args.dtype,
             "batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens, "compile": args.compile}
    print(sweep_table(contexts, args.contexts))
    if args.json:
        out = {"context": args.contexts, "stride": None, "protocol": args.protocol, "dtype": args.dtype,
               "split": args.split, "max_tokens": None, "tasks": [],
               "results": [{"model": label, "path": ckpt} for label, ckpt in zip(args.ckpt, ckpts)],
               "contexts": contexts, "context_sweep": sweep}
        write_atomic(Path(args.json), json.dumps(out, indent=1) + "\n")
    return {"contexts": contexts, "context_sweep": sweep}


def sweep_table(contexts, columns):
    """Markdown: one row per model, one column per context: perplexity (w: windowed, x: RoPE extrapolated),
    then tokens/s read and peak GPU memory."""
    head = "| model | " + " | ".join(f"ctx {c}" for c in columns) + " |"
    rule = "| --- |" + " ---: |" * len(columns)
    mark = {"native": "", "window": " w", "extrapolate": " x"}
    ppl, cost = [head, rule], [head.replace("| model |", "| tokens/s read, peak GB |"), rule]
    for label, row in contexts.items():
        cells = [row[str(c)] for c in columns]
        ppl.append(f"| {label} | " + " | ".join("skipped" if "skipped" in r else f"{r['ppl']:.3f}{mark[r['mode']]}"
                                               for r in cells) + " |")
        cost.append(f"| {label} | " + " | ".join(
            "" if "skipped" in r else f"{r['read_tokens_per_s']:,.0f}" + (
                "" if r["peak_mem_gb"] is None else f", {r['peak_mem_gb']:.2f} GB") for r in cells) + " |")
    return "\n".join(ppl + ["", "perplexity: w = sliding windows of the model's maximum, x = RoPE extrapolated", ""]
                     + cost)
