"""Evaluate checkpoints on prepared data (token perplexity, word perplexity, bits per byte), or sample from them.

    python eval.py --ckpt out/distill          # alone: the validation split of the data it trained on, a sample
    python eval.py --ckpt EleutherAI/pythia-70m out/student --data wikitext2 --stride 512 --json out/eval.json
    python eval.py --ckpt out/student --prompt "The lobster is" --temperature 0
    python eval.py --ckpt out/student --tasks wikitext2_offline,gutenberg_lambada --json out/tasks.json

One pass scores every token of the split but the first exactly once (eval_windows) and sums the NLL in fp64:
  token ppl      exp(NLL / tokens scored)
  word ppl       exp(NLL / words)            } lm-evaluation-harness's tokenizer-independent measures, over
  bits per byte  NLL / (ln 2 * bytes)        } the text the scored tokens decode to
bytes = len(text.encode("utf-8")); words = len(text.split()), i.e. the non-empty pieces of lm-eval's
re.split(r"\\s+", text) (lm-eval also counts the empty strings re.split yields at leading/trailing whitespace).
The data's <|endoftext|> (one after every document) is scored like any token and decodes to one "\\n": it ends a
document, so it separates words and counts as one byte. The table shows the context each model was evaluated at
(--context, capped at the model's maximum with a warning) and flags a split scored on fewer than FEW_TOKENS (1000).

--protocol harness scores as lm-evaluation-harness's loglikelihood_rolling does (harness_windows): each document
(the text between <|endoftext|>s) on its own, its first token conditioned on <|endoftext|>, in back-to-back
windows of `context` tokens whose last one still gets a full window of context; the <|endoftext|>s themselves
are not scored, and words = len(re.split(r"\\s+", document)) per document, lm-eval's count.
--tasks runs lm-evaluation-harness tasks through harness/adapter.py (pip install lm-eval; see harness/).

Several --context values make a context sweep (evaluation/sweep.py), which scores THE SAME tokens at every context:
    python eval.py --ckpt A B --data gutenberg --context 512 2048 8192 32768 --beyond window --json out/ctx.json
From the split's documents at least max(C) tokens long, windows of max(C) tokens are cut back from each document's
end (document_windows, up to --max-windows); at context C a model reads the last C tokens of each window and
the last --score-tokens are scored. Past a model's maximum (max_position_embeddings, a conv filter's l_max) --beyond
refuses, extrapolates (RoPE as transformers computes it; conv filters cannot: "skipped") or slides windows of
that maximum --window-stride apart. Each context records tokens/s and peak GPU memory; --compile times compiled.
"""
import argparse
import copy
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data import check_compatible, load_meta, load_split, resolve_data_dir, tokenizer_sha256
import fast
from hub import HubError, resolve_file
from pretrained.config import read_config
from pretrained.weights import DTYPES, checkpoint_tokenizer, resolve_ckpt, trained_on
from tokenizer import DEFAULT_TOKENIZER
from modal.student import load_pretrained
from tokenizer import load_tokenizer
from cli import integer, writable_dir, write_atomic
from evaluation.sweep import BEYOND, SWEEP, run_sweep, sweep_check
from evaluation.windows import batched, eval_windows, harness_windows

PROTOCOLS = ("stream", "harness")  # see the module docstring
FEW_TOKENS = 1000  # a split scored on fewer tokens is flagged on its row: its perplexities are noise


@torch.no_grad()
def evaluate(model, tokens, context, stride=None, batch_size=8, max_tokens=None, device=None, dtype=None,
             to_text=None, progress=None, protocol="stream", eot=None):
    """NLL of tokens (1-D array of ids) under model, in windows of `context` tokens moving on by `stride`.

    device / dtype (None: the model's own): the whole forward runs in dtype; the model is not changed (a copy is
    cast when needed, since casting down and back would not restore the weights). Log-softmax runs in fp32 at least,
    the sum in fp64. to_text(ids) -> str turns the scored ids into text for word ppl and bits per byte (None: skip).
    progress: a label for progress lines on stderr (None: quiet). max_tokens: use only the first max_tokens tokens.
    protocol "harness" (needs eot, the document separator; no stride): lm-eval's per-document windows and word
    count instead (see the module docstring).
    Returns {tokens (scored), nll, token_ppl, context, stride, windows, seconds, tokens_per_s} and, with to_text,
    {words, bytes, word_ppl, bits_per_byte}.
    """
    p = next(model.parameters())
    device = torch.empty(0, device=device or p.device).device  # "cuda" -> "cuda:0", comparable with p.device
    dtype = dtype or p.dtype
    if (p.device, p.dtype) != (device, dtype):
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    if protocol == "harness":
        if stride is not None or eot is None:
            raise ValueError("protocol harness: windows are back to back (no --stride), documents end at eot")
        docs = np.split(tokens[:n], np.flatnonzero(tokens[:n] == eot) + 1)  # each with its trailing eot, if any
        total = sum(-(-int((d != eot).sum()) // context) for d in docs)
        windows = harness_windows(tokens[:n], eot, context)
    else:
        total = max(0, -(-(n - 1 - context) // (stride or context))) + 1  # windows eval_windows will yield
        windows = eval_windows(tokens, context, stride, max_tokens)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    scored, done, t0, shown = 0, 0, time.monotonic(), time.monotonic()
    for x, y in batched(windows, batch_size):
        scored += int((y != -1).sum())
        x, y = x.to(device), y.to(device)  # (B, L) each
        logits, _ = model(x)  # (B, L, V) in dtype
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        nll += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none").double().sum()
        done += x.shape[0]
        now = time.monotonic()
        if progress and (now - shown > 10 or done == total):
            shown, rate = now, scored / (now - t0)
            print(f"{progress}: {done}/{total} windows, {rate:,.0f} tokens/s, ETA {(n - 1 - scored) / rate:.0f} s",
                  file=sys.stderr)
    seconds = time.monotonic() - t0
    nll = nll.item()
    out = {"tokens": scored, "nll": nll, "token_ppl": math.exp(nll / scored), "context": context, "stride": stride,
           "protocol": protocol, "windows": done, "seconds": seconds, "tokens_per_s": scored / seconds}
    if to_text is not None and protocol == "harness":
        texts = [to_text(d[d != eot]) for d in docs if (d != eot).any()]
        words, nbytes = sum(len(re.split(r"\s+", t)) for t in texts), sum(len(t.encode("utf-8")) for t in texts)
    elif to_text is not None:
        text = to_text(np.asarray(tokens[1:n]))  # exactly the scored tokens
        words, nbytes = len(text.split()), len(text.encode("utf-8"))
    if to_text is not None:
        out.update(words=words, bytes=nbytes, word_ppl=math.exp(nll / words) if words else None,
                   bits_per_byte=nll / (math.log(2) * nbytes) if nbytes else None)
    return out


def text_decoder(enc):
    """ids -> text for word and byte counts, each <|endoftext|> as "\\n" (see the module docstring)."""
    def to_text(ids):
        docs = np.split(ids, np.flatnonzero(ids == enc.eot_token))  # every piece but the first starts with eot
        return "\n".join(enc.decode(d[d != enc.eot_token].tolist()) for d in docs)
    return to_text


def harness_tasks(names, include_path):
    """(adapter class, evaluate_tasks, task manager) for --tasks, or a clear error when lm-eval is missing."""
    try:
        from harness.adapter import HyenaLM, evaluate_tasks, task_manager
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("lm_eval"):
            raise
        raise ValueError("--tasks needs EleutherAI's lm-evaluation-harness, which is not installed: "
                         "pip install lm-eval==0.4.13 (it is in requirements-dev.txt)") from e
    return HyenaLM, evaluate_tasks, task_manager(names, include_path)


def max_context(cfg):
    """The longest window the model is native to (Config.native_context; None: any length)."""
    return cfg.native_context


def sample(model, enc, prompt, max_new_tokens, temperature, top_k, seed, extrapolate=False):
    """prompt + the model's continuation, as text; an empty prompt starts from <|endoftext|>. Past a teacher's
    max_position_embeddings only with extrapolate (--extrapolate): RoPE at positions it never trained at."""
    ids = enc.encode(prompt, allowed_special="all") or [enc.eot_token]
    cfg = model.config
    reach = cfg.filter_context  # conv Hyena filters end at l_max; modal filters and RoPE go on
    if reach is not None and len(ids) + max_new_tokens > reach:
        fix = (f"lower --max-new-tokens to {reach - len(ids)} or less, or shorten the prompt"
               if len(ids) < reach else f"shorten the prompt to well under {reach} tokens")
        raise ValueError(f"--prompt ({len(ids)} tokens) plus --max-new-tokens {max_new_tokens} is longer than this "
                         f"model's Hyena filters reach (l_max {reach} tokens): {fix}")
    past = "attention" in cfg.mixers and len(ids) + max_new_tokens > cfg.max_position_embeddings
    if past and not extrapolate:
        raise ValueError(f"--prompt ({len(ids)} tokens) plus --max-new-tokens {max_new_tokens} runs past this model's "
                         f"max_position_embeddings {cfg.max_position_embeddings}: lower --max-new-tokens to "
                         f"{max(cfg.max_position_embeddings - len(ids), 0)}, or pass --extrapolate to run RoPE past it")
    if past:  # asked for: samples may run where RoPE extrapolates; perplexities never do (they cap the context)
        print(f"sampling past max_position_embeddings {cfg.max_position_embeddings}: RoPE extrapolates", file=sys.stderr)
    idx = torch.tensor([ids], device=next(model.parameters()).device)  # (1, T)
    torch.manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k or None, extrapolate=past)
    return enc.decode([t for t in out[0].tolist() if t < enc.n_vocab])  # the vocabulary's padding has no text


def table(results, datasets, tasks=()):
    """Markdown: one row per model with the context it was evaluated at, four columns per dataset (the scored
    tokens flagged where fewer than FEW_TOKENS), one per harness task metric (value ± stderr)."""
    metrics = [(t, m) for t in tasks for m in results[0]["tasks"][t] if not m.endswith("_stderr")] if tasks else []
    cols = ["model", "context"] + [f"{d} {c}" for d in datasets
                                   for c in ("token ppl", "word ppl", "bits/byte", "tokens")]
    cols += [f"{t} {m}" for t, m in metrics]
    lines = ["| " + " | ".join(cols) + " |", "| --- |" + " ---: |" * (len(cols) - 1)]
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    for r in results:
        cells = [r["model"], str(r["context"])]
        for d in datasets:
            m = r["datasets"][d]
            few = f" (too few: < {FEW_TOKENS:,})" if m["tokens"] < FEW_TOKENS else ""
            cells += [fmt(m["token_ppl"], ".3f"), fmt(m.get("word_ppl"), ".3f"), fmt(m.get("bits_per_byte"), ".4f"),
                      fmt(m["tokens"], ",") + few]
        for t, m in metrics:
            err = r["tasks"][t].get(f"{m}_stderr")
            cells.append(fmt(r["tasks"][t][m], ".4f") + ("" if err is None else f" ± {err:.4f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", nargs="+", required=True, help="checkpoint folders (a train.py --out-dir: its final/) or hub ids")
    p.add_argument("--data", nargs="*", default=[], help="prepared datasets: names under --data-root, or folders "
                   "(default, with no --tasks or --prompt: the val split of the data the checkpoints trained on, "
                   "recorded in their training_data.json, and a sample)")
    p.add_argument("--split", choices=("val", "test"), help="default: test where the dataset has one, else val")
    p.add_argument("--context", type=int, nargs="+", default=[2048], metavar="C",
                   help="window length (capped at the model's maximum, with a warning); several: a context sweep (below)")
    p.add_argument("--stride", type=int, help="sliding windows moving on by this many tokens (default: context)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="stream",
                   help="stream: the split as one token stream; harness: lm-eval's per-document rolling windows")
    p.add_argument("--max-tokens", type=integer, help="use only the first N tokens of each split (N - 1 are scored)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="the model's weights and forward pass")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--json", help="also write every number here")
    p.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t], default=[], metavar="NAME[,NAME]",
                   help="lm-evaluation-harness tasks (harness/tasks/*.yaml offline, or lm-eval's own; needs lm-eval)")
    p.add_argument("--include-path", help="--tasks: a folder of more task YAMLs")
    p.add_argument("--data-root", default="data")
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument("--fast", choices=("auto", "on", "off"), default="auto", help="fast/'s twins (the same numbers, "
                   "faster: FFT convolution, Triton decoding kernels, CUDA-graph sampling): auto = on CUDA")
    p.add_argument("--prompt", help="print a sample from each checkpoint, continuing this text")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--extrapolate", action="store_true", help="let a sample run past an attention model's "
                   "max_position_embeddings (RoPE at positions it never trained at; refused otherwise)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=200, help="0: no top-k")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--tokenizer", help="for samples and for decoding the data (default: the checkpoint's "
                                       f"tokenizer.json, else {DEFAULT_TOKENIZER}; the data's own for decoding)")
    s = p.add_argument_group("context sweep (several --context values): the same tokens scored at every context")
    s.add_argument("--score-tokens", type=int, help=f"score the last S tokens of each window (default {SWEEP['score_tokens']})")
    s.add_argument("--max-windows", type=int, help=f"windows of max(C) tokens, at most (default {SWEEP['max_windows']})")
    s.add_argument("--beyond", choices=BEYOND, help="past a model's maximum context: refuse (default), extrapolate "
                                                    "(RoPE as transformers; conv Hyena skipped) or sliding windows")
    s.add_argument("--window-stride", type=int, help=f"--beyond window: windows this far apart (default "
                                                      f"{SWEEP['window_stride']})")
    s.add_argument("--max-batch-tokens", type=integer, help="batch * context at most this (default "
                                                            f"{SWEEP['max_batch_tokens']}); --batch-size is cut to fit")
    s.add_argument("--compile", action="store_true", help="torch.compile the forward (warm-up not timed)")
    args = p.parse_args(argv)
    sweep_check(p, args)
    if args.protocol == "harness" and args.stride is not None:
        p.error("--protocol harness scores back-to-back windows: drop --stride")
    for flag, low in (("stride", 1), ("max_tokens", 2), ("batch_size", 1), ("max_new_tokens", 1),
                      ("temperature", 0), ("top_k", 0)):
        value = getattr(args, flag)
        if value is not None and value < low:
            p.error(f"--{flag.replace('_', '-')} must be >= {low}, got {value:g}")
    return args


def run(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this PyTorch {torch.__version__} sees no CUDA GPU; use --device cpu")
    if args.json:  # checked before the (long) evaluation, not after it
        writable_dir(Path(args.json).parent, "--json")
    ckpts = [resolve_ckpt(c) for c in args.ckpt]
    if not args.data and args.prompt is None and not args.tasks:  # --ckpt alone: their data's val, and a sample
        (args.data, args.data_root), args.split, args.prompt = trained_on(args.ckpt, ckpts), args.split or "val", ""
    data = {}  # everything is checked before the first (long) evaluation
    for name in args.data:
        data_dir = resolve_data_dir(name, args.data_root)
        meta = load_meta(data_dir)
        split = args.split or ("test" if "test" in meta["splits"] else "val")
        tok = args.tokenizer or meta["tokenizer"]
        try:
            sha = tokenizer_sha256(tok)
        except (FileNotFoundError, HubError) as e:  # e.g. meta.json's relative path, read from another folder
            raise FileNotFoundError(f"cannot read tokenizer {tok} to decode {data_dir} ({e}); pass --tokenizer "
                                    "with the tokenizer.json the data was made with") from e
        if sha != meta["tokenizer_sha256"]:  # word and byte counts need the data's own tokenizer
            raise ValueError(f"tokenizer {tok} is not the one {data_dir} was made with ({meta['tokenizer']}, "
                             f"tokenizer.json sha256 {meta['tokenizer_sha256'][:12]}...): the data would decode to "
                             "other text. Pass --tokenizer with that same tokenizer.json")
        data[name] = meta, split, load_split(data_dir, split), text_decoder(load_tokenizer(tok))
    tasks = harness_tasks(args.tasks, args.include_path) if args.tasks else None
    configs = [read_config(resolve_file(c, "config.json")) for c in ckpts]
    for ckpt, cfg in zip(ckpts, configs):
        tok = checkpoint_tokenizer(ckpt)
        for meta, *_ in data.values():
            check_compatible(meta, tokenizer_sha256=tok and tokenizer_sha256(tok), vocab_size=cfg.vocab_size)
    if len(args.contexts) > 1:
        return run_sweep(args, device, ckpts, configs, data, DTYPES[args.dtype])

    results = []
    for label, ckpt, cfg in zip(args.ckpt, ckpts, configs):
        model = fast.install(load_pretrained(ckpt, dtype=DTYPES[args.dtype]).to(device), fast.wanted(args.fast, device))
        if args.prompt is not None:
            enc = load_tokenizer(args.tokenizer or checkpoint_tokenizer(ckpt) or DEFAULT_TOKENIZER)
            print(f"--- {label} (temperature {args.temperature}, top_k {args.top_k}, seed {args.seed})")
            print(sample(model, enc, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                         args.extrapolate))
        limit = max_context(cfg)  # None: any length (an all-modal student)
        context = args.context if limit is None else min(args.context, limit)
        if (data or tasks) and context < args.context:
            what = "its Hyena filters' l_max" if limit == cfg.filter_context else "its max_position_embeddings"
            print(f"warning: --context {args.context} is past the maximum of {label} ({what} {limit}): it is "
                  f"evaluated at context {limit} (the table's context column)", file=sys.stderr)
        row = {"model": label, "path": ckpt, "context": context, "datasets": {}}
        for name, (meta, split, tokens, to_text) in data.items():
            m = row["datasets"][name] = {"split": split, **evaluate(
                model, tokens, context, args.stride, args.batch_size, args.max_tokens, to_text=to_text,
                progress=f"{label} on {name} {split}", protocol=args.protocol, eot=meta["eot_token"])}
            if m["tokens"] < FEW_TOKENS:
                m["warning"] = f"only {m['tokens']:,} tokens scored (fewer than {FEW_TOKENS:,}): noisy perplexities"
                print(f"warning: {label} on {name} {split}: {m['warning']}", file=sys.stderr)
        if tasks is not None:
            adapter, evaluate_tasks, manager = tasks
            lm = adapter(model, tokenizer=args.tokenizer or checkpoint_tokenizer(ckpt) or DEFAULT_TOKENIZER,
                         batch_size=args.batch_size, max_length=context)
            row["tasks"] = evaluate_tasks(lm, args.tasks, manager)
        results.append(row)
        del model  # free it before the next one loads
    if data or args.tasks:
        print(table(results, list(data), args.tasks))
    if args.json:
        out = {"context": args.context, "stride": args.stride, "protocol": args.protocol, "dtype": args.dtype,
               "fast": fast.wanted(args.fast, device),
               "split": args.split, "max_tokens": args.max_tokens, "tasks": args.tasks, "results": results}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.json), json.dumps(out, indent=1) + "\n")
    return results


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    import cli  # the one error path: exit 2 and one line, no traceback (--debug shows it)
    cli.run(main)
