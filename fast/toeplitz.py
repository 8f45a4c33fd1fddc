"""The Hyena long convolution at training lengths as block-Toeplitz products on tensor cores (issue 29).

For one channel the causal convolution of all B batch rows is one matrix product, Y (B, L) = U (B, L) @ T (L, L),
T the upper-triangular Toeplitz matrix of the filter (T[s, t] = k[t - s]); the backward is du = G @ T^T and
dk[l] = sum_b sum_t g[b, t] u[b, t - l]; dbias = sum g u is dk's lag 0. About B L^2 / 2 multiply-adds per channel
and product, on tensor cores in bf16/fp16 with fp32 sums, where the FFT does ~B L log L work in several passes
over memory (measured: bench/bench.py's conv section; the kernels won at every length timed, up to TOEPLITZ_MAX_L).

y and du (`toeplitz_products`, kernel _toeplitz): the filter is the same for every batch row, so a program takes
one channel, `batch` batch rows and `rows` output spans of `width` positions, and stacks the (batch row, span)
pairs on the dot's M: for each input chunk of `chunk` positions it multiplies the chunks (M, chunk) by ONE
Toeplitz block (chunk, width) of the filter, loaded once and used by all M rows. Why this orientation (rows of
(batch, span) on M, positions on N) and not the block's transpose on M with the batch on N: M is the side that
must grow to share the block, and stacking gives any multiple of 64 at any B (B = 16 at L = 8192 takes 8 spans);
the streamed operand (the activations) is then a K-contiguous tile, and the result rows store contiguously along
time. Few spans per program keep the causal waste small: rows of one program share the loop over input chunks,
which runs to the latest row's need (~ rows * width / L of extra work, plus the diagonal block's masked half,
~ width / L); chunks wholly before time 0 (after L) are never visited. Row p of a Toeplitz block is a window of
the filter starting at lag m C + const - p; `vec` shifted copies of the filter, zero-padded on both sides
(`_shifted_filter`), let every row start at a multiple of vec elements (16-byte loads, async copies) and need no
mask.

dk (`batch_correlation`, kernel _correlation): no filter is shared, but u and g are both plain data. A program takes
one channel and `width` lags blk W .. blk W + W - 1; its dot's K runs over (batch row b, chunk a) pairs, `rows` a
step, with A^T = u's chunk a (C positions p on M) and B = g from position a C + blk W on (W offsets e on N): every
operand row is an aligned contiguous load, the sum over the batch is the dot's own, and no pair is masked out by
causality. The product's (p, e) entry holds lag blk W + e - p: the epilogue sums its diagonals into W + C - 1 lags
(through a scratch slot of the program's own: tl.gather does it in registers but spills), and the first C - 1 (the
previous block's last lags) are added there outside the kernel. The programs are persistent (4 per SM), so that the
slots are few; each takes (block, channel) items in turn, heaviest first.

Precision: the filter is rounded to u's dtype (tensor cores multiply like types), where FFTConv keeps it fp32;
products of bf16/fp16 values are exact in fp32, sums are fp32, bias u is added in fp32. `toeplitz_conv` serves
where `available` (Triton; CUDA or its interpreter; bf16/fp16 activations); elsewhere it hands the call to
FFTConv (fast.fftconv.fftconv), the same function. `long_conv` picks by length (TOEPLITZ_MAX_L).
"""
import os

import torch

from fast.fftconv import channels_first, fftconv

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: FFTConv serves
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read once: torch.compile then sees a constant
# long_conv's hand-over to FFTConv: the longest length timed. The kernels alone win at every length timed up to it
# (one H100, fwd+bwd, B L = 128k, D = 512: 3.61 ms against FFTConv's 8.48 at 2k, 7.65 against 8.97 at 8k;
# results/bench/); where they stop winning is not measured, and the compiled mixer at 8k ties either way.
TOEPLITZ_MAX_L = 8192
# Tiles per product: the fastest of TILE_SWEEP at 2k and at 8k on one H100 (python bench/bench.py --only conv
# --conv-tiles; results/bench/): y and du 0.444 ms at 2k (309 TFLOP/s useful), dk 0.822 ms (167 TFLOP/s).
# y, du: chunk C (the dot's K), width W (N: output positions a program owns per span), rows x batch (M: spans x
# batch rows per program; where B < batch, batch drops to B's next power of two and rows grow to keep M), vec
# (filter copies: a Toeplitz row starts at a multiple of vec). dk: chunk C (M), width W (N: lags per program),
# rows (K: (batch row, chunk) pairs per step). warps, stages: Triton's num_warps, num_stages.
TILES = {"y": dict(chunk=64, width=128, rows=4, batch=64, vec=8, warps=8, stages=3),   # causal, filter k
         "du": dict(chunk=64, width=128, rows=4, batch=64, vec=8, warps=8, stages=3),  # anticausal, filter k
         "dk": dict(chunk=64, width=128, rows=32, warps=4, stages=3)}                  # g against u, batch summed
# Candidates worth timing on an H100 (reasoning: wgmma takes M in multiples of 64 per warpgroup, N 8..256, K in
# 16s; a dot's operands sit in shared memory, stages x (M K + K N) x 2 bytes of the 227 KB a block may use; the
# streamed operand's L2 traffic per FLOP falls as 1 / N (the filter is a few KB per channel, cached), so N = 128
# or 256; the Toeplitz block is loaded once per M rows, so M >= 128; the accumulator, M N / (32 x warps) fp32
# registers a thread, must leave room: M N <= 128 x 256 at 8 warps). Each compiles for sm_90 with no register
# spills (triton.compile for an H100 target runs on a CPU); which is fastest is for the GPU.
TILE_SWEEP = {p: [{**TILES[p], "rows": 2},                                # the classic 128 x 128 x 64 tile
                  {**TILES[p], "rows": 1, "warps": 4},                    # M = 64: one warpgroup, twice the programs
                  {**TILES[p], "rows": 2, "width": 256},                  # N = 256: half the L2 traffic per FLOP
                  {**TILES[p], "rows": 2, "chunk": 128, "stages": 2},     # K = 128 a step, fewer steps
                  {**TILES[p], "rows": 2, "chunk": 32, "stages": 4},      # K = 32, deeper pipeline
                  dict(TILES[p]),                                         # M = 256: the block shared by more rows
                  {**TILES[p], "rows": 2, "width": 64, "warps": 4, "stages": 4}]  # less diagonal waste, small tiles
              for p in ("y", "du")}
TILE_SWEEP["dk"] = [dict(TILES["dk"]),                                    # M = 64, N = 128, K = 32
                    {**TILES["dk"], "rows": 64},                          # K = 64 a step
                    {**TILES["dk"], "rows": 16, "stages": 4},             # K = 16: wgmma's least, deeper pipeline
                    dict(chunk=128, width=128, rows=32, warps=8, stages=3),  # M = 128: the tile of a GEMM
                    dict(chunk=64, width=256, rows=32, warps=8, stages=3),   # N = 256
                    dict(chunk=128, width=256, rows=32, warps=8, stages=2),  # 128 x 256 with 2 stages
                    dict(chunk=64, width=64, rows=32, warps=4, stages=4)]    # small tiles, more programs


def available(u):
    """Whether the kernel serves activations u: Triton installed, on CUDA (or in Triton's interpreter, for tests),
    in bf16 or fp16 (tensor cores' inputs; fp32 and fp64 keep FFTConv's precision)."""
    return triton is not None and u.dtype in (torch.bfloat16, torch.float16) and (u.is_cuda or INTERPRETED)


if triton is not None:
    @triton.jit
    def _toeplitz(x_ptr, kh_ptr, bias_ptr, out_ptr, B, L, sx_b, sx_d, sx_t, sk_v, sk_d, so_b, so_d, so_t,
                  CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, C: tl.constexpr, W: tl.constexpr,
                  BI: tl.constexpr, BB: tl.constexpr, VEC: tl.constexpr, Z: tl.constexpr):
        """out[b, d, t] for batch rows b of block program_id(0), spans i of block program_id(1) (t in
        [i W, i W + W)), channel d = program_id(2); see toeplitz_products."""
        d = tl.program_id(2).to(tl.int64)
        n_spans = tl.cdiv(L, W)
        # heaviest programs first: a causal span sees all earlier positions, an anticausal one all later ones
        i0 = (tl.num_programs(1) - 1 - tl.program_id(1) if CAUSAL else tl.program_id(1)) * BI
        r = tl.arange(0, BB * BI)  # the dot's rows: (batch row, span) pairs, span fastest
        b, i = tl.program_id(0) * BB + r // BI, i0 + r % BI  # (M,) each
        rows_ok = (b < B) & (i < n_spans)
        x_rows = x_ptr + b.to(tl.int64) * sx_b + d * sx_d  # (M,)
        p, q = tl.arange(0, C), tl.arange(0, W)  # input position in a chunk, output position in a span
        kh = kh_ptr + d * sk_d  # filter copies: kh[v, d, j] = k[d, j - Z - v], zero outside [0, L)
        if CAUSAL:  # step m: input chunk i W + W - (m + 1) C + p, block T[p, q] = k[(m + 1) C - W + q - p]
            s0 = i * W + W - C  # (M,) input chunk at m = 0
            n_m = tl.cdiv(tl.minimum(i0 + BI, n_spans) * W, C)  # until the latest row's chunk passes time 0
            # row p from copy v = p % VEC, so that it starts at a multiple of VEC: (C, W) offsets at m = 0
            t_off = (p % VEC)[:, None] * sk_v + (Z + C - W - VEC * (p // VEC))[:, None] + q[None, :]
        else:  # step m: input chunk i W + m C + p, block T[p, q] = k[m C + p - q], loaded transposed (W, C)
            s0 = i * W
            n_m = tl.cdiv(L - i0 * W, C)  # until the earliest row's chunk passes L
            t_off = (q % VEC)[:, None] * sk_v + (Z - VEC * (q // VEC))[:, None] + p[None, :]
        acc = tl.zeros((BB * BI, W), dtype=tl.float32)
        for m in range(0, n_m):
            s = s0[:, None] + (-m * C if CAUSAL else m * C) + p[None, :]  # (M, C) input positions
            a = tl.load(x_rows[:, None] + s * sx_t, mask=rows_ok[:, None] & (s >= 0) & (s < L), other=0.0)
            t = tl.load(kh + t_off + m * C)  # the Toeplitz block, shared by all M rows
            acc = tl.dot(a, t if CAUSAL else tl.trans(t), acc)  # (M, W) += (M, C) @ (C, W), fp32 sums
        t_out = i[:, None] * W + q[None, :]  # (M, W) output positions
        ok = rows_ok[:, None] & (t_out < L)
        if HAS_BIAS:  # bias x, in fp32
            xt = tl.load(x_rows[:, None] + t_out * sx_t, mask=ok, other=0.0).to(tl.float32)
            acc += tl.load(bias_ptr + d).to(tl.float32) * xt
        out_rows = out_ptr + b.to(tl.int64) * so_b + d * so_d
        tl.store(out_rows[:, None] + t_out * so_t, acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _correlation(g_ptr, u_ptr, out_ptr, scratch_ptr, B, L, D, sg_b, sg_d, sg_t, su_b, su_d, su_t, so_d, so_j,
                     C: tl.constexpr, W: tl.constexpr, K: tl.constexpr, R: tl.constexpr):
        """out[d, blk, r] = sum over b, a, p, e with e - p = r - (C - 1) of u[b, d, a C + p] g[b, d, a C + blk W + e]
        (e in [0, W)), for every lag block blk and channel d, items taken in turn by the programs (heaviest blocks
        first), each program skewing its items through its own scratch slot (C, W); see batch_correlation."""
        n_blk = tl.cdiv(L, W)
        p, e, k, r = tl.arange(0, C), tl.arange(0, W), tl.arange(0, K), tl.arange(0, R)
        slot = scratch_ptr + tl.program_id(0).to(tl.int64) * (C * W) + p[:, None] * W  # (C, 1) row starts
        col = r[None, :] - (C - 1) + p[:, None]  # (C, R): the entry of row p on diagonal r
        for item in range(tl.program_id(0), n_blk * D, tl.num_programs(0)):
            blk, d = item // D, (item % D).to(tl.int64)
            n_a = tl.cdiv(L - blk * W, C)  # chunks a of u whose partner in g starts before L
            acc = tl.zeros((C, W), dtype=tl.float32)
            for j in range(0, tl.cdiv(B * n_a, K)):  # K (batch row, chunk) pairs a step: the dot sums the batch too
                pair = j * K + k
                b, a = pair // n_a, pair % n_a  # (K,)
                su = a[:, None] * C + p[None, :]  # (K, C) positions in u
                uk = tl.load(u_ptr + b[:, None].to(tl.int64) * su_b + d * su_d + su * su_t,
                             mask=(b[:, None] < B) & (su < L), other=0.0)
                sg = a[:, None] * C + blk * W + e[None, :]  # (K, W) positions in g
                gk = tl.load(g_ptr + b[:, None].to(tl.int64) * sg_b + d * sg_d + sg * sg_t,
                             mask=(b[:, None] < B) & (sg < L), other=0.0)
                acc = tl.dot(tl.trans(uk), gk, acc)  # (C, W) += (C, K) @ (K, W): entry (p, e) is lag blk W + e - p
            # the diagonal sums, through the slot (a register tile cannot shift its rows; tl.gather spills)
            tl.store(slot + e[None, :], acc)
            tl.debug_barrier()  # the slot written by all threads before any reads it skewed
            skewed = tl.load(slot + col, mask=(col >= 0) & (col < W), other=0.0)  # (C, R): row p shifted by p
            tl.store(out_ptr + d * so_d + blk * so_j + r, tl.sum(skewed, axis=0), mask=r < W + C - 1)
            tl.debug_barrier()  # the slot read by all threads before the next item overwrites it


def _shifted_filter(k, vec, margin, length):
    """(vec, D, length) copies of the filter k (D, L): copy v holds k[d, j - margin - v] at j, zeros elsewhere, so
    that a window of k starting anywhere (margin before 0 at most) is one starting at a multiple of vec in some
    copy, and lags outside [0, L) read zeros."""
    D, L = k.shape
    kh = k.new_zeros(vec, D, length)
    for v in range(vec):
        kh[v, :, margin + v:margin + v + L] = k
    return kh


def toeplitz_products(x, k, bias, out, causal, tiles):
    """The filter products, into `out` (returned): x (B, D, L), k (D, L) in x's dtype (one filter for the batch),
    out (B, D, L) in any dtype, bias (D,) or None:
      causal:     out[b, d, t] = sum_{s <= t} k[d, t - s] x[b, d, s]  (+ bias[d] x[b, d, t])
      anticausal: out[b, d, s] = sum_{t >= s} k[d, t - s] x[b, d, t]  (+ bias[d] x[b, d, s])
    Any strides (channels-first contiguous loads best); sums in fp32. The forward is (u, k, causal), du (g, k,
    anticausal). `tiles`: a TILES entry ("y" or "du").
    Plain twins: hyena.fftconv (causal: its output, channels first), torch.autograd.grad (anticausal: fftconv's du);
    held equal, in Triton's CPU interpreter, by
    tests/test_toeplitz.py::test_products_equal_the_fp64_convolution_and_its_gradients_in_fp32."""
    B, D, L = x.shape
    if x.dtype != k.dtype or k.shape != (D, L) or out.shape != x.shape or (bias is not None and bias.shape != (D,)):
        raise ValueError(f"toeplitz_products: x {tuple(x.shape)} {x.dtype}, k {tuple(k.shape)} {k.dtype}, "
                         f"out {tuple(out.shape)}, bias {None if bias is None else tuple(bias.shape)}")
    C, W, vec = tiles["chunk"], tiles["width"], tiles["vec"]
    if W % C or C % vec or vec % 8:
        raise ValueError(f"toeplitz_products: tiles {tiles}: width must be a multiple of chunk, chunk of vec, vec of 8 "
                         "(16-byte rows: vec=1 faulted with a misaligned address on an H100, Triton 3.6)")
    batch = min(tiles["batch"], triton.next_power_of_2(B))
    rows = tiles["rows"] * tiles["batch"] // batch  # the dot's M kept where B is smaller than batch
    n_spans = triton.cdiv(L, W)
    # margin W: lags down to 1 - W read zeros; length: lags up to n_spans W + vec, rounded for aligned rows
    kh = _shifted_filter(k, vec, W, (W + n_spans * W + vec + 63) // 64 * 64)
    grid = (triton.cdiv(B, batch), triton.cdiv(n_spans, rows), D)
    _toeplitz[grid](x, kh, x if bias is None else bias, out, B, L, *x.stride(), kh.stride(0), kh.stride(1),
                    *out.stride(), CAUSAL=causal, HAS_BIAS=bias is not None, C=C, W=W, BI=rows, BB=batch, VEC=vec,
                    Z=W, num_warps=tiles["warps"], num_stages=tiles["stages"])
    return out


def batch_correlation(g, u, tiles):
    """dk (D, L) fp32: dk[d, l] = sum_b sum_{t >= l} g[b, d, t] u[b, d, t - l], for g, u (B, D, L) of one dtype,
    any strides; sums in fp32. `tiles`: TILES["dk"] (chunk <= width).
    Plain twin: torch.autograd.grad (fftconv's dk); held equal, in Triton's CPU interpreter, by
    tests/test_toeplitz.py::test_products_equal_the_fp64_convolution_and_its_gradients_in_fp32."""
    B, D, L = g.shape
    if u.shape != g.shape or u.dtype != g.dtype:
        raise ValueError(f"batch_correlation: g {tuple(g.shape)} {g.dtype}, u {tuple(u.shape)} {u.dtype}")
    C, W = tiles["chunk"], tiles["width"]
    if C > W:
        raise ValueError(f"batch_correlation: tiles {tiles}: chunk must not exceed width")
    n_blk = triton.cdiv(L, W)
    part = g.new_empty(D, n_blk, triton.next_power_of_2(W + C - 1), dtype=torch.float32)  # lags blk W - C + 1 + r
    # persistent programs, 4 per SM (4 in all off CUDA), each with its own scratch slot
    sms = torch.cuda.get_device_properties(g.device).multi_processor_count if g.is_cuda else 1
    programs = min(n_blk * D, 4 * sms)
    scratch = g.new_empty(programs, C, W, dtype=torch.float32)
    _correlation[(programs,)](g, u, part, scratch, B, L, D, *g.stride(), *u.stride(), part.stride(0), part.stride(1),
                              C=C, W=W, K=tiles["rows"], R=part.shape[2], num_warps=tiles["warps"],
                              num_stages=tiles["stages"])
    dk = part[:, :, C - 1:C - 1 + W].clone()  # lags blk W .. blk W + W - 1
    dk[:, :-1, W - C + 1:] += part[:, 1:, :C - 1]  # a block's first C - 1 diagonals: the previous block's last lags
    return dk.view(D, n_blk * W)[:, :L]  # block 0's first C - 1 (lags < 0) dropped


# The kernels as custom ops: torch.compile sees each as one opaque call (its shape from the fake) and does not trace
# the launch code; the tiles are read from TILES when the op runs.
@torch.library.custom_op("fast::toeplitz_y", mutates_args=())
def _y_op(u_t: torch.Tensor, k_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return toeplitz_products(u_t, k_t, bias, torch.empty_like(u_t), True, TILES["y"])  # (B, D, L)


@torch.library.custom_op("fast::toeplitz_du", mutates_args=())
def _du_op(g_t: torch.Tensor, k_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return toeplitz_products(g_t, k_t, bias, torch.empty_like(g_t), False, TILES["du"])  # (B, D, L)


@torch.library.custom_op("fast::toeplitz_dk", mutates_args=())
def _dk_op(g_t: torch.Tensor, u_t: torch.Tensor) -> torch.Tensor:
    return batch_correlation(g_t, u_t, TILES["dk"]).contiguous()  # (D, L) fp32


@_y_op.register_fake
def _(u_t, k_t, bias):
    return torch.empty_like(u_t)


@_du_op.register_fake
def _(g_t, k_t, bias):
    return torch.empty_like(g_t)


@_dk_op.register_fake
def _(g_t, u_t):
    return g_t.new_empty(g_t.shape[1:], dtype=torch.float32)


class ToeplitzConv(torch.autograd.Function):
    """hyena.fftconv as block-Toeplitz products (toeplitz_products, batch_correlation) for bf16/fp16 activations
    u (B, L, D), the filter k (L, D) rounded to u's dtype, bias (D,); y in u's dtype, dk and dbias fp32. Saves
    channels-first copies of u and k for the backward:
      du = anticausal(g, k) + bias g,  dk = batch_correlation(g, u),  dbias = dk[lag 0].
    Plain twin: hyena.fftconv (autograd's backward); held equal, in Triton's CPU interpreter, by
    tests/test_toeplitz.py::test_toeplitz_conv_equals_the_fp64_convolution_and_its_gradients."""

    @staticmethod
    def forward(ctx, u, k, bias):
        B, L, D = u.shape
        u_t = channels_first(u, L, u.dtype)  # (B, D, L)
        k_t = channels_first(k[None], L, u.dtype)[0]  # (D, L), rounded to u's dtype
        y_t = _y_op(u_t, k_t, bias)  # (B, D, L)
        ctx.save_for_backward(u_t, k_t, bias)
        return y_t.transpose(1, 2).contiguous()  # (B, L, D)

    @staticmethod
    def backward(ctx, g):
        u_t, k_t, bias = ctx.saved_tensors
        B, D, L = u_t.shape
        g_t = channels_first(g, L, u_t.dtype)  # (B, D, L)
        du = dk = dbias = None
        if ctx.needs_input_grad[0]:
            du = _du_op(g_t, k_t, bias).transpose(1, 2).contiguous()  # (B, L, D)
        if ctx.needs_input_grad[1]:
            dk_t = _dk_op(g_t, u_t)  # (D, L)
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
    """hyena.fftconv by the faster path for its length: toeplitz_conv up to TOEPLITZ_MAX_L positions, FFTConv
    beyond (and wherever the kernels do not serve: the CPU, fp32). fast.install puts it in a HyenaOperator's
    `long_conv`; the timings behind the choice: bench/bench.py's conv section (docs/performance.md).
    Plain twin: hyena.fftconv; held equal by
    tests/test_toeplitz.py::test_toeplitz_conv_hands_what_the_kernel_does_not_serve_to_fftconv and
    tests/test_toeplitz.py::test_toeplitz_conv_equals_the_fp64_convolution_and_its_gradients."""
    return toeplitz_conv(u, k, bias) if u.shape[1] <= TOEPLITZ_MAX_L else fftconv(u, k, bias)
