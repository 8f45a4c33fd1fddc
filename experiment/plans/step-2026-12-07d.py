"""Issue 30: the fused decoding step (fast/step.py) on one GPU: right, how fast, with which tiles.

    PYTHONPATH=. python experiment/plans/step-2026-12-07d.py OUT_DIR

1. Right: the fused step's CUDA graph against the eager step, logits over 8 steps after a 256-token prompt, for
   the modal student and the teacher as bench.py's serve section holds them (bf16 Linear/Embedding/LayerNorm
   weights), and for the modal student in fp32 (greedy tokens over 64 steps too).
2. Fast: tokens/s of one replayed step at a 2k context, B = 1 and 64, for the eager step's graph and the fused
   step's with each tile variant (fast.step's SMALL/LARGE_BATCH_TILES, fast.decode.MIX_BLOCK_D).
3. The decoding attention alone at a 64k context (B = 1, 64): fast.attention.attend with each (ATTEND_PROGRAMS,
   ATTEND_BLOCK), against the plain masked SDPA over the cache, GB/s of cache read.
4. The kernels of the fused step's replay (torch.profiler), default tiles.
Writes OUT_DIR/step.md and prints it."""
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import fast
import hyena
from experiment.plans.gpu_report import Report, wall
from fast import attention, decode, step as fstep
from hyena import AttentionState, Config, eager_step, new_cache
from modal.student import build

out = Path(sys.argv[1])
log = Report(out / "step.md", "fused step")


cfg = Config()
n = cfg.num_hidden_layers
MODAL = replace(cfg, mixers=["hyena"] * n, hyena_modal_state=[16] * n, max_position_embeddings=4096)
TEACHER = replace(cfg, max_position_embeddings=4096)


def serving(c):
    m = build(c)
    for module in m.modules():
        if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
            module.to(torch.bfloat16)
    return fast.install(m.cuda().eval())


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# 1. right
log("## 1. fused graph vs eager step", "", "| model | check | value |", "|---|---|---:|")
for name, m, amp in (("modal, bf16 weights", serving(MODAL), True), ("teacher, bf16 weights", serving(TEACHER), True),
                     ("modal, fp32", fast.install(build(MODAL).cuda().eval()), False)):
    B, ctx = 2, 256
    idx = torch.randint(cfg.vocab_size, (B, ctx + 8), device="cuda")
    runs = []
    try:
      for fused in (True, False):
        cache = new_cache(m, ctx + 10)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            m(idx[:, :ctx], cache=cache)
            assert fstep.serves(m, cache)
            one = fstep.graphed_step(m, cache, B) if fused else eager_step(m, cache, B, lambda x: x)
            runs.append(torch.stack([one(idx[:, t:t + 1]).clone() for t in range(ctx, ctx + 8)]))
      log(f"| {name} | logits rel err, 8 steps | {rel(runs[0], runs[1]):.3g} |")
      if not amp:
        gen = []
        for make in (fstep.cuda_graph_step, eager_step):
            m.make_step = make
            gen.append(m.generate(idx[:, :ctx], 64, temperature=0)[:, ctx:])
        log(f"| {name} | greedy tokens differing of 64 x {B} | {(gen[0] != gen[1]).sum().item()} |")
    except Exception:
        log(f"| {name} | error | {traceback.format_exc()[-1500:]!r} |")
    del m
log("")

# 2. fast
SMALL = [(16, 32, 16, 4, 64, 128), (16, 64, 16, 4, 64, 128), (16, 32, 16, 8, 64, 128), (16, 32, 32, 4, 64, 256),
         (16, 16, 16, 8, 64, 64), (16, 32, 16, 4, 128, 128)]
LARGE = [(64, 128, 32, 2, 64, 128), (64, 64, 32, 2, 64, 128), (64, 64, 16, 4, 64, 128), (64, 128, 64, 1, 64, 256),
         (32, 64, 32, 2, 64, 128), (64, 128, 32, 2, 128, 64)]
log("## 2. one replayed step at a 2k context, tokens/s", "", "| model | B | step | tiles | mix block | us/step | tok/s |",
    "|---|---:|---|---|---:|---:|---:|")
for name, c in (("modal", MODAL), ("teacher", TEACHER)):
    m = serving(c)
    for B in (1, 64):
        variants = [("eager graph", None, None)] + [("fused", t, None) for t in (SMALL if B <= 16 else LARGE)]
        if name == "modal":
            variants += [("fused", None, blk) for blk in (32, 128)]
        for kind, tiles, blk in variants:
            saved = fstep.SMALL_BATCH_TILES, fstep.LARGE_BATCH_TILES, decode.MIX_BLOCK_D
            if tiles:
                fstep.SMALL_BATCH_TILES = fstep.LARGE_BATCH_TILES = tiles
            if blk:
                decode.MIX_BLOCK_D = blk
            try:
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    cache = new_cache(m, 4096)
                    m(torch.randint(cfg.vocab_size, (B, 16), device="cuda"), cache=cache)
                    cache.pos.fill_(2048)  # attention reads up to pos: a 2k context
                    tok = torch.randint(cfg.vocab_size, (B, 1), device="cuda")
                    one = fstep.graphed_step(m, cache, B, fused=kind == "fused")
                    s = wall(lambda: one(tok), 200, warmup=5) / 1e3
                log(f"| {name} | {B} | {kind} | {tiles or fstep._tiles(B)} | {decode.MIX_BLOCK_D} | {1e6 * s:.1f} | "
                    f"{B / s:,.0f} |")
            except Exception as e:  # a tile a GPU refuses: say so, go on
                log(f"| {name} | {B} | {kind} | {tiles} | {blk} | error: {type(e).__name__}: {str(e)[:80]} | |")
            fstep.SMALL_BATCH_TILES, fstep.LARGE_BATCH_TILES, decode.MIX_BLOCK_D = saved
            del cache
    del m
log("")

# 3. attention at 64k
log("## 3. decoding attention alone, 64k context, one layer (8 heads x 64), bf16 cache", "",
    "| B | kernel | programs | block | us | cache GB/s |", "|---:|---|---:|---:|---:|---:|")
T = 65536 + 8
freq = hyena.Attention(cfg).inv_freq.cuda()
for B in (1, 64):
    state = AttentionState(torch.randn(B, 8, T, 64, device="cuda", dtype=torch.bfloat16),
                           torch.randn(B, 8, T, 64, device="cuda", dtype=torch.bfloat16))
    q = torch.randn(B, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    pos = torch.tensor(65536, device="cuda")
    gb = 2 * B * 8 * 65536 * 64 * 2 / 1e9
    s = wall(lambda: hyena.cached_attention(state, q, q, q, pos), 20, warmup=5) / 1e3
    log(f"| {B} | plain (masked SDPA) | | | {1e6 * s:.0f} | {gb / s:,.0f} |")
    for programs in (1024, 4096, 16384):
        for block in (64, 128, 256):
            attention.ATTEND_PROGRAMS, attention.ATTEND_BLOCK = programs, block
            try:
                s = wall(lambda: attention.attend(state, q[:, :, 0], q[:, :, 0], q[:, :, 0], pos, freq), 50,
                         warmup=5) / 1e3
                log(f"| {B} | attend | {programs} | {block} | {1e6 * s:.0f} | {gb / s:,.0f} |")
            except Exception as e:
                log(f"| {B} | attend | {programs} | {block} | error: {type(e).__name__}: {str(e)[:80]} | |")
    attention.ATTEND_PROGRAMS, attention.ATTEND_BLOCK = decode.PROGRAMS, 64
    del state
log("")

# 4. the kernels of a replay
for name, c in (("modal", MODAL), ("teacher", TEACHER)):
    m = serving(c)
    for B in (1, 64):
      try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            cache = new_cache(m, 4096)
            m(torch.randint(cfg.vocab_size, (B, 16), device="cuda"), cache=cache)
            cache.pos.fill_(2048)
            tok = torch.randint(cfg.vocab_size, (B, 1), device="cuda")
            one = fstep.graphed_step(m, cache, B)
            wall(lambda: one(tok), 10, warmup=5)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    one(tok)
                torch.cuda.synchronize()
        ev = sorted((e for e in prof.key_averages() if e.device_type.name == "CUDA"), key=lambda e: -e.device_time_total)
        total = sum(e.device_time_total for e in ev) / 10
        log(f"## 4. {name}, B={B}: {sum(e.count for e in ev) / 10:g} kernels, {total:.0f} us of kernels a step", "",
            "| kernel | calls/step | us/step |", "|---|---:|---:|",
            *(f"| {e.key[:90]} | {e.count / 10:g} | {e.device_time_total / 10:.1f} |" for e in ev[:16]), "")
      except Exception:
        log(f"## 4. {name}, B={B}: error", "", traceback.format_exc()[-1500:], "")
    del m
