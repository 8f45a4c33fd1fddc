"""Fast cached decoding on CUDA: Triton kernels for a Hyena layer's step (its long convolution; a modal layer's
whole step between its projections) and for a modal prefill's state.

The kernel computes a Hyena long convolution's output for the token being decoded,

    y[b, d] = sum_{s <= pos} z[b, d, s] * k[pos - s, d]

Its plain twin is hyena.history_conv (plain PyTorch), whose static shapes force it to touch the whole cache (T
positions) plus a gathered copy of the filter window on every step. The kernel reads the position from device
memory and loops only over s <= pos: O(pos D) bytes, no copy, and still capturable in a CUDA graph (its shapes
never change). The test
    tests/test_hyena_operator.py::test_decode_kernel_equals_the_definition_in_tritons_interpreter
holds the two equal in Triton's CPU interpreter (where Triton is installed), bench/bench.py's check section on
the GPU. fast.install puts `long_conv_step` in a HyenaFilter's place of history_conv.

`prefill_state` computes a modal student's recurrence states after the prompt (modal/fit.py's prefill_state, its plain
twin) by a chunked scan that reads the prompt's activations once, in place. `mix_step` runs a modal layer's decoding
step between its projections (hyena.mix_step: short conv, recurrences, gates) as one kernel.

A whole step in few kernels, and its CUDA graph, are fast/step.py's.

Each twin serves where its kernel can (`available`: CUDA, or Triton's interpreter for tests) and hands anything
else to its plain twin, so an installed model runs on any device.
"""
import os

import torch

import hyena
from hyena import history_conv
from modal import fit
from modal.student import ModalState

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path serves
    triton = None

BLOCK_D, BLOCK_S = 4, 512  # a tile: 4 channels x 512 positions
PROGRAMS = 1024  # enough tiles in flight to fill a large GPU's SMs: short batches split the positions too


def available(t):
    """Whether the kernel serves tensor t: on CUDA (or in the Triton interpreter, for tests), and not for fp64,
    which the kernel would sum in fp32 (the PyTorch path keeps it fp64)."""
    return (triton is not None and t.dtype != torch.float64
            and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))


if triton is not None:
    @triton.jit
    def _long_conv_step(z_ptr, k_ptr, pos_ptr, out_ptr, B, D, T, k_stride, chunk,
                        BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        """Partial sums over positions [split*chunk, (split+1)*chunk) ∩ [0, pos] into out[split, b, d]."""
        b, split = tl.program_id(0), tl.program_id(2)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) channels
        pos = tl.load(pos_ptr)
        start, end = split * chunk, tl.minimum(split * chunk + chunk, pos + 1)  # this program's positions
        rows = (b * D + d).to(tl.int64)[:, None] * T  # (BLOCK_D, 1) start of each channel's history
        krow = d.to(tl.int64)[:, None] * k_stride  # reversed filter row: k_rev[d, T-1-j] = k[j, d]
        acc = tl.zeros((BLOCK_D, BLOCK_S), dtype=tl.float32)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)  # (BLOCK_S,) history positions
            m = (d < D)[:, None] & (s < end)[None, :]
            z = tl.load(z_ptr + rows + s[None, :], mask=m, other=0.0)  # z[b, d, s]
            k = tl.load(k_ptr + krow + (T - 1 - pos + s)[None, :], mask=m, other=0.0)  # k[pos - s, d]
            acc += z.to(tl.float32) * k.to(tl.float32)
        tl.store(out_ptr + (split * B + b) * D + d, tl.sum(acc, axis=1), mask=d < D)

    @triton.jit
    def _chunk_states(z_ptr, lr_ptr, li_ptr, out_ptr, L, C, chunk, n_chunks, DM: tl.constexpr, BLOCK_C: tl.constexpr):
        """The recurrence s = lambda s + z_t over positions [j*chunk, (j+1)*chunk) ∩ [0, L) from s = 0, for BLOCK_C
        channels of one sequence: out[b, j, c] = (Re s, Im s) after the chunk's last position."""
        b, j = tl.program_id(0), tl.program_id(1)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,) channels
        n = tl.arange(0, DM)  # (DM,) modes (padded to a power of 2 with lambda = 0)
        mc = c < C
        lr = tl.load(lr_ptr + c[:, None] * DM + n[None, :], mask=mc[:, None], other=0.0)  # (BLOCK_C, DM)
        li = tl.load(li_ptr + c[:, None] * DM + n[None, :], mask=mc[:, None], other=0.0)
        sr = tl.zeros((BLOCK_C, DM), dtype=tl.float32)
        si = tl.zeros((BLOCK_C, DM), dtype=tl.float32)
        base = b.to(tl.int64) * L * C
        for t in range(j * chunk, tl.minimum(j * chunk + chunk, L)):
            zt = tl.load(z_ptr + base + t * C + c, mask=mc, other=0.0).to(tl.float32)  # z[b, t, c]: one row
            sr, si = lr * sr - li * si + zt[:, None], lr * si + li * sr
        off = ((b * n_chunks + j).to(tl.int64) * C + c)[:, None] * (2 * DM) + n[None, :]
        tl.store(out_ptr + off, sr, mask=mc[:, None])
        tl.store(out_ptr + off + DM, si, mask=mc[:, None])

    @triton.jit
    def _row(t, g, i):
        """Row i of t (R, ...) whose row indices are g (R,) broadcast to t: a slice Triton can take of a register
        block."""
        return tl.sum(tl.where(g == i, t, 0.0), axis=0)

    @triton.jit
    def _modal_mix(p_ptr, p_stride, tail_ptr, w_ptr, sb_ptr, st_ptr, lam_ptr, res_ptr, dir_ptr, out_ptr, D, d,
                   N: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, GP: tl.constexpr, OP: tl.constexpr,
                   DM: tl.constexpr, BLOCK_D: tl.constexpr):
        """x0 ⊙ v for batch row program_id(0), channels program_id(1) * BLOCK_D + [0, BLOCK_D); see mix_step.
        Every load is issued before the first store (one barrier between): a step's latency is one round trip
        to memory, not one per group."""
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,) channels of one group
        j, g, o, n = tl.arange(0, KP), tl.arange(0, GP), tl.arange(0, OP), tl.arange(0, DM)
        ok = c < D
        W = (N + 1) * D
        ch = g[:, None] * D + c[None, :]  # (GP, BLOCK_D) columns of the projections, one row per group
        mg = (g[:, None] < N + 1) & ok[None, :]
        j3 = j[:, None, None]  # the tail's rows (K-1 of KP)
        m3 = (j3 < K - 1) & mg[None, :, :]
        tail_at = tail_ptr + b * (K - 1) * W + j3 * W + ch[None, :, :]  # (KP, GP, BLOCK_D)
        tail = tl.load(tail_at, mask=m3, other=0.0)
        pn = tl.load(p_ptr + b * p_stride + ch, mask=mg, other=0.0).to(tail_ptr.dtype.element_ty)  # rounded as kept
        w = tl.load(w_ptr + ch[None, :, :] * K + j3, mask=m3, other=0.0).to(tl.float32)  # taps 0..K-2
        pc = tl.sum(w * tail.to(tl.float32), axis=0) + tl.load(w_ptr + ch * K + K - 1, mask=mg, other=0.0) * \
            pn.to(tl.float32) + tl.load(sb_ptr + ch, mask=mg, other=0.0)  # (GP, BLOCK_D) the short conv, per group
        cm = o[:, None] * D + c[None, :]  # (OP, BLOCK_D) the long convs' channels
        mm = ((o[:, None] < N - 1) & ok[None, :])[:, :, None] & (n < d)[None, None, :]  # (OP, BLOCK_D, DM)
        at = (b * (N - 1) * D + cm)[:, :, None] * (2 * d) + 2 * n[None, None, :]  # (re, im) pairs of the states
        ap = cm[:, :, None] * (2 * d) + 2 * n[None, None, :]
        sr, si = tl.load(st_ptr + at, mask=mm, other=0.0), tl.load(st_ptr + at + 1, mask=mm, other=0.0)
        lr, li = tl.load(lam_ptr + ap, mask=mm, other=0.0), tl.load(lam_ptr + ap + 1, mask=mm, other=0.0)
        rr, ri = tl.load(res_ptr + ap, mask=mm, other=0.0), tl.load(res_ptr + ap + 1, mask=mm, other=0.0)
        direct = tl.load(dir_ptr + cm, mask=(o[:, None] < N - 1) & ok[None, :], other=0.0)  # (OP, BLOCK_D)
        # every thread's loads before any store: the tail moves on (rows 1.. up one, this token's projections last)
        tl.debug_barrier()
        tl.store(tail_at - W, tail, mask=m3 & (j3 >= 1))
        tl.store(tail_ptr + b * (K - 1) * W + (K - 2) * W + ch, pn, mask=mg)
        g2, o3 = g[:, None], o[:, None, None]
        v = _row(pc, g2, N)  # the value, then the gates N-1 .. 1 with long conv o = N - 1 - g after each
        for k in tl.static_range(N - 1):  # y = 2 Re(R . s) + direct z; s = lam s + z
            z = v * _row(pc, g2, N - 1 - k)  # (BLOCK_D,)
            s_r, s_i = _row(sr, o3, k), _row(si, o3, k)  # (BLOCK_D, DM)
            l_r, l_i = _row(lr, o3, k), _row(li, o3, k)
            v = 2 * tl.sum(_row(rr, o3, k) * s_r - _row(ri, o3, k) * s_i, axis=1) + _row(direct, o[:, None], k) * z
            at_k = (b * (N - 1) * D + k * D + c)[:, None] * (2 * d) + 2 * n[None, :]  # (BLOCK_D, DM)
            mk = ok[:, None] & (n[None, :] < d)
            tl.store(st_ptr + at_k, l_r * s_r - l_i * s_i + z[:, None], mask=mk)
            tl.store(st_ptr + at_k + 1, l_r * s_i + l_i * s_r, mask=mk)
        tl.store(out_ptr + b * D + c, (v * _row(pc, g2, 0)).to(out_ptr.dtype.element_ty), mask=ok)

def long_conv_step(z, k_rev, pos):
    """z (B, D, T) history (positions > pos ignored), k_rev (D, >= T) with k_rev[d, T-1-j] = k[j, d] (the
    zero-padded HyenaState.k_pad of a decoding cache qualifies), pos a 0-dim integer tensor -> y (B, D), in fp32
    from the kernel (sums over s <= pos only). The positions are split into as many chunks as it takes to run
    ~PROGRAMS tiles (static: graph-safe). Where the kernel does not serve (`available`), the plain twin runs.
    Plain twin: hyena.history_conv; held equal, in Triton's CPU interpreter, by
    tests/test_hyena_operator.py::test_decode_kernel_equals_the_definition_in_tritons_interpreter."""
    if not available(z):
        return history_conv(z, k_rev, pos)
    B, D, T = z.shape
    if not (z.is_contiguous() and k_rev.stride(1) == 1):
        raise ValueError("long_conv_step needs a contiguous z history and a row-contiguous filter")
    tiles = B * triton.cdiv(D, BLOCK_D)
    splits = max(1, min(triton.cdiv(PROGRAMS, tiles), triton.cdiv(T, BLOCK_S)))
    chunk = triton.cdiv(triton.cdiv(T, splits), BLOCK_S) * BLOCK_S
    out = torch.empty(splits, B, D, device=z.device, dtype=torch.float32)
    _long_conv_step[(B, triton.cdiv(D, BLOCK_D), splits)](z, k_rev, pos.reshape(1), out, B, D, T, k_rev.stride(0),
                                                         chunk, BLOCK_D=BLOCK_D, BLOCK_S=BLOCK_S)
    return out.sum(0) if splits > 1 else out[0]  # (B, D)

MIX_BLOCK_D = 16  # channels per program of the fused modal step (results/gpu-logs-2026-12-07h/step-sweep.md)


def mix_step(op, state, p, pos):
    """hyena.mix_step for a modal layer (modal.student.ModalState) in one kernel: the short conv from the tail
    (which moves on, in place), each long conv's recurrence (its state updated in place) and the gates, in fp32
    for each channel, where the plain step runs some twenty small kernels in the model's dtype. Other states
    (a convolutional student's history), fp64 states, or no kernel (`available`): the plain step.
    Plain twin: hyena.mix_step; held equal, in Triton's CPU interpreter, by
    tests/test_modal.py::test_fused_modal_step_equals_the_plain_step_in_tritons_interpreter."""
    if not (isinstance(state, ModalState) and available(p) and state.state.dtype == torch.complex64):
        return hyena.mix_step(op, state, p, pos)
    B, W = p.shape
    D, N, K = op.d_model, op.order, op.short_filter.kernel_size[0]
    d = state.state.shape[-1]
    parts = (state.tail, op.short_filter.weight, state.state, state.lam, state.res, state.direct)
    if not all(t.is_contiguous() for t in parts) or p.stride(1) != 1:
        raise ValueError("fast.decode.mix_step needs row-contiguous projections, and a contiguous tail, filter and "
                         "modal state")
    out = p.new_empty(B, D)
    _modal_mix[(B, triton.cdiv(D, MIX_BLOCK_D))](
        p, p.stride(0), state.tail, op.short_filter.weight, op.short_filter.bias, torch.view_as_real(state.state),
        torch.view_as_real(state.lam), torch.view_as_real(state.res), state.direct, out, D, d,
        N=N, K=K, KP=max(1, triton.next_power_of_2(K - 1)), GP=triton.next_power_of_2(N + 1),
        OP=triton.next_power_of_2(N - 1), DM=triton.next_power_of_2(d), BLOCK_D=MIX_BLOCK_D)
    return out  # (B, D)

SCAN_CHUNK, SCAN_C = 256, 32  # positions and channels per program of the prefill's scan


def prefill_state(z, log_decay, angle):
    """modal.fit.prefill_state computed by a chunked scan: z (B, L, C) read once in its own layout and dtype, each
    program running the recurrence over SCAN_CHUNK positions of SCAN_C channels in fp32, then the chunks' states
    carried to the end, state = sum_j lambda^(L - end_j) state_j (in PyTorch, small). The plain twin transposes z
    into a channels-first fp32 copy for its two batched matmuls, the bulk of a modal prefill's extra time.
    Plain twin: modal.fit.prefill_state; held equal, in Triton's CPU interpreter, by
    tests/test_modal.py::test_prefill_scan_kernel_equals_the_plain_state_in_tritons_interpreter (and by bench/bench.py's
    check section on the GPU)."""
    B, L, C = z.shape
    if not available(z) or L * C >= 2 ** 31:  # (the kernel's in-sequence offsets t * C are 32-bit)
        return fit.prefill_state(z, log_decay, angle)
    d, dt = log_decay.shape[1], fit.work_dtype(log_decay)
    with torch.autocast(z.device.type, enabled=False):
        w, th = log_decay.to(dt), angle.to(dt)
        lam = torch.polar(torch.exp(-w.exp()), th)  # (C, d)
        DM = triton.next_power_of_2(d)
        lr, li = (lam.new_zeros(C, DM, dtype=torch.float32) for _ in range(2))
        lr[:, :d], li[:, :d] = lam.real, lam.imag
        a = triton.cdiv(L, SCAN_CHUNK)
        out = torch.empty(B, a, C, 2 * DM, device=z.device, dtype=torch.float32)
        _chunk_states[(B, a, triton.cdiv(C, SCAN_C))](z.contiguous(), lr, li, out, L, C, SCAN_CHUNK, a, DM=DM,
                                                       BLOCK_C=SCAN_C)
        s = torch.complex(out[..., :d], out[..., DM:DM + d])  # (B, a, C, d): each chunk's state at its end
        ends = torch.clamp(torch.arange(1, a + 1, device=z.device) * SCAN_CHUNK, max=L)
        qr, qi = fit.powers(w, th, L - ends)  # (C, a, d): lambda^(L - end_j)
        return (s * torch.complex(qr, qi).transpose(0, 1)).sum(1)  # (B, C, d) complex64

