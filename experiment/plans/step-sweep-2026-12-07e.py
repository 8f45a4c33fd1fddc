"""Issue 30, ready for the next GPU session: the fused decoding step's tiles, wider than step-2026-12-07d.py's sweep.

    PYTHONPATH=. python experiment/plans/step-sweep-2026-12-07e.py OUT_DIR

That sweep's profile (results/gpu-logs-2026-12-07d/step.md) put a modal B = 1 step's A matmuls at 13 us each,
latency-bound: a longer K chunk (BK 64 -> 128) was its best single change. This one tries BK up to the whole D
(one load of a row, one dot), more C splits, wider head blocks and narrower modal-core blocks, at B = 1, 16, 64,
and 256 (past FUSED_MAX_BATCH, where the step goes to the eager kernels). Then `generate`'s draw: the replayed
step with the draw (temperature 1 by hyena.sample and by fast.draw, and greedy) against the raw step, which is what generate's share loses.
Writes OUT_DIR/sweep.md (one row per variant, as measured) and prints it, and OUT_DIR/best.json: the fastest tiles
for small (B <= 16) and large batches, summed over the models and batches each was timed at, and the modal-core
block at the default small tiles (with-tiles-2026-12-07g.py puts them in for a bench run)."""
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

import fast
from cli import write_atomic
from experiment.plans.gpu_report import Report, wall
from fast import decode, draw, step as fstep
from hyena import Config, new_cache, sample
from modal.student import build

out = Path(sys.argv[1])
log = Report(out / "sweep.md", "fused step sweep")


cfg = Config()
n = cfg.num_hidden_layers
MODELS = {"modal": replace(cfg, mixers=["hyena"] * n, hyena_modal_state=[16] * n, max_position_embeddings=4096),
          "teacher": replace(cfg, max_position_embeddings=4096)}


def serving(c):
    m = build(c)
    for module in m.modules():
        if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
            module.to(torch.bfloat16)
    return fast.install(m.cuda().eval())


def timed(m, B, pick=lambda logits: logits, fused=True):
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        cache = new_cache(m, 4096)
        m(torch.randint(cfg.vocab_size, (B, 16), device="cuda"), cache=cache)
        cache.pos.fill_(2048)  # attention reads up to pos: a 2k context
        tok = torch.randint(cfg.vocab_size, (B, 1), device="cuda")
        one = fstep.graphed_step(m, cache, B, pick, fused=fused)
        return wall(lambda: one(tok), 200, warmup=5) / 1e3


SMALL = [(16, bn, bnc, ks, bk, 128) for bn, bnc, ks, bk in itertools.product((32, 64), (16, 32), (4, 8), (128, 512))]
SMALL += [(16, 32, 16, 4, bk, 256) for bk in (128, 512)]  # a wider head block
SMALL += [(16, 16, 16, 4, bk, 128) for bk in (128, 512)]  # A's narrowest block: 224 programs, more loads in flight
LARGE = [(bm, bn, 32, ks, bk, 128) for bm, bn, ks, bk in itertools.product((32, 64), (64, 128), (2, 4), (64, 512))]
SMALL.insert(0, fstep.SMALL_BATCH_TILES)  # the defaults first: the rows to beat
LARGE.insert(0, fstep.LARGE_BATCH_TILES)
BATCHES = {"modal": (1, 16, 64, 256), "teacher": (1, 64)}
defaults = fstep.SMALL_BATCH_TILES, fstep.LARGE_BATCH_TILES, fstep.FUSED_MAX_BATCH, decode.MIX_BLOCK_D
timings = {}  # (small batch, tiles, mix block) -> {(model, B): seconds a step}


def choose():
    """The fastest over every (model, batch) each class was timed at so far, written to best.json as bench.py's
    serve section can take them (with-tiles-2026-12-07g.py): rewritten after each batch, so a run cut short keeps
    what it measured."""
    best = {}
    for small in (True, False):
        seen = [k for k in timings if k[0] == small]
        if seen:
            most = max(len(timings[k]) for k in seen)
            full = [k for k in seen if len(timings[k]) == most]
            best["SMALL_BATCH_TILES" if small else "LARGE_BATCH_TILES"] = list(
                min(full, key=lambda k: sum(timings[k].values()))[1])
    blocks = {k[2]: sum(t for (n, _), t in v.items() if n == "modal") for k, v in timings.items()
              if k[0] and k[1] == tuple(defaults[0])}
    if blocks:
        best["MIX_BLOCK_D"] = min(blocks, key=blocks.get)
    write_atomic(out / "best.json", json.dumps(best))
    return best


log("## tiles: one replayed step at a 2k context", "", "| model | B | tiles | mix block | us/step | tok/s |",
    "|---|---:|---|---:|---:|---:|")
for name, c in MODELS.items():
    m = serving(c)
    for B in BATCHES[name]:
        fstep.FUSED_MAX_BATCH = 256
        base = timed(m, B, fused=False)
        log(f"| {name} | {B} | eager step's graph | | {1e6 * base:.1f} | {B / base:,.0f} |")
        for tiles in (SMALL if B <= 16 else LARGE):
            for blk in ((16, 32, 64) if name == "modal" and tiles == (SMALL if B <= 16 else LARGE)[0] else (32,)):
                fstep.SMALL_BATCH_TILES = fstep.LARGE_BATCH_TILES = tiles
                decode.MIX_BLOCK_D = blk
                try:
                    s = timed(m, B)
                    log(f"| {name} | {B} | {tiles} | {blk} | {1e6 * s:.1f} | {B / s:,.0f} |")
                    timings.setdefault((B <= 16, tuple(tiles), blk), {})[(name, B)] = s
                except Exception as e:  # a tile a GPU refuses (shared memory): say so, go on
                    log(f"| {name} | {B} | {tiles} | {blk} | error: {type(e).__name__}: {str(e)[:80]} | |")
        fstep.SMALL_BATCH_TILES, fstep.LARGE_BATCH_TILES, fstep.FUSED_MAX_BATCH, decode.MIX_BLOCK_D = defaults
        choose()
    del m
log("", f"fastest: {choose()}", "")

log("## generate's draw: the replayed step with and without it (default tiles)", "",
    "| model | B | raw us | greedy us | temperature 1 us (hyena.sample) | temperature 1 us (fast.draw) |",
    "|---|---:|---:|---:|---:|---:|")
for name, c in MODELS.items():
    m = serving(c)
    for B in (1, 64):
        raw, greedy, hot, fused = (timed(m, B, pick) for pick in (
            lambda logits: logits, lambda logits: sample(logits, 0), lambda logits: sample(logits, 1.0),
            lambda logits: draw.sample(logits, 1.0)))
        log(f"| {name} | {B} | {1e6 * raw:.1f} | {1e6 * greedy:.1f} | {1e6 * hot:.1f} | {1e6 * fused:.1f} |")
    del m
