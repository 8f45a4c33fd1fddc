"""Hyena's mixer between its projections at training lengths, fused around the block-Toeplitz convolution (issue 29).

The plain twin, hyena.mix, runs the short convolution as shifted multiply-adds, splits it, multiplies the gates and
(through fast.toeplitz.long_conv) transposes to and from the convolution's channels-first layout: each a pass over
(B, L, D) activations. Compiled, that elementwise work took about 4 ms of a 7.1 ms mixer forward and backward at 2k
where the convolution took 1.6 (one H100; docs/performance.md). Here, for order 2 (p = [x0 | x1 | v] before the
short convolution; h the long filter, D its skip term, o what out_proj takes):

  forward   _gate_in            z = v ⊙ x1, written channels first (B, D, L)
            fast::toeplitz_y    y = h * z + D z                                       (B, D, L)
            _gate_out           o = y ⊙ x0                                            (B, L, D)
  backward  _gate_in (GRAD)     dy = do ⊙ x0, channels first
            fast::toeplitz_du   dz = h^T * dy + D dy;  fast::toeplitz_dk: dh, and dD its lag 0
            _gate_back          g = (dx0, dx1, dv) = (do ⊙ y, dz ⊙ v, dz ⊙ x1) (B, L, 3D); the short convolution's
                                weight's and bias's gradients as sums per program
            _short_back         dp = the short convolution's transpose of g

Every kernel recomputes the gates it needs from p (K = 3 taps), so nothing but z and y is kept for the backward;
g costs a write and a read more than one fused pass, and keeps each kernel's registers few. The transposes happen
on chip: a tile loaded along one layout's contiguous axis is stored along the other's.

Precision, as the plain code under bf16 autocast: the short convolution's weight and bias rounded to p's dtype;
the gates, z, y, o, dy, dz and each gate's gradient rounded to p's dtype where the twin stores them; sums in fp32
(the twin rounds after each of the short convolution's taps, this code once).
"""
import torch

import hyena
import fast.toeplitz as toeplitz
from fast.fftconv import channels_first

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: hyena.mix serves
    triton = None

# Tiles: BL positions x BD channels a tile, Triton's num_warps; _gate_back (BACK_TILES) takes `seg` tiles of positions
# a program (its weight-gradient sums stay in registers), as many programs as fill the GPU 4 times over; the others
# take GATE_TILES. Fastest at L = 2048 (B 64) and 8192 (B 16), D = 512, on one H100: gate_in 0.24 ms, gate_out 0.17
# at 2k (results/gpu-logs-2026-12-07e/mixer.md); gate_back with short_back 0.96 (results/gpu-logs-2026-12-07h/).
GATE_TILES = dict(BL=32, BD=64, warps=4)
BACK_TILES = dict(BL=32, BD=64, warps=4)

if triton is not None:
    @triton.jit
    def _short_conv(p_row, t, c, L, s_t, w_ptr, wb_ptr, K: tl.constexpr):
        """The short convolution of channels c (BD,) of one batch row of p (p_row, channels contiguous) at positions
        t (BL,): b_c + sum_i w[c, i] p[t - (K-1) + i, c], in fp32, rounded to p's dtype as the twin stores it."""
        acc = tl.zeros((t.shape[0], c.shape[0]), tl.float32) + tl.load(wb_ptr + c).to(tl.float32)[None, :]
        for i in tl.static_range(K):
            s = t[:, None] - (K - 1) + i
            x = tl.load(p_row + s.to(tl.int64) * s_t + c[None, :], mask=(s >= 0) & (s < L), other=0.0)
            acc += x.to(tl.float32) * tl.load(w_ptr + c * K + i).to(tl.float32)[None, :]
        return acc.to(p_row.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _gate_in(a_ptr, p_ptr, w_ptr, wb_ptr, out_ptr, L, D, s_ab, s_at, s_pb, s_pt, s_ob, s_od, s_ot,
                 GRAD: tl.constexpr, K: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr):
        """out (B, D, L) channels first: z = v ⊙ x1 (GRAD False; a_ptr unused), or dy = a ⊙ x0 (GRAD: a = do,
        (B, L, D))."""
        t = tl.program_id(0) * BL + tl.arange(0, BL)
        c = tl.program_id(1) * BD + tl.arange(0, BD)
        b = tl.program_id(2).to(tl.int64)
        inside = (t[:, None] < L) & (c[None, :] < D)
        cc = tl.minimum(c, D - 1)  # channels past D read channel D - 1's weights; their results are not stored
        p_row = p_ptr + b * s_pb
        if GRAD:
            a = tl.load(a_ptr + b * s_ab + t[:, None].to(tl.int64) * s_at + c[None, :], mask=inside, other=0.0)
            x0 = _short_conv(p_row, t, cc, L, s_pt, w_ptr, wb_ptr, K)
            r = a.to(tl.float32) * x0
        else:
            x1 = _short_conv(p_row, t, cc + D, L, s_pt, w_ptr, wb_ptr, K)
            v = _short_conv(p_row, t, cc + 2 * D, L, s_pt, w_ptr, wb_ptr, K)
            r = x1 * v
        tl.store(out_ptr + b * s_ob + c[None, :].to(tl.int64) * s_od + t[:, None] * s_ot,
                 r.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _gate_out(y_ptr, p_ptr, w_ptr, wb_ptr, out_ptr, L, D, s_yb, s_yd, s_yt, s_pb, s_pt, s_ob, s_ot,
                  K: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr):
        """out (B, L, D) = y ⊙ x0, y (B, D, L) channels first."""
        t = tl.program_id(0) * BL + tl.arange(0, BL)
        c = tl.program_id(1) * BD + tl.arange(0, BD)
        b = tl.program_id(2).to(tl.int64)
        inside = (t[:, None] < L) & (c[None, :] < D)
        cc = tl.minimum(c, D - 1)
        y = tl.load(y_ptr + b * s_yb + c[None, :].to(tl.int64) * s_yd + t[:, None] * s_yt, mask=inside, other=0.0)
        x0 = _short_conv(p_ptr + b * s_pb, t, cc, L, s_pt, w_ptr, wb_ptr, K)
        tl.store(out_ptr + b * s_ob + t[:, None].to(tl.int64) * s_ot + c[None, :],
                 (y.to(tl.float32) * x0).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _gate_grads(go_ptr, y_ptr, dz_ptr, p_ptr, w_ptr, wb_ptr, b, s, c, cc, L, D, s_gb, s_gt, s_yb, s_yd, s_yt,
                    s_zb, s_zd, s_zt, s_pb, s_pt, K: tl.constexpr):
        """(dx0, dx1, dv) (BL, BD) each at positions s of batch row b, fp32 rounded as the twin stores them; zeros
        at positions past L and channels past D."""
        inside = (s[:, None] < L) & (c[None, :] < D)
        p_row = p_ptr + b * s_pb
        go = tl.load(go_ptr + b * s_gb + s[:, None].to(tl.int64) * s_gt + c[None, :], mask=inside, other=0.0)
        first = c[None, :].to(tl.int64) * s_yd + s[:, None] * s_yt
        y = tl.load(y_ptr + b * s_yb + first, mask=inside, other=0.0)
        dz = tl.load(dz_ptr + b * s_zb + c[None, :].to(tl.int64) * s_zd + s[:, None] * s_zt, mask=inside,
                     other=0.0).to(tl.float32)
        x1 = _short_conv(p_row, s, cc + D, L, s_pt, w_ptr, wb_ptr, K)
        v = _short_conv(p_row, s, cc + 2 * D, L, s_pt, w_ptr, wb_ptr, K)
        dtype = p_ptr.dtype.element_ty
        return ((go.to(tl.float32) * y.to(tl.float32)).to(dtype).to(tl.float32), (dz * v).to(dtype).to(tl.float32),
                (dz * x1).to(dtype).to(tl.float32))

    @triton.jit
    def _tap_sums(acc, dpc, p_row, t, c, L, s_t, K: tl.constexpr, KP: tl.constexpr):
        """acc (BD, KP) += sum over t of dpc (BL, BD) times p at t - (K-1) + i, into column i (the weight's
        gradient of tap i)."""
        col = tl.arange(0, KP)[None, :]
        for i in tl.static_range(K):
            s = t[:, None] - (K - 1) + i
            x = tl.load(p_row + s.to(tl.int64) * s_t + c[None, :], mask=(s >= 0) & (s < L), other=0.0)
            acc += tl.where(col == i, tl.sum(dpc * x.to(tl.float32), axis=0)[:, None], 0.0)
        return acc

    @triton.jit
    def _gate_back(go_ptr, y_ptr, dz_ptr, p_ptr, w_ptr, wb_ptr, dp_ptr, dw_ptr, dwb_ptr, L, D, n_seg, SEG,
                   s_gb, s_gt, s_yb, s_yd, s_yt, s_zb, s_zd, s_zt, s_pb, s_pt, s_db, s_dt,
                   K: tl.constexpr, KP: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr):
        """The gates' gradients (B, L, 3D) into dp_ptr and, for program row (b, seg), the weight's (3D, KP) and
        bias's (3D,) gradient sums over its SEG tiles of positions, into dw[b n_seg + seg], dwb[b n_seg + seg]."""
        seg = tl.program_id(0)
        c = tl.program_id(1) * BD + tl.arange(0, BD)
        b = tl.program_id(2).to(tl.int64)
        cc = tl.minimum(c, D - 1)
        cm = c < D
        p_row = p_ptr + b * s_pb
        acc0 = tl.zeros((BD, KP), tl.float32)
        acc1 = tl.zeros((BD, KP), tl.float32)
        acc2 = tl.zeros((BD, KP), tl.float32)
        db0 = tl.zeros((BD,), tl.float32)
        db1 = tl.zeros((BD,), tl.float32)
        db2 = tl.zeros((BD,), tl.float32)
        for it in range(SEG):
            t = (seg * SEG + it) * BL + tl.arange(0, BL)
            dx0, dx1, dv = _gate_grads(go_ptr, y_ptr, dz_ptr, p_ptr, w_ptr, wb_ptr, b, t, c, cc, L, D,
                                       s_gb, s_gt, s_yb, s_yd, s_yt, s_zb, s_zd, s_zt, s_pb, s_pt, K)
            acc0 = _tap_sums(acc0, dx0, p_row, t, cc, L, s_pt, K, KP)
            acc1 = _tap_sums(acc1, dx1, p_row, t, cc + D, L, s_pt, K, KP)
            acc2 = _tap_sums(acc2, dv, p_row, t, cc + 2 * D, L, s_pt, K, KP)
            db0 += tl.sum(dx0, axis=0)
            db1 += tl.sum(dx1, axis=0)
            db2 += tl.sum(dv, axis=0)
            out = dp_ptr + b * s_db + t[:, None].to(tl.int64) * s_dt + c[None, :]
            inside = (t[:, None] < L) & cm[None, :]
            tl.store(out, dx0.to(dp_ptr.dtype.element_ty), mask=inside)
            tl.store(out + D, dx1.to(dp_ptr.dtype.element_ty), mask=inside)
            tl.store(out + 2 * D, dv.to(dp_ptr.dtype.element_ty), mask=inside)
        row = b * n_seg + seg
        col = tl.arange(0, KP)[None, :]
        dw_row = dw_ptr + row * 3 * D * KP
        tl.store(dw_row + c[:, None] * KP + col, acc0, mask=cm[:, None])
        tl.store(dw_row + (c[:, None] + D) * KP + col, acc1, mask=cm[:, None])
        tl.store(dw_row + (c[:, None] + 2 * D) * KP + col, acc2, mask=cm[:, None])
        tl.store(dwb_ptr + row * 3 * D + c, db0, mask=cm)
        tl.store(dwb_ptr + row * 3 * D + D + c, db1, mask=cm)
        tl.store(dwb_ptr + row * 3 * D + 2 * D + c, db2, mask=cm)

    @triton.jit
    def _short_back(g_ptr, w_ptr, dp_ptr, L, C, s_b, s_t, K: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr):
        """dp[t, c] = sum_j w[c, K-1-j] g[t + j, c] over C channels, g and dp (B, L, C) alike."""
        t = tl.program_id(0) * BL + tl.arange(0, BL)
        c = tl.program_id(1) * BD + tl.arange(0, BD)
        b, cc = tl.program_id(2).to(tl.int64), tl.minimum(c, C - 1)
        acc = tl.zeros((BL, BD), tl.float32)
        for j in tl.static_range(K):
            s = t[:, None] + j
            g = tl.load(g_ptr + b * s_b + s.to(tl.int64) * s_t + c[None, :], mask=(s < L) & (c[None, :] < C),
                        other=0.0)
            acc += g.to(tl.float32) * tl.load(w_ptr + cc * K + K - 1 - j).to(tl.float32)[None, :]
        tl.store(dp_ptr + b * s_b + t[:, None].to(tl.int64) * s_t + c[None, :], acc.to(dp_ptr.dtype.element_ty),
                 mask=(t[:, None] < L) & (c[None, :] < C))


def _launch_shapes(p, w, wb, *rows):
    """(B, L, D) of p (B, L, 3D). The kernels index p and the (B, L, D) `rows` with channel stride 1, and the short
    filter's w (3D, K) and wb (3D,) contiguous, as GatedConv gives them: anything else is refused by name."""
    if any(t.stride(-1) != 1 for t in (p, *rows)) or not (w.is_contiguous() and wb.is_contiguous()):
        raise ValueError(f"fast.mixer: p {tuple(p.stride())} and (B, L, D) operands need channel stride 1, the short "
                         "filter's w (3D, K) and wb (3D,) contiguous")
    B, L, C = p.shape
    return B, L, C // 3


def _gate_in_launch(a, p, w, wb, grad):
    a = p if a is None else a  # (unread unless grad)
    B, L, D = _launch_shapes(p, w, wb, a)
    out = p.new_empty(B, D, L)
    tiles = GATE_TILES
    _gate_in[(triton.cdiv(L, tiles["BL"]), triton.cdiv(D, tiles["BD"]), B)](
        a, p, w, wb, out, L, D, a.stride(0), a.stride(1), p.stride(0), p.stride(1), *out.stride(), GRAD=grad,
        K=w.shape[1], BL=tiles["BL"], BD=tiles["BD"], num_warps=tiles["warps"])
    return out


# The kernels as custom ops: torch.compile sees each as one opaque call, shaped by its fake.
@torch.library.custom_op("fast::gate_in", mutates_args=())
def _gate_in_op(p: torch.Tensor, w: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    return _gate_in_launch(None, p, w, wb, False)  # z (B, D, L)


@torch.library.custom_op("fast::gate_grad", mutates_args=())
def _gate_grad_op(go: torch.Tensor, p: torch.Tensor, w: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    return _gate_in_launch(go, p, w, wb, True)  # dy (B, D, L)


@torch.library.custom_op("fast::gate_out", mutates_args=())
def _gate_out_op(y_t: torch.Tensor, p: torch.Tensor, w: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    B, L, D = _launch_shapes(p, w, wb)
    out = p.new_empty(B, L, D)
    tiles = GATE_TILES
    _gate_out[(triton.cdiv(L, tiles["BL"]), triton.cdiv(D, tiles["BD"]), B)](
        y_t, p, w, wb, out, L, D, *y_t.stride(), p.stride(0), p.stride(1), out.stride(0), out.stride(1),
        K=w.shape[1], BL=tiles["BL"], BD=tiles["BD"], num_warps=tiles["warps"])
    return out  # o (B, L, D)


@torch.library.custom_op("fast::gate_back", mutates_args=())
def _gate_back_op(go: torch.Tensor, y_t: torch.Tensor, dz_t: torch.Tensor, p: torch.Tensor, w: torch.Tensor,
                  wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, L, D = _launch_shapes(p, w, wb, go)
    K, tiles = w.shape[1], BACK_TILES
    n_d, n_tiles = triton.cdiv(D, tiles["BD"]), triton.cdiv(L, tiles["BL"])
    sms = torch.cuda.get_device_properties(p.device).multi_processor_count if p.is_cuda else 1
    seg = triton.cdiv(n_tiles, max(1, min(n_tiles, 4 * sms // (B * n_d))))  # tiles a program: 4 programs an SM
    n_seg = triton.cdiv(n_tiles, seg)
    KP = triton.next_power_of_2(K)
    dpc, dp = torch.empty_like(p), torch.empty_like(p)
    dw = p.new_empty(B * n_seg, 3 * D, KP, dtype=torch.float32)
    dwb = p.new_empty(B * n_seg, 3 * D, dtype=torch.float32)
    _gate_back[(n_seg, n_d, B)](
        go, y_t, dz_t, p, w, wb, dpc, dw, dwb, L, D, n_seg, seg, go.stride(0), go.stride(1), *y_t.stride(),
        *dz_t.stride(), p.stride(0), p.stride(1), dpc.stride(0), dpc.stride(1), K=K, KP=KP, BL=tiles["BL"],
        BD=tiles["BD"], num_warps=tiles["warps"])
    _short_back[(triton.cdiv(L, GATE_TILES["BL"]), triton.cdiv(3 * D, GATE_TILES["BD"]), B)](
        dpc, w, dp, L, 3 * D, dp.stride(0), dp.stride(1), K=K, BL=GATE_TILES["BL"], BD=GATE_TILES["BD"],
        num_warps=GATE_TILES["warps"])
    return dp, dw.sum(0)[:, :K].to(w.dtype).contiguous(), dwb.sum(0).to(wb.dtype)


@_gate_in_op.register_fake
def _(p, w, wb):
    B, L, C = p.shape
    return p.new_empty(B, C // 3, L)


@_gate_grad_op.register_fake
def _(go, p, w, wb):
    B, L, C = p.shape
    return p.new_empty(B, C // 3, L)


@_gate_out_op.register_fake
def _(y_t, p, w, wb):
    B, L, C = p.shape
    return p.new_empty(B, L, C // 3)


@_gate_back_op.register_fake
def _(go, y_t, dz_t, p, w, wb):
    return torch.empty_like(p), w.new_empty(w.shape), wb.new_empty(wb.shape)


class GatedConv(torch.autograd.Function):
    """hyena.mix for order 2 with hyena.fftconv's long convolution: three Triton kernels forward and five backward
    (the module's docstring), besides the filter's channels-first and shifted copies. p (B, L, 3D) bf16/fp16, the
    short convolution's w (3D, K) and wb (3D,) in p's dtype, the long filter k (L, D) (rounded to p's dtype, as
    fast.toeplitz rounds it) and bias (D,). Returns o (B, L, D) and the long convolution's input z channels first
    (B, D, L); z's gradient, where one comes, joins the convolution's.
    Plain twin: hyena.mix; held equal, in Triton's CPU interpreter, by
    tests/test_mixer.py::test_fused_mixer_equals_the_fp64_mixer_and_its_gradients."""

    @staticmethod
    def forward(ctx, p, w, wb, k, bias):
        L = p.shape[1]
        k_t = channels_first(k[None], L, p.dtype)[0]  # (D, L)
        z_t = _gate_in_op(p, w, wb)  # (B, D, L)
        y_t = toeplitz._y_op(z_t, k_t, bias)  # (B, D, L)
        ctx.save_for_backward(p, w, wb, k_t, bias, z_t, y_t)
        ctx.set_materialize_grads(False)
        return _gate_out_op(y_t, p, w, wb), z_t

    @staticmethod
    def backward(ctx, go, gz):
        p, w, wb, k_t, bias, z_t, y_t = ctx.saved_tensors
        dp = dw = dwb = dk = dbias = None
        o_used = go is not None  # (o unused: its gradient is zero, and so is x0's)
        go = go.contiguous() if o_used else p.new_zeros(p.shape[0], p.shape[1], p.shape[2] // 3)
        dy_t = _gate_grad_op(go, p, w, wb) if o_used else None  # (B, D, L)
        if any(ctx.needs_input_grad[:3]):
            dz_t = gz if dy_t is None else toeplitz._du_op(dy_t, k_t, bias)  # (B, D, L)
            if gz is not None and dy_t is not None:
                dz_t = dz_t + gz
            dp, dw, dwb = _gate_back_op(go, y_t, dz_t, p, w, wb)
        if dy_t is not None and ctx.needs_input_grad[3]:
            dk_t = toeplitz._dk_op(dy_t, z_t)  # (D, L) fp32
            dk, dbias = dk_t.t(), dk_t[:, 0].clone()  # lag 0: sum_{b,t} dy z
        elif dy_t is not None and ctx.needs_input_grad[4]:
            dbias = (dy_t.float() * z_t.float()).sum((0, 2))  # (D,)
        return dp, dw, dwb, dk, dbias


def serves(op, p):
    """Whether `mix` runs the fused kernels for this layer and input: order 2; the long convolution hyena.fftconv's
    function (plain or fast.toeplitz.long_conv); where fast.toeplitz serves (Triton, CUDA or its interpreter, bf16
    or fp16 p) and up to its TOEPLITZ_MAX_L positions."""
    return (triton is not None and op.order == 2 and op.long_conv in (hyena.fftconv, toeplitz.long_conv)
            and toeplitz.available(p) and 0 < p.shape[1] <= toeplitz.TOEPLITZ_MAX_L)


def mix(op, p, k, bias):
    """hyena.mix (p (B, L, 3D), k (>= L, 1, D), bias (1, D) -> (x0 ⊙ v (B, L, D), [z (B, L, D)])) by GatedConv
    where `serves`; elsewhere hyena.mix itself. fast.install puts it in a HyenaOperator's `mix`.
    Plain twin: hyena.mix; held equal, in Triton's CPU interpreter, by
    tests/test_mixer.py::test_fused_mixer_equals_the_fp64_mixer_and_its_gradients (the hand-over by
    tests/test_mixer.py::test_mix_hands_what_the_kernels_do_not_serve_to_the_plain_mixer)."""
    if not serves(op, p):
        return hyena.mix(op, p, k, bias)
    L = p.shape[1]
    with torch.autocast(p.device.type, enabled=False):
        w = op.short_filter.weight[:, 0].to(p.dtype)  # (3D, K), rounded as hyena.short_conv rounds it
        wb = op.short_filter.bias.to(p.dtype)
        o, z_t = GatedConv.apply(p if p.stride(-1) == 1 else p.contiguous(), w.contiguous(), wb, k[:L, 0], bias[0])
    return o, [z_t.transpose(1, 2)]
