"""The Hyena long convolution at training lengths as block-Toeplitz products on tensor cores (issue 29).

Cut time into chunks of C positions. For one channel, output chunk i of the causal convolution is
sum_m T_m X_{i-m}, T_m the C x C Toeplitz block of lags m C + q - p (zero below lag 0): a dense product per chunk
pair, which tensor cores run in bf16/fp16 with fp32 sums: ~L^2 / 2 + L C multiply-adds per channel, where the FFT
does ~L log L work in several passes over memory (which wins at which L is for GPU timings). The backward is the
same product anticausally: du is g correlated with k, dk is g correlated with u (summed over the batch), and
dbias = sum g u is dk's lag 0.

One Triton kernel does all three (`toeplitz_products`): a program owns BLOCK_I output chunks of one channel
(M = BLOCK_I rows of C positions, a contiguous stretch of time), and for each block lag m multiplies the input's
chunks shifted by m, (BLOCK_I, C), by the filter's Toeplitz block, (C, C), gathered from a window of 2C - 1
filter values. Channels-first copies (B, D, L) make both loads contiguous along time: in (B, L, D) one channel's
positions lie D apart, a sector per value. Channels cannot share a tile's K dimension (each has its own filter),
so a channel-spanning tile would need a batched dot; the copies cost a pass each, as FFTConv's do.

Precision: the filter is rounded to u's dtype (tensor cores multiply like types), where FFTConv keeps it fp32;
products of bf16/fp16 values are exact in fp32, sums are fp32, bias u is added in fp32. `toeplitz_conv` serves
where `available` (Triton; CUDA or its interpreter; bf16/fp16 activations); elsewhere it hands the call to
FFTConv (fast.fftconv.fftconv), the same function. `long_conv` picks by length (TOEPLITZ_MAX_L, to be measured).
"""
import os

import torch

from fast.fftconv import channels_first, fftconv

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: FFTConv serves
    triton = None

TOEPLITZ_MAX_L = 8192  # long_conv's crossover to FFTConv: a placeholder until GPU measurements set it
# Tiles per product, tuned on the GPU: chunk C (the Toeplitz block's side), rows (BLOCK_I chunks per program).
TILES = {"y": dict(chunk=64, rows=32, warps=4, stages=2),   # forward: causal, filter k
         "du": dict(chunk=64, rows=32, warps=4, stages=2),  # anticausal, filter k
         "dk": dict(chunk=64, rows=32, warps=4, stages=2)}  # anticausal, "filter" u, summed over the batch


def available(u):
    """Whether the kernel serves activations u: Triton installed, on CUDA (or in Triton's interpreter, for tests),
    in bf16 or fp16 (tensor cores' inputs; fp32 and fp64 keep FFTConv's precision)."""
    return (triton is not None and u.dtype in (torch.bfloat16, torch.float16)
            and (u.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))


if triton is not None:
    @triton.jit
    def _toeplitz(x_ptr, h_ptr, bias_ptr, out_ptr, L, D, NB, sx_b, sx_d, sx_t, sh_b, sh_d, sh_t, so_b, so_d, so_t,
                  CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, C: tl.constexpr, BLOCK_I: tl.constexpr):
        """out[o, d, chunks i0 .. i0+BLOCK_I) for row (o, d) = program_id(0): sum over NB batch rows
        b = o NB + n of the products below (see toeplitz_products)."""
        row = tl.program_id(0)
        o, d = row // D, row % D
        n_chunks = tl.cdiv(L, C)
        # heaviest tiles first: causal rows see all earlier chunks, anticausal ones all later chunks
        blk = tl.num_programs(1) - 1 - tl.program_id(1) if CAUSAL else tl.program_id(1)
        i0 = blk * BLOCK_I
        i = i0 + tl.arange(0, BLOCK_I)  # (BLOCK_I,) output chunks
        c = tl.arange(0, C)  # (C,) position in a chunk
        p, q = c[:, None], c[None, :]  # (C, 1) input, (1, C) output: the Toeplitz block's rows and columns
        t_out = i[:, None] * C + q  # (BLOCK_I, C)
        if CAUSAL:
            n_m = tl.minimum(i0 + BLOCK_I, n_chunks)  # block lags m reaching a source chunk >= 0
            lag_pq = q - p  # (C, C): lag of output q from input p within the block
        else:
            n_m = n_chunks - i0  # block lags m reaching a source chunk < n_chunks
            lag_pq = p - q
        acc = tl.zeros((BLOCK_I, C), dtype=tl.float32)
        for n in range(0, NB):
            b = (o * NB + n).to(tl.int64)
            x_row = x_ptr + b * sx_b + d.to(tl.int64) * sx_d
            h_row = h_ptr + b * sh_b + d.to(tl.int64) * sh_d
            for m in range(0, n_m):
                src = i - m if CAUSAL else i + m  # (BLOCK_I,) source chunks
                t_in = src[:, None] * C + c[None, :]  # (BLOCK_I, C)
                a = tl.load(x_row + t_in * sx_t, mask=(t_in >= 0) & (t_in < L), other=0.0)
                lag = m * C + lag_pq  # (C, C)
                hm = tl.load(h_row + lag * sh_t, mask=(lag >= 0) & (lag < L), other=0.0)  # the Toeplitz block
                acc = tl.dot(a, hm, acc)  # (BLOCK_I, C) += (BLOCK_I, C) @ (C, C), fp32 sums
        if HAS_BIAS:  # bias x, in fp32 (only with NB = 1: then b = o)
            x_row = x_ptr + o.to(tl.int64) * sx_b + d.to(tl.int64) * sx_d
            xt = tl.load(x_row + t_out * sx_t, mask=t_out < L, other=0.0).to(tl.float32)
            acc += tl.load(bias_ptr + d).to(tl.float32) * xt
        out_row = out_ptr + o.to(tl.int64) * so_b + d.to(tl.int64) * so_d
        tl.store(out_row + t_out * so_t, acc.to(out_ptr.dtype.element_ty), mask=t_out < L)


def toeplitz_products(x, h, bias, out, causal, tiles):
    """The kernel's one product, into `out` (returned): x (B, D, L); h (B, D, L), or (1, D, L) for a filter shared
    by the batch; out (B, D, L), or (1, D, L) to sum over the batch; bias (D,) or None (not with a batch sum).
      causal:     out[b, d, t] = sum_{s <= t} h[b, d, t - s] x[b, d, s]  (+ bias[d] x[b, d, t])
      anticausal: out[b, d, s] = sum_{t >= s} h[b, d, t - s] x[b, d, t]  (+ bias[d] x[b, d, s])
    Any strides (channels-first contiguous loads best); x and h in one dtype, sums in fp32, out in its own dtype.
    `tiles`: a TILES entry. The forward is (u, k, causal), du (g, k, anticausal), dk (g, u, anticausal, summed).
    Plain twins: hyena.fftconv (causal: its output, channels first), torch.autograd.grad (anticausal: fftconv's du,
    dk); held equal, in Triton's CPU interpreter, by
    tests/test_toeplitz.py::test_products_equal_the_fp64_convolution_and_its_gradients_in_fp32."""
    B, D, L = x.shape
    Bo = out.shape[0]
    if x.dtype != h.dtype or h.shape[0] not in (1, B) or Bo not in (1, B) or out.shape[1:] != x.shape[1:] \
            or h.shape[1:] != x.shape[1:] or (bias is not None and Bo != B):
        raise ValueError(f"toeplitz_products: x {tuple(x.shape)} {x.dtype}, h {tuple(h.shape)} {h.dtype}, "
                         f"out {tuple(out.shape)}, bias {'given' if bias is not None else 'none'}")
    C, rows = tiles["chunk"], tiles["rows"]
    sh_b = h.stride(0) if h.shape[0] > 1 else 0  # a shared filter: every batch row reads row 0
    grid = (Bo * D, triton.cdiv(triton.cdiv(L, C), rows))
    _toeplitz[grid](x, h, x if bias is None else bias, out, L, D, B // Bo, *x.stride(), sh_b, *h.stride()[1:],
                    *out.stride(), CAUSAL=causal, HAS_BIAS=bias is not None, C=C, BLOCK_I=rows,
                    num_warps=tiles["warps"], num_stages=tiles["stages"])
    return out


class ToeplitzConv(torch.autograd.Function):
    """hyena.fftconv as block-Toeplitz products (toeplitz_products) for bf16/fp16 activations u (B, L, D), the
    filter k (L, D) rounded to u's dtype, bias (D,); y in u's dtype, dk and dbias fp32. Saves channels-first
    copies of u and k for the backward:
      du = anticausal(g, k) + bias g,  dk = anticausal(g, u) summed over the batch,  dbias = dk[lag 0].
    Plain twin: hyena.fftconv (autograd's backward); held equal, in Triton's CPU interpreter, by
    tests/test_toeplitz.py::test_toeplitz_conv_equals_the_fp64_convolution_and_its_gradients."""

    @staticmethod
    def forward(ctx, u, k, bias):
        B, L, D = u.shape
        u_t = channels_first(u, L, u.dtype)  # (B, D, L)
        k_t = channels_first(k[None], L, u.dtype)  # (1, D, L), rounded to u's dtype
        y_t = toeplitz_products(u_t, k_t, bias, torch.empty_like(u_t), True, TILES["y"])  # (B, D, L)
        ctx.save_for_backward(u_t, k_t, bias)
        return y_t.transpose(1, 2).contiguous()  # (B, L, D)

    @staticmethod
    def backward(ctx, g):
        u_t, k_t, bias = ctx.saved_tensors
        B, D, L = u_t.shape
        g_t = channels_first(g, L, u_t.dtype)  # (B, D, L)
        du = dk = dbias = None
        if ctx.needs_input_grad[0]:
            du = toeplitz_products(g_t, k_t, bias, torch.empty_like(g_t), False, TILES["du"])
            du = du.transpose(1, 2).contiguous()  # (B, L, D)
        if ctx.needs_input_grad[1]:
            dk_t = toeplitz_products(g_t, u_t, None, g_t.new_empty(1, D, L, dtype=torch.float32), False,
                                     TILES["dk"])[0]  # (D, L)
            dk = dk_t.t()  # (L, D); autograd casts to k's dtype
            dbias = dk_t[:, 0].clone() if ctx.needs_input_grad[2] else None  # lag 0: sum_{b,t} g u
        elif ctx.needs_input_grad[2]:
            dbias = (g_t.float() * u_t.float()).sum((0, 2))  # (D,)
        return du, dk, dbias


def toeplitz_conv(u, k, bias):
    """hyena.fftconv (u (B, L, D), k (L, D), bias (D,)) by ToeplitzConv where the kernel serves (`available`:
    Triton, CUDA or its interpreter, bf16/fp16 u), else by FFTConv (fast.fftconv.fftconv): the same function,
    never another. At any length: the choice by length is long_conv's.
    Plain twin: hyena.fftconv; held equal, in Triton's CPU interpreter, by
    tests/test_toeplitz.py::test_toeplitz_conv_equals_the_fp64_convolution_and_its_gradients (the hand-over by
    tests/test_toeplitz.py::test_toeplitz_conv_hands_what_the_kernel_does_not_serve_to_fftconv)."""
    if not available(u):
        return fftconv(u, k, bias)
    with torch.autocast(u.device.type, enabled=False):
        return ToeplitzConv.apply(u, k, bias)


def long_conv(u, k, bias):
    """hyena.fftconv by the faster path for its length: toeplitz_conv up to TOEPLITZ_MAX_L positions (where its
    ~L^2 work on tensor cores should beat the FFT's passes over memory), FFTConv beyond. Not yet in fast.TWINS:
    the crossover waits for GPU measurements.
    Plain twin: hyena.fftconv; held equal by
    tests/test_toeplitz.py::test_toeplitz_conv_hands_what_the_kernel_does_not_serve_to_fftconv and
    tests/test_toeplitz.py::test_toeplitz_conv_equals_the_fp64_convolution_and_its_gradients."""
    return toeplitz_conv(u, k, bias) if u.shape[1] <= TOEPLITZ_MAX_L else fftconv(u, k, bias)
