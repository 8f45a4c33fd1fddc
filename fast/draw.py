"""The draw of the next tokens in one kernel (issue 30): twin of hyena.sample for temperature > 0 without top_k.

hyena.sample draws as torch.multinomial does, argmax over v of softmax(x / T)_v / E_v with E_v ~ Exp(1): a float
copy, a division, a softmax, the noise, a division and an argmax, six or seven launches, about half of what
`generate` adds to a replayed step at B = 1 (docs/performance.md). The softmax's normalizer is one number per row,
so the same argmax is argmax_v (x_v / T - log E_v), and E_v = -log U_v for U_v ~ U[0, 1) is Exp(1): `_draw` reads
the logits and U once, in one pass a row, keeping the running maximum. U comes from torch.rand, so the draw
follows torch's generator (torch.manual_seed, and a CUDA graph's replays each draw anew).
"""
import torch

import hyena
from fast.decode import available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: hyena.sample serves
    triton = None

DRAW_BLOCK, DRAW_WARPS = 4096, 8  # vocabulary entries a step of a row's loop; Triton's num_warps

if triton is not None:
    @triton.jit
    def _draw(x_ptr, u_ptr, out_ptr, V, s_x, s_u, inv_t, BLOCK: tl.constexpr):
        """out[b] = argmax_v (x[b, v] inv_t - log(-log u[b, v])), the first of equal maxima; one program a row."""
        b = tl.program_id(0).to(tl.int64)
        best = tl.full((), -float("inf"), tl.float32)
        arg = tl.full((), 0, tl.int64)
        for start in range(0, V, BLOCK):
            v = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + b * s_x + v, mask=v < V, other=-float("inf")).to(tl.float32)
            u = tl.load(u_ptr + b * s_u + v, mask=v < V, other=0.5)
            score = x * inv_t - tl.log(-tl.log(u))  # (BLOCK,); u = 0 gives -inf: never drawn
            top = tl.max(score, axis=0)
            at = tl.min(tl.where(score == top, v, V), axis=0).to(tl.int64)  # the first maximum of the block
            take = top > best  # a later block wins only when strictly larger, as argmax keeps the first
            arg = tl.where(take, at, arg)
            best = tl.where(take, top, best)
        tl.store(out_ptr + b, arg)


def sample(logits, temperature=1.0, top_k=None):
    """hyena.sample: next tokens (B, 1) from logits (B, V), by `_draw` where it serves (temperature > 0, no top_k,
    CUDA or Triton's interpreter); elsewhere hyena.sample itself (greedy is its one argmax already).
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
    out = torch.empty(B, 1, dtype=torch.long, device=logits.device)
    _draw[(B,)](logits, u, out, V, logits.stride(0), u.stride(0), 1.0 / temperature, BLOCK=DRAW_BLOCK,
                num_warps=DRAW_WARPS)
    return out
