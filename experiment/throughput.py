"""longctx.py's cost probes (see its docstring): `infer`, inference tokens/s and peak memory scoring every token of
long sequences, and `speed`, training-step tokens/s against context.
"""
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import fast
import fast.losses
from pretrained.config import read_config
from fast.losses import head_loss
from cli import writable_dir, write_atomic
from training.runtime import compile_or_eager
from training import TrainConfig
from modal.student import load_pretrained
from train import CrossEntropy, build_optimizer, lm_loss


def device_of(flag):
    if flag == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if flag.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {flag}: this PyTorch {torch.__version__} sees no CUDA GPU; use --device cpu")
    return flag


def config_file(ckpt):
    path = Path(ckpt) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt {ckpt}: no config.json there; pass a folder written by save_pretrained "
                                "(a run's final/)")
    return path


def load(ckpt, device):
    config_file(ckpt)
    return fast.install(load_pretrained(ckpt).to(device).eval(), fast.wanted("auto", device))


def speed(args):
    device = device_of(args.device)
    cuda = device.startswith("cuda")
    for C in args.contexts:
        if C < 1 or args.tokens_per_step % C:
            raise ValueError(f"--contexts {C}: --tokens-per-step {args.tokens_per_step} must be a multiple of it")
    if args.steps <= args.warmup:
        raise ValueError(f"--steps {args.steps} must exceed --warmup {args.warmup} (warm-up steps are not timed)")
    if args.json:
        writable_dir(Path(args.json).parent, "--json")
    config = read_config(config_file(args.ckpt))
    limit = config.filter_context
    if limit is not None and max(args.contexts) > limit:
        raise ValueError(f"--contexts {max(args.contexts)} exceeds the convolutional Hyena filters' l_max {limit} "
                         f"of {args.ckpt}; convert it with distill.py --modal-state first, or lower --contexts")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    out = {"ckpt": args.ckpt, "tokens_per_step": args.tokens_per_step, "steps": args.steps, "warmup": args.warmup,
           "device": torch.cuda.get_device_name(device) if cuda else "cpu", "contexts": {}}
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, config.vocab_size, 4 * max(args.contexts)).astype(np.int64)  # the compile's trial
    for C in args.contexts:
        model = load_pretrained(args.ckpt).to(device).train()  # fresh weights and optimizer per context
        cfg = TrainConfig(out_dir="unused", batch_size=args.tokens_per_step // C, block_size=C,
                          max_tokens=args.tokens_per_step * args.steps, compile="on" if args.compile else "off",
                          device=device)
        objective = fast.install(CrossEntropy(model, fast.losses.lm_loss if cuda else lm_loss), cuda)  # as train.py on CUDA
        opt = build_optimizer(model, cfg, fused=cuda)
        step_fn = compile_or_eager(objective, cfg, cuda, tokens, device, amp)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            x = torch.from_numpy(rng.integers(0, config.vocab_size, (cfg.batch_size, C + 1))).to(device)
            t0 = time.perf_counter()
            with amp:
                loss, _ = step_fn(x[:, :-1], x[:, 1:])  # (B, C) inputs and targets
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        timed = sum(times[args.warmup:])
        out["contexts"][str(C)] = r = {
            "batch_size": cfg.batch_size, "tokens_per_s": args.tokens_per_step * (args.steps - args.warmup) / timed,
            "step_s": timed / (args.steps - args.warmup), "compiled": step_fn is not objective,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}
        print(f"speed {args.ckpt} @ {C} x {cfg.batch_size}: {r['tokens_per_s']:,.0f} tokens/s" +
              (f", peak {r['peak_mem_gb']:.1f} GB" if cuda else ""), file=sys.stderr)
        del model, opt, objective, step_fn
    if args.json:
        write_atomic(Path(args.json), json.dumps(out, indent=1) + "\n")
    return out


def body(model, x):
    """The final hidden states (B, L, D) before the last LayerNorm: every layer, no head."""
    h = model.gpt_neox.embed_in(x)  # (B, L, D)
    for block in model.gpt_neox.layers:
        h = block(h)
    return h


def window_starts(length, window, stride):
    """Start of each sliding window over `length` tokens (the last one ends at the sequence's end), and how many of
    its last tokens it scores: the first window scores all it reads, each later one the tokens past the previous."""
    if length <= window:
        return [(0, length)]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return [(s, window if i == 0 else s + window - (starts[i - 1] + window)) for i, s in enumerate(starts)]


@torch.no_grad()
def score_sequences(model, x, window=None, stride=None, forward=body, max_batch_tokens=65536):
    """Mean next-token CE of every position of x (B, L + 1) -- inputs x[:, :-1], targets x[:, 1:] -- read in one
    forward, or in sliding windows of `window` tokens `stride` apart (window_starts), the windows of all sequences
    batched (up to max_batch_tokens per forward); the head only on scored positions (fast.losses.head_loss, chunked)."""
    inputs, targets = x[:, :-1], x[:, 1:]  # (B, L) each
    B, L = inputs.shape
    if window is None or window >= L:
        return head_loss(model, forward(model, inputs), targets)
    starts = window_starts(L, window, stride)
    xs = torch.cat([inputs[:, s:s + window] for s, _ in starts])  # (windows * B, W)
    rows = max(1, max_batch_tokens // window)
    hs = torch.cat([forward(model, xs[i:i + rows]) for i in range(0, len(xs), rows)])  # (windows * B, W, D)
    h = torch.cat([hs[j * B:(j + 1) * B, -n:] for j, (_, n) in enumerate(starts)], dim=1)  # (B, L, D) scored
    t = torch.cat([targets[:, s + window - n:s + window] for s, n in starts], dim=1)  # (B, L)
    return head_loss(model, h, t)


def infer(args):
    device = device_of(args.device)
    cuda = device.startswith("cuda")
    if args.json:
        writable_dir(Path(args.json).parent, "--json")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    out = {"contexts": args.contexts, "tokens": args.tokens, "stride": args.stride, "compile": args.compile,
           "device": torch.cuda.get_device_name(device) if cuda else "cpu", "infer": {}}
    rng = np.random.default_rng(args.seed)
    for ckpt in args.ckpt:
        model = load(ckpt, device)
        limit = model.config.native_context  # None: any length
        forward, compiled = body, False
        if args.compile:
            torch._dynamo.reset()
            forward, compiled = torch.compile(body, dynamic=False), True
        row = out["infer"][ckpt] = {}
        for C in args.contexts:
            if args.tokens % C:
                raise ValueError(f"--contexts {C}: --tokens {args.tokens} must be a multiple of it")
            window = limit if limit is not None and limit < C else None
            x = torch.from_numpy(rng.integers(0, model.config.vocab_size, (args.tokens // C, C + 1))).to(device)
            with amp:
                try:
                    score_sequences(model, x, window, args.stride, forward)  # warm-up (compiles)
                except torch.OutOfMemoryError:
                    raise
                except Exception as e:  # noqa: BLE001 (a compiler failure: eager computes the same numbers)
                    if not compiled:
                        raise
                    print(f"warning: torch.compile failed ({type(e).__name__}); running eagerly", file=sys.stderr)
                    forward, compiled = body, False
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                loss = float(score_sequences(model, x, window, args.stride, forward))
            seconds = time.perf_counter() - t0
            row[str(C)] = r = {"mode": "window" if window else "native", "window": window, "batch_size": x.shape[0],
                               "loss": loss, "seconds": seconds, "tokens_per_s": args.tokens / seconds,
                               "compiled": compiled,
                               "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}
            print(f"infer {ckpt} @ {C} ({r['mode']}): {r['tokens_per_s']:,.0f} tokens/s" +
                  (f", peak {r['peak_mem_gb']:.1f} GB" if cuda else ""), file=sys.stderr)
        del model
    if args.json:
        write_atomic(Path(args.json), json.dumps(out, indent=1) + "\n")
    return out
