"""A teacher's decoding attention on CUDA: the new token's keys and values written into the cache and its query
scored against the positions up to pos only, in two Triton kernels (flash-decoding: the positions split across
programs as online softmaxes in fp32, then combined). Its plain twin, hyena.cached_attention, writes with
index_copy and runs SDPA over the whole preallocated cache under a mask: about ten launches a layer, and the whole
cache read whatever the position. fast.install puts `cached_attention` in each Attention's place of it.
"""
import torch

import hyena
from fast.decode import available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path serves
    triton = None

if triton is not None:
    @triton.jit
    def _rope(x_ptr, d, pos, freq_ptr, HALF: tl.constexpr):
        """x (HD,) at x_ptr + d in fp32, its first 2 HALF dims rotated by pos * freq (hyena.Attention's RoPE:
        x cos + rotate_half(x) sin); HALF = 0: x."""
        x = tl.load(x_ptr + d).to(tl.float32)
        if HALF > 0:
            r = d < 2 * HALF
            partner = tl.load(x_ptr + tl.where(d < HALF, d + HALF, tl.where(r, d - HALF, d))).to(tl.float32)
            angle = pos.to(tl.float32) * tl.load(freq_ptr + d % HALF, mask=r, other=0.0)
            x = tl.where(r, x * tl.cos(angle) + tl.where(d < HALF, -partner, partner) * tl.sin(angle), x)
        return x

    @triton.jit
    def _attend_split(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, freq_ptr, part_ptr, H, T, chunk, scale,
                      sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_b, sc_h, sc_t,
                      HD: tl.constexpr, HALF: tl.constexpr, BLOCK_S: tl.constexpr):
        """For query row program_id(0) = (b, h) and split program_id(1): the new token's q and k rotated (HALF > 0:
        RoPE at pos), its k, v written at pos (split 0, which also scores it from registers), the cache's
        positions [split chunk, (split + 1) chunk) before pos scored, as an online softmax's (acc (HD,), max m,
        sum l) into part; see cached_attention."""
        bh, split = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        d = tl.arange(0, HD)
        pos = tl.load(pos_ptr)
        q = _rope(q_ptr + b * sq_b + h * sq_h, d, pos, freq_ptr, HALF) * scale  # (HD,)
        kn = _rope(k_ptr + b * sk_b + h * sk_h, d, pos, freq_ptr, HALF).to(kc_ptr.dtype.element_ty)  # as kept
        vn = tl.load(v_ptr + b * sv_b + h * sv_h + d).to(vc_ptr.dtype.element_ty)
        rows = b.to(tl.int64) * sc_b + h.to(tl.int64) * sc_h  # this (b, h)'s cache
        first = split == 0
        if first:  # (a position past the cache is not written: the plain index_copy_ raises there)
            tl.store(kc_ptr + rows + pos * sc_t + d, kn, mask=(d < HD) & (pos < T))
            tl.store(vc_ptr + rows + pos * sc_t + d, vn, mask=(d < HD) & (pos < T))
        m = tl.where(first, tl.sum(q * kn.to(tl.float32)), -float("inf"))  # the running max of the scores
        l = tl.where(first, 1.0, 0.0)  # the running sum of exp(score - m)
        acc = tl.where(first, vn.to(tl.float32), 0.0)  # (HD,) the running sum of exp(score - m) v
        start = split * chunk
        end = tl.minimum(start + chunk, pos)  # the cache's positions before pos
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            ok = s < end
            kb = tl.load(kc_ptr + rows + s[:, None] * sc_t + d[None, :], mask=ok[:, None], other=0.0)
            score = tl.where(ok, tl.sum(kb.to(tl.float32) * q[None, :], axis=1), -float("inf"))  # (BLOCK_S,)
            m_new = tl.maximum(m, tl.max(score, axis=0))
            alpha, p = tl.exp(m - m_new), tl.exp(score - m_new)
            vb = tl.load(vc_ptr + rows + s[:, None] * sc_t + d[None, :], mask=ok[:, None], other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * vb.to(tl.float32), axis=0)
            l = l * alpha + tl.sum(p, axis=0)
            m = m_new
        out = part_ptr + (split * tl.num_programs(0) + bh).to(tl.int64) * (HD + 2)
        tl.store(out + d, acc)
        tl.store(out + HD, m)
        tl.store(out + HD + 1, l)

    @triton.jit
    def _attend_combine(part_ptr, out_ptr, BH, HD: tl.constexpr, SPLITS: tl.constexpr):
        """out[bh] = sum_j e^(m_j - M) acc_j / sum_j e^(m_j - M) l_j over the splits' partials."""
        bh = tl.program_id(0)
        j, d = tl.arange(0, SPLITS), tl.arange(0, HD)
        rows = part_ptr + (j * BH + bh).to(tl.int64)[:, None] * (HD + 2)  # (SPLITS, 1)
        acc = tl.load(rows + d[None, :])  # (SPLITS, HD)
        m, l = tl.load(rows + HD), tl.load(rows + HD + 1)  # (SPLITS, 1) each
        w = tl.exp(m - tl.max(m, axis=0))  # split 0 always holds the new token: the max is finite
        y = tl.sum(w * acc, axis=0) / tl.sum(w * l, axis=0)
        tl.store(out_ptr + bh * HD + d, y.to(out_ptr.dtype.element_ty))


# cached positions a step of the decoding attention scores, and the programs to aim for (short batches split the
# positions further): the best of 9 pairs at a 64k context, B = 1 and 64 (results/gpu-logs-2026-12-07d/step.md)
ATTEND_BLOCK, ATTEND_PROGRAMS = 128, 16384
MAX_SPLITS = 128  # the combine holds (splits, head dim) partials in one program


def cached_attention(state, q, k, v, pos):
    """hyena.cached_attention for one new token (L = 1) in two kernels: the first writes its k, v into the cache
    and scores only the positions up to pos (the plain one reads the whole preallocated cache, masked), split
    across programs as an online softmax in fp32; the second combines the splits. Several new tokens, or what
    `serves` refuses: the plain function.
    Plain twin: hyena.cached_attention; held equal, in Triton's CPU interpreter, by
    tests/test_hyena_operator.py::test_decoding_attention_kernel_equals_the_plain_attention_in_tritons_interpreter."""
    if q.shape[2] != 1 or not serves(state, q, k, v):
        return hyena.cached_attention(state, q, k, v, pos)
    return attend(state, q[:, :, 0], k[:, :, 0], v[:, :, 0], pos)[:, :, None]  # (B, H, 1, hd)


def serves(state, q, k, v):
    """Whether the kernels take q, k, v (B, H, [1,] hd) against state: a head size that is a power of two, head
    dims contiguous, a contiguous (B, H, T, hd) cache, and a kernel (`available`: not fp64)."""
    B, H, hd = q.shape[0], q.shape[1], q.shape[-1]
    return (not hd & (hd - 1) and available(q) and all(t.stride(-1) == 1 for t in (q, k, v))
            and state.k.shape[:2] == (B, H) and state.k.is_contiguous() and state.v.is_contiguous())


def attend(state, q, k, v, pos, freq=None):
    """The kernels: q, k, v (B, H, hd) of the token at pos -> (B, H, hd) in q's dtype, k and v written into the
    cache first; with freq (the (hd_r / 2,) RoPE frequencies) q and k rotated at pos first (fast/step.py's step
    hands this the projections unrotated).
    Plain twin: hyena.cached_attention (after hyena.Attention's RoPE); held equal, in Triton's CPU interpreter, by
    tests/test_hyena_operator.py::test_decoding_attention_kernel_equals_the_plain_attention_in_tritons_interpreter
    and, with RoPE, tests/test_step.py::test_fused_step_equals_the_eager_step_in_tritons_interpreter."""
    B, H, hd = q.shape
    T = state.k.shape[2]
    splits = min(MAX_SPLITS, triton.next_power_of_2(max(1, min(triton.cdiv(ATTEND_PROGRAMS, B * H),
                                                                triton.cdiv(T, ATTEND_BLOCK)))))
    chunk = triton.cdiv(triton.cdiv(T, splits), ATTEND_BLOCK) * ATTEND_BLOCK
    part = torch.empty(splits, B * H, hd + 2, device=q.device, dtype=torch.float32)
    half = 0 if freq is None else freq.shape[0]
    _attend_split[(B * H, splits)](q, k, v, state.k, state.v, pos.reshape(1), q if freq is None else freq, part, H,
                                   T, chunk, hd ** -0.5, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                   v.stride(0), v.stride(1), state.k.stride(0), state.k.stride(1),
                                   state.k.stride(2), HD=hd, HALF=half, BLOCK_S=ATTEND_BLOCK)
    out = torch.empty(B, H, hd, device=q.device, dtype=q.dtype)
    _attend_combine[(B * H,)](part, out, B * H, HD=hd, SPLITS=splits)
    return out  # (B, H, hd)
