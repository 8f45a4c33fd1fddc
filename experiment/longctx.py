"""Long-context probes: passkey retrieval against prompt length (here), inference cost and training-step speed
against context (experiment/throughput.py).

    python experiment/longctx.py passkey --ckpt runs/teacher/final runs/long/final --lengths 2048 4096 8192 16384 \\
        --trials 20 --tokenizer ../shared/data/tokenizer/20B_tokenizer.json --json runs/longctx/passkey.json
    python experiment/longctx.py speed --ckpt runs/modal/d16/final --contexts 2048 16384 --tokens-per-step 32768 \\
        --steps 10 --compile --json runs/longctx/speed.json

passkey (Mohtashami & Jaggi 2023): the standard filler repeated, a random 5-digit key hidden at a random depth,
then the question; the prompt is exactly LENGTH tokens. The model answers greedily, and is right when the first
run of digits it writes is the key; the mean log-probability of the key's tokens after the prompt is the graded
signal. Every model gets the same prompts (one rng per length). A model's native maximum (Config.native_context:
attention max_position_embeddings, conv Hyena l_max, all-modal Hyena none) must hold the prompt plus the answer
tokens; where the prompt fits but the answer does not, the intro's first tokens are left out (recorded as
input_tokens). Past it, --beyond decides as in eval.py: refuse (before any work), extrapolate (attention runs its
RoPE past max_position_embeddings; conv Hyena filters end at l_max, so those lengths are skipped with the reason),
or window (the model reads only the prompt's last tokens that fit).

infer: the cost of scoring every token of long sequences at inference (bf16 autocast on CUDA): a model native at
the context reads each sequence in one forward; one whose native maximum is shorter (the teacher) reads it in
sliding windows of that maximum, --stride apart, each window scoring its last stride tokens (the first all of
its own) -- its best honest use. The head runs only on scored positions, for both. tokens/s = scored tokens
(every token of every sequence) per second, after one untimed warm-up call (which compiles, with --compile).

speed: forward + backward + AdamW steps of the model on random tokens (bf16 autocast on CUDA, as train.py), the same
tokens per step at every context (batch = tokens-per-step / context); tokens/s over the steps after --warmup.
"""
import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python experiment/longctx.py`
import numpy as np
import torch
import torch.nn.functional as F

from pretrained.config import read_config
from experiment.throughput import config_file, device_of, infer, load, speed
from cli import integer, writable_dir, write_atomic
from tokenizer import load_tokenizer, tokenizer_file_sha256

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
BUCKETS = 5  # depth buckets [0, 0.2), ..., [0.8, 1.0]
BEYOND = ("refuse", "extrapolate", "window")


def passkey_prompt(enc, length, key, depth):
    """(prompt ids of exactly `length` tokens, index of the needle's first token): INTRO, filler tokens with the
    needle after round(depth * filler) of them, QUESTION. The filler is one tokenized sentence group tiled, so
    the text around the needle is the same at every length."""
    intro, needle, question = enc.encode(INTRO), enc.encode(NEEDLE.format(key=key)), enc.encode(QUESTION)
    n_fill = length - len(intro) - len(needle) - len(question)
    if n_fill < 0:
        raise ValueError(f"--lengths {length}: a passkey prompt needs at least "
                         f"{len(intro) + len(needle) + len(question)} tokens (intro, needle, question)")
    unit = enc.encode(FILLER)
    filler = (unit * (n_fill // len(unit) + 1))[:n_fill]
    before = round(depth * n_fill)
    ids = intro + filler[:before] + needle + filler[before:] + question
    return ids, len(intro) + before


def bucket(depth):
    i = min(int(depth * BUCKETS), BUCKETS - 1)
    return f"{i / BUCKETS:.1f}-{(i + 1) / BUCKETS:.1f}"


def trials(length, n, seed):
    """n (key, depth) pairs for one length: the same for every model."""
    rng = np.random.default_rng([seed, length])
    return [(int(rng.integers(10000, 100000)), float(rng.uniform(0, 1))) for _ in range(n)]


def answer_tokens(enc, key):
    return enc.encode(f" {key}")


def plan(cfg, length, new, beyond):
    """(mode, input tokens the model reads, or None with the reason it is skipped). new: continuation tokens."""
    native = cfg.native_context
    if native is None or length <= native:
        return "native", length if native is None else min(length, native - new), None
    if beyond == "refuse":
        raise AssertionError("refused before the run")  # main() refuses first, naming the models and lengths
    if beyond == "window":
        return "window", native - new, None
    if cfg.filter_context is not None and length + new > cfg.filter_context:
        return "extrapolate", None, (f"convolutional Hyena filters end at l_max {cfg.filter_context}: no "
                                     f"extrapolation to {length} tokens")
    return "extrapolate", length, None


@torch.no_grad()
def probe(model, enc, length, cases, beyond, new):
    """One model at one length: accuracy, per depth bucket, and the mean key log-probability (nats/token)."""
    mode, keep, skipped = plan(model.config, length, new, beyond)
    if skipped:
        return {"mode": mode, "skipped": skipped}
    device = next(model.parameters()).device
    right, logprobs, by = 0, [], {bucket((i + 0.5) / BUCKETS): [0, 0] for i in range(BUCKETS)}
    for key, depth in cases:
        ids, _ = passkey_prompt(enc, length, key, depth)
        ids, answer = ids[len(ids) - keep:], answer_tokens(enc, key)
        x = torch.tensor([ids + answer], device=device)  # (1, keep + A)
        h = model.hidden_states(x)[-1][:, -len(answer) - 1:-1]  # (1, A, D): the positions predicting the key
        lp = F.log_softmax(model.head(h).float(), -1)[0].gather(-1, x[0, -len(answer):, None])  # (A, 1)
        logprobs.append(lp.mean().item())
        out = model.generate(x[:, :len(ids)], new, temperature=0, extrapolate=mode == "extrapolate")  # (1, keep + new)
        digits = re.search(r"\d+", enc.decode(out[0, len(ids):].tolist()))
        ok = digits is not None and digits.group() == str(key)
        right += ok
        b = by[bucket(depth)]
        b[0], b[1] = b[0] + ok, b[1] + 1
    return {"mode": mode, "input_tokens": keep, "trials": len(cases), "correct": right,
            "accuracy": right / len(cases), "mean_key_logprob": sum(logprobs) / len(logprobs),
            "by_depth": {k: {"trials": t, "accuracy": c / t if t else None} for k, (c, t) in by.items()}}


def resolve_tokenizer(flag, ckpts):
    """--tokenizer, else the first checkpoint's tokenizer.json; every checkpoint carrying one must agree."""
    path = Path(flag) if flag else next((Path(c) / "tokenizer.json" for c in ckpts
                                         if (Path(c) / "tokenizer.json").is_file()), None)
    if path is None:
        raise ValueError("--tokenizer: no checkpoint carries a tokenizer.json; pass the tokenizer.json the models "
                         "were trained with")
    if not path.is_file():
        raise FileNotFoundError(f"--tokenizer {path}: no such file; pass a tokenizer.json")
    sha = tokenizer_file_sha256(path)
    for c in ckpts:
        own = Path(c) / "tokenizer.json"
        if own.is_file() and tokenizer_file_sha256(own) != sha:
            raise ValueError(f"--ckpt {c} carries another tokenizer.json than {path}: its ids would mean other "
                             "text; probe models of one tokenizer together")
    return load_tokenizer(str(path))


def passkey(args):
    if args.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {args.trials}")
    enc = resolve_tokenizer(args.tokenizer, args.ckpt)
    device = device_of(args.device)
    new = 3 + max(len(answer_tokens(enc, k)) for k in (10000, 99999))  # the key and a little after it
    if len(enc.encode(INTRO)) < new:
        raise AssertionError("the intro must be longer than the answer: only intro tokens may be left out")
    cases = {L: trials(L, args.trials, args.seed) for L in args.lengths}
    for L in args.lengths:
        passkey_prompt(enc, L, 10000, 0.0)  # too short a length fails here, before any model loads
    configs = {c: read_config(config_file(c)) for c in args.ckpt}  # a refusal comes before any (long) probe
    if args.beyond == "refuse":
        over = [f"{c} at {L} (native {cfg.native_context})" for c, cfg in configs.items() for L in args.lengths
                if cfg.native_context is not None and L > cfg.native_context]
        if over:
            raise ValueError(f"--beyond refuse: lengths past a model's native maximum: {'; '.join(over)}. Use "
                             "--beyond window or extrapolate, or lower --lengths")
    if args.json:
        writable_dir(Path(args.json).parent, "--json")
    out = {"lengths": args.lengths, "trials": args.trials, "seed": args.seed, "beyond": args.beyond,
           "depth_buckets": [bucket((i + 0.5) / BUCKETS) for i in range(BUCKETS)], "passkey": {}}
    for ckpt in args.ckpt:
        model = load(ckpt, device)
        row = out["passkey"][ckpt] = {}
        for L in args.lengths:
            t0 = time.perf_counter()
            row[str(L)] = r = probe(model, enc, L, cases[L], args.beyond, new)
            r["seconds"] = time.perf_counter() - t0
            print(f"passkey {ckpt} @ {L}: " + (f"skipped ({r['skipped']})" if "skipped" in r else
                  f"{r['mode']} accuracy {r['accuracy']:.2f}, key log-prob {r['mean_key_logprob']:.3f}"),
                  file=sys.stderr)
        del model
    if args.json:
        write_atomic(Path(args.json), json.dumps(out, indent=1) + "\n")
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("passkey", help="passkey retrieval accuracy against prompt length")
    pk.add_argument("--ckpt", nargs="+", required=True, help="checkpoint folders (save_pretrained)")
    pk.add_argument("--lengths", nargs="+", type=integer, default=[2048, 4096, 8192, 16384, 32768],
                    help="prompt lengths in tokens (default: %(default)s)")
    pk.add_argument("--trials", type=int, default=20, help="prompts per length (default: %(default)s)")
    pk.add_argument("--tokenizer", help="tokenizer.json (default: the first checkpoint's)")
    pk.add_argument("--beyond", choices=BEYOND, default="refuse",
                    help="past a model's native maximum: refuse, extrapolate or window (default: %(default)s)")
    pk.add_argument("--seed", type=int, default=1337, help="draws the keys and depths (default: %(default)s)")
    pk.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    pk.add_argument("--json", help="write every number here")
    inf = sub.add_parser("infer", help="inference tokens/s and peak memory scoring whole long sequences")
    inf.add_argument("--ckpt", nargs="+", required=True, help="checkpoint folders (save_pretrained)")
    inf.add_argument("--contexts", nargs="+", type=integer, default=[16384, 32768], help="default: %(default)s")
    inf.add_argument("--tokens", type=integer, default=65536, help="tokens scored per context (sequences x "
                     "context; default: %(default)s)")
    inf.add_argument("--stride", type=integer, default=512, help="sliding-window stride past a model's native "
                     "maximum (default: %(default)s)")
    inf.add_argument("--compile", action="store_true", help="torch.compile the forward (eager if it fails)")
    inf.add_argument("--seed", type=int, default=1337)
    inf.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    inf.add_argument("--json", help="write every number here")
    sp = sub.add_parser("speed", help="training-step tokens/s and peak memory against context")
    sp.add_argument("--ckpt", required=True, help="checkpoint folder (save_pretrained)")
    sp.add_argument("--contexts", nargs="+", type=integer, default=[2048, 16384], help="default: %(default)s")
    sp.add_argument("--tokens-per-step", type=integer, default=32768, help="default: %(default)s")
    sp.add_argument("--steps", type=int, default=10, help="timed steps per context, warm-up included "
                                                          "(default: %(default)s)")
    sp.add_argument("--warmup", type=int, default=2, help="first steps not timed (default: %(default)s)")
    sp.add_argument("--compile", action="store_true", help="torch.compile the step's forward, as train.py's "
                    "--compile on (a failing compile falls back to eager, reported as compiled false)")
    sp.add_argument("--seed", type=int, default=1337)
    sp.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    sp.add_argument("--json", help="write every number here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return {"passkey": passkey, "infer": infer, "speed": speed}[args.command](args)


if __name__ == "__main__":
    import cli  # the one error path: exit 2 and one line, no traceback (--debug shows it)
    cli.run(main)
