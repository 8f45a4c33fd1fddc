"""A teacher's decoding attention on CUDA: the new token's keys and values written into the cache and its query
scored against the positions up to pos only, in two Triton kernels (flash-decoding: the positions split across
programs as online softmaxes in fp32, then combined). Its plain twin, hyena.cached_attention, writes with
index_copy and runs SDPA over the whole preallocated cache under a mask: about ten launches a layer, and the whole
cache read whatever the position. fast.install puts `cached_attention` in each Attention's place of it.
"""
import torch

import hyena
from fast.decode import PROGRAMS, available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path serves
    triton = None

if triton is not None:
    @triton.jit
    def _attend_split(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, part_ptr, H, T, chunk, scale,
                      sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_b, sc_h, sc_t,
                      HD: tl.constexpr, BLOCK_S: tl.constexpr):
        """For query row program_id(0) = (b, h) and split program_id(1): the new token's k, v written at pos (split
        0, which also scores it from registers), the cache's positions [split chunk, (split + 1) chunk) before pos
        scored, as an online softmax's (acc (HD,), max m, sum l) into part; see cached_attention."""
        bh, split = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        d = tl.arange(0, HD)
        pos = tl.load(pos_ptr)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + d).to(tl.float32) * scale  # (HD,)
        kn = tl.load(k_ptr + b * sk_b + h * sk_h + d).to(kc_ptr.dtype.element_ty)  # as the cache keeps it
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


ATTEND_BLOCK = 64  # cached positions a step of the decoding attention scores
MAX_SPLITS = 128  # the combine holds (splits, head dim) partials in one program


def cached_attention(state, q, k, v, pos):
    """hyena.cached_attention for one new token (L = 1) in two kernels: the first writes its k, v into the cache
    and scores only the positions up to pos (the plain one reads the whole preallocated cache, masked), split
    across programs as an online softmax in fp32; the second combines the splits. Several new tokens, a head size
    that is not a power of two, strided head dims, a cache not contiguous or not (B, H, ...), or no kernel (fp64,
    `available`): the plain function.
    Plain twin: hyena.cached_attention; held equal, in Triton's CPU interpreter, by
    tests/test_hyena_operator.py::test_decoding_attention_kernel_equals_the_plain_attention_in_tritons_interpreter."""
    B, H, L, hd = q.shape
    if L != 1 or hd & (hd - 1) or not available(q) or any(t.stride(-1) != 1 for t in (q, k, v)) \
            or state.k.shape[:2] != (B, H) or not (state.k.is_contiguous() and state.v.is_contiguous()):
        return hyena.cached_attention(state, q, k, v, pos)
    T = state.k.shape[2]
    splits = min(MAX_SPLITS, triton.next_power_of_2(max(1, min(triton.cdiv(PROGRAMS, B * H),
                                                                triton.cdiv(T, ATTEND_BLOCK)))))
    chunk = triton.cdiv(triton.cdiv(T, splits), ATTEND_BLOCK) * ATTEND_BLOCK
    part = torch.empty(splits, B * H, hd + 2, device=q.device, dtype=torch.float32)
    _attend_split[(B * H, splits)](q, k, v, state.k, state.v, pos.reshape(1), part, H, T, chunk, hd ** -0.5,
                                   q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                   state.k.stride(0), state.k.stride(1), state.k.stride(2), HD=hd,
                                   BLOCK_S=ATTEND_BLOCK)
    out = torch.empty(B, H, 1, hd, device=q.device, dtype=q.dtype)
    _attend_combine[(B * H,)](part, out, B * H, HD=hd, SPLITS=splits)
    return out  # (B, H, 1, hd)
