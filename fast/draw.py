"""The draw of the next tokens in two short kernels (issue 30): twin of hyena.sample for temperature > 0 without
top_k.

hyena.sample draws as torch.multinomial does, argmax over v of softmax(x / T)_v / E_v with E_v ~ Exp(1): a float
copy, a division, a softmax, the noise, a division and an argmax, six or seven launches, about half of what
`generate` adds to a replayed step at B = 1 (docs/performance.md). The softmax's normalizer is one number per row,
so the same argmax is argmax_v (x_v / T - log E_v), and E_v = -log U_v for U_v ~ U[0, 1) is Exp(1). `_draw_part`
reads the logits and U once, a block of the vocabulary a program (one program a row walking 13 blocks of 4,096 in
turn, with the noise, added 32 us to a replayed step at B = 1 on an H100: results/gpu-logs-2026-12-07h/
step-sweep.md), keeping each block's maximum and its first place; `_draw_pick` takes the first block holding the
row's maximum. U comes from torch.rand, so the draw follows torch's generator (torch.manual_seed, and a CUDA
graph's replays each draw anew).
"""
import torch

import hyena
from fast.decode import available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: hyena.sample serves
    triton = None

DRAW_BLOCK, DRAW_WARPS = 1024, 4  # vocabulary entries a program; Triton's num_warps

if triton is not None:
    @triton.jit
    def _draw_part(x_ptr, u_ptr, best_ptr, arg_ptr, V, NP, s_x, s_u, inv_t, BLOCK: tl.constexpr):
        """For block j of row b: best[b, j] = max_v (x[b, v] inv_t - log(-log u[b, v])) over its entries and
        arg[b, j] the first v reaching it."""
        b, j = tl.program_id(0).to(tl.int64), tl.program_id(1)
        v = j * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + b * s_x + v, mask=v < V, other=-float("inf")).to(tl.float32)
        u = tl.load(u_ptr + b * s_u + v, mask=v < V, other=0.5)
        score = x * inv_t - tl.log(-tl.log(u))  # (BLOCK,); u = 0 gives -inf: never drawn
        top = tl.max(score, axis=0)
        at = tl.min(tl.where(score == top, v, V), axis=0)  # V where nothing equals top (NaN scores)
        tl.store(best_ptr + b * NP + j, top)
        tl.store(arg_ptr + b * NP + j, tl.where(at < V, at, j * BLOCK).to(tl.int64))  # a token, whatever came in

    @triton.jit
    def _draw_pick(best_ptr, arg_ptr, out_ptr, n, NP: tl.constexpr):
        """out[b] = arg[b, j] of the first block j whose best is the row's maximum: argmax's first maximum."""
        b, j = tl.program_id(0).to(tl.int64), tl.arange(0, NP)
        best = tl.load(best_ptr + b * NP + j, mask=j < n, other=-float("inf"))
        first = tl.min(tl.where(best == tl.max(best, axis=0), j, NP), axis=0)
        first = tl.where(first < n, first, 0)  # a NaN row: block 0's first token, as the plain draw gives
        tl.store(out_ptr + b, tl.load(arg_ptr + b * NP + first))


def sample(logits, temperature=1.0, top_k=None):
    """hyena.sample: next tokens (B, 1) from logits (B, V), by `_draw_part` and `_draw_pick` where they serve
    (temperature > 0, no top_k, CUDA or Triton's interpreter); elsewhere hyena.sample itself (greedy is its one
    argmax already). A row of NaN logits draws token 0, as the plain draw does.
    Plain twin: hyena.sample; held equal, in Triton's CPU interpreter, by
    tests/test_draw.py::test_fused_draw_equals_the_plain_draw_on_the_same_noise and
    tests/test_draw.py::test_fused_draw_follows_the_softmax (the hand-over by
    tests/test_draw.py::test_draw_hands_greedy_top_k_and_the_cpu_to_the_plain_sample)."""
    if triton is None or temperature == 0 or top_k is not None or not available(logits):
        return hyena.sample(logits, temperature, top_k)
    B, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    u = torch.rand(B, V, device=logits.device)  # (B, V) fp32 in [0, 1)
    n = triton.cdiv(V, DRAW_BLOCK)
    NP = triton.next_power_of_2(n)
    best = torch.empty(B, NP, dtype=torch.float32, device=logits.device)
    arg = torch.empty(B, NP, dtype=torch.long, device=logits.device)
    out = torch.empty(B, 1, dtype=torch.long, device=logits.device)
    _draw_part[(B, n)](logits, u, best, arg, V, NP, logits.stride(0), u.stride(0), 1.0 / temperature,
                       BLOCK=DRAW_BLOCK, num_warps=DRAW_WARPS)
    _draw_pick[(B,)](best, arg, out, n, NP=NP)
    return out
