"""Long filters as sums of decaying complex modes: the numerics of Laughing Hyena Distillery (Massaroli et al.,
NeurIPS 2023, arXiv 2310.18780), as pure functions on tensors (no model code; ModalFilter and `to_modal`
in modal/student.py use them).

The convention, one for the whole project (ModalFilter, its decoding step and the fit all follow it): a filter of
d modes per channel is

    h(0) = h0                                         the direct term
    h(t) = 2 Re sum_{n<d} R_n lambda_n^(t-1),  t >= 1   d complex-conjugate pairs (poles lambda, residues R)

i.e. h(t) = C A^(t-1) B for t >= 1, the impulse response of the diagonal recurrence x_t = lambda x_{t-1} + z_t,
y_t = 2 Re(R . x_{t-1}) + (h0 + D) z_t. A real pole is a mode too (its R's imaginary part does nothing).
Poles are stored as lambda = exp(-exp(w) + i theta) ("log_decay" w, "angle" theta): |lambda| < 1 for every real
w, so gradient steps cannot make a mode unstable, and lambda^k = exp(-k exp(w)) e^(i k theta) is exact for any k
(no repeated products, no overflow).

Fitting (`fit`): the poles by Kung's method, the Eigensystem Realization Algorithm (S. Y. Kung, "A new
identification and model reduction algorithm via singular value decomposition", Asilomar 1978; Juang & Pappa,
J. Guidance 8(5), 1985): the SVD of the Hankel matrix of h(1..), its leading r left singular vectors U, and the
eigenvalues of the shift-invariance solution U[1:] = U[:-1] A. Then the residues by Vandermonde least squares on
h(1..L-1) (Massaroli et al. section 3.2), optionally refined by gradient steps on the filter error. The Hankel
singular values (`hankel_singular_values`) say how many modes a filter needs; `fit_tol` picks d from the error.
"""
import math
from dataclasses import dataclass

import torch

CHUNK = 64            # channels fitted at once: bounds the Hankel matrices' memory
MIN_RATE, MAX_RATE = 1e-5, 30.0  # -log|lambda| kept in [1e-5, 30]: ERA's unstable poles are pulled inside


def work_dtype(t):
    return torch.promote_types(t.dtype, torch.float32)


def powers(log_decay, angle, k):
    """lambda^k as (real, imag), each (C, K, d), for lags k (K,): exp(-k exp(w)) (cos k theta, sin k theta)."""
    k = k.to(log_decay.dtype)[None, :, None]  # (1, K, 1)
    mag = torch.exp(-k * log_decay.exp()[:, None, :])  # (C, K, d)
    ang = k * angle[:, None, :]  # (C, K, d)
    return mag * torch.cos(ang), mag * torch.sin(ang)


def modal_response(h0, log_decay, angle, residues, L):
    """The filter h(0..L-1) as (L, C), for any L: h0 (C,), log_decay and angle (C, d), residues (C, d, 2) real
    pairs. Runs in fp32 (fp64 for fp64 parameters) with autocast off, differentiable. The lags are split as
    t - 1 = j b + i (b ~ sqrt(L)) so that h = 2 Re((R lambda^(j b)) @ (lambda^i)^T) is one batched matmul over
    channels: O(C d sqrt(L)) intermediates instead of O(C d L)."""
    dt = work_dtype(log_decay)
    with torch.autocast(log_decay.device.type, enabled=False):
        h0, w, th, R = (t.to(dt) for t in (h0, log_decay, angle, residues))
        n = L - 1
        if n <= 0:
            return h0[None, :][:L]  # (L, C)
        C, b = w.shape[0], math.isqrt(n - 1) + 1  # b * b >= n
        a = -(-n // b)
        dev = w.device
        out_r, out_i = powers(w, th, torch.arange(a, device=dev) * b)  # (C, a, d): lambda^(j b)
        in_r, in_i = powers(w, th, torch.arange(b, device=dev))  # (C, b, d): lambda^i
        Rr, Ri = R[..., 0][:, None], R[..., 1][:, None]  # (C, 1, d)
        xr, xi = Rr * out_r - Ri * out_i, Rr * out_i + Ri * out_r  # R lambda^(j b)
        # Re(X Y^T) = Xr Yr^T - Xi Yi^T, as one real matmul over 2d
        h = 2 * torch.bmm(torch.cat([xr, -xi], -1), torch.cat([in_r, in_i], -1).transpose(1, 2))  # (C, a, b)
        return torch.cat([h0[None], h.reshape(C, a * b)[:, :n].t()])  # (L, C)


def prefill_state(z, log_decay, angle):
    """The recurrence's state after a prompt, exactly: state_n = sum_t lambda_n^(L-1-t) z_t, z (B, L, C) ->
    (B, C, d) complex (complex64; complex128 for fp64 parameters). A two-level Vandermonde contraction (chunks of
    b ~ sqrt(L) positions, then across chunks), two batched matmuls, no loop over positions."""
    dt = work_dtype(log_decay)
    with torch.autocast(z.device.type, enabled=False):
        w, th = log_decay.to(dt), angle.to(dt)
        B, L, C = z.shape
        d, b = w.shape[1], math.isqrt(max(L - 1, 0)) + 1
        a = -(-L // b)
        zp = z.new_empty(C, B, a * b, dtype=dt)  # channels first, in one copy that also casts
        zp[..., :a * b - L].zero_()  # leading zeros add nothing
        zp[..., a * b - L:].copy_(z.permute(2, 0, 1))  # (C, B, L)
        zp = zp.view(C, B * a, b)  # (C, B a, b)
        pr, pi = powers(w, th, torch.arange(b - 1, -1, -1, device=z.device))  # (C, b, d): lambda^(b-1-i)
        s = torch.bmm(zp, torch.cat([pr, pi], -1)).view(C, B, a, 2 * d)  # per-chunk states
        s = torch.complex(s[..., :d], s[..., d:])  # (C, B, a, d)
        qr, qi = powers(w, th, torch.arange(a - 1, -1, -1, device=z.device) * b)  # (C, a, d): lambda^(b(a-1-j))
        return (s * torch.complex(qr, qi)[:, None]).sum(2).transpose(0, 1).contiguous()  # (B, C, d)


# ----------------------------------------------------------------------------- fitting

def poles_to_params(poles):
    """Complex poles (C, d) -> (log_decay, angle), |lambda| clamped into exp(-[MIN_RATE, MAX_RATE])."""
    rate = (-poles.abs().clamp_min(1e-300).log()).clamp(MIN_RATE, MAX_RATE)
    return rate.log(), poles.angle()


def rel_error(h, approx):
    """||h - approx|| / ||h|| over everything (0 for a zero filter fitted exactly)."""
    return ((h - approx).norm() / h.norm().clamp_min(1e-300)).item()


def hankel(h, cols):
    """H[c, i, j] = h(1 + i + j): (C, L-cols, cols) from h (L, C)."""
    return h[1:].t().unfold(1, cols, 1)


def hankel_singular_values(h, cols=None):
    """(C, min(rows, cols)) singular values of each channel's Hankel matrix of h(1..), largest first: a filter is well
    approximated by r real modes (r/2 complex pairs) when those beyond r are small."""
    return torch.linalg.svdvals(hankel(h.to(work_dtype(h)), cols or default_cols(h.shape[0], 64)))


def default_cols(L, d):
    """Hankel columns: a (near) square Hankel of all lags. Few columns shorten the SVD but make the leading
    singular vectors blind to the slow tail (ERA's poles then miss it by far)."""
    return max(1, (L - 1) // 2)


def leading_left_vectors(H, q, power_iters=3):
    """H's q leading left singular vectors (C, rows, q), by randomized subspace iteration (Halko, Martinsson &
    Tropp, SIAM Review 53(2), 2011): only batched matmuls and thin QRs, where a full SVD of each channel's square
    Hankel would cost O(L^3). Exact when rank(H) <= q; Hankel singular values of filters fall fast, which is
    what makes the iteration converge in a few steps."""
    if q >= min(H.shape[-2:]):
        return torch.linalg.svd(H, full_matrices=False)[0][..., :q]
    g = torch.Generator(device=H.device).manual_seed(0)  # the same fit every time
    Q = torch.linalg.qr(H @ torch.randn(H.shape[-1], q, generator=g, device=H.device, dtype=H.dtype))[0]
    for _ in range(power_iters):
        Q = torch.linalg.qr(H @ torch.linalg.qr(H.transpose(1, 2) @ Q)[0])[0]  # (C, rows, q)
    return Q @ torch.linalg.svd(Q.transpose(1, 2) @ H, full_matrices=False)[0]  # (C, rows, q)


def era_poles(U, d):
    """d poles per channel (one per conjugate pair, plus the real ones) from the Hankel's left singular vectors
    U (C, rows, >= 2d), by Kung's shift invariance U[1:] = U[:-1] A (least squares). The realisation order r is
    the largest in [d, 2d] whose eigenvalues make at most d modes (pairs + reals): r = 2d when all poles come in
    pairs, smaller by one per extra real pole. A channel with fewer than d modes gets fast-decaying real fillers,
    to which the least squares gives what residue helps."""
    C, cols = U.shape[0], U.shape[-1]
    # U's columns are orthonormal, so U1^T U1 = I - u u^T (u the last row): each order's normal equations
    # come from one (cols x cols) product, not one pseudo-inverse per order.
    M, u = U[:, :-1].transpose(1, 2) @ U[:, 1:], U[:, -1]  # (C, cols, cols), (C, cols)
    best = torch.full((C, d), math.exp(-1.0), dtype=torch.complex128, device=U.device)
    done = torch.zeros(C, dtype=torch.bool, device=U.device)
    for r in range(min(2 * d, cols), min(d, cols) - 1, -1):  # from the largest order down, until all channels fit
        G = torch.eye(r, dtype=U.dtype, device=U.device) - u[:, :r, None] * u[:, None, :r]  # (C, r, r)
        ev = torch.linalg.eigvals(torch.linalg.solve(G, M[:, :r, :r])).to(best.dtype)  # (C, r)
        keep = ev.imag >= 0  # one of each conjugate pair, and the real poles
        fits = (keep.sum(-1) <= d) & ~done  # (C,) channels whose largest fitting order is r
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices  # kept ones first
        ev = torch.where(keep, ev, best[:, :1].expand_as(ev)).gather(-1, order)[:, :d]
        ev = torch.cat([ev, best[:, :d - ev.shape[1]]], -1) if ev.shape[1] < d else ev
        best, done = torch.where(fits[:, None], ev, best), done | fits
        if bool(done.all()):
            break
    return best


def lstsq(A, b):
    """Minimum-norm least squares through the SVD (works rank-deficient and on CUDA): A (C, n, m), b (C, n, 1)."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    cut = S[:, :1] * torch.finfo(S.dtype).eps * max(A.shape[-2:])
    inv = torch.where(S > cut, 1 / S.clamp_min(torch.finfo(S.dtype).tiny), torch.zeros_like(S))
    return Vh.transpose(1, 2) @ (inv[..., None] * (U.transpose(1, 2) @ b))  # (C, m, 1)


def fit_residues(h, log_decay, angle):
    """Residues (C, d, 2) minimising ||h(1..L-1) - 2 Re sum_n R_n lambda_n^(t-1)|| for fixed poles: the
    Vandermonde least squares, with columns 2 Re(lambda^k) and -2 Im(lambda^k) for Re R and Im R."""
    L, d = h.shape[0], log_decay.shape[1]
    vr, vi = powers(log_decay, angle, torch.arange(L - 1, device=h.device))  # (C, L-1, d)
    x = lstsq(torch.cat([2 * vr, -2 * vi], -1), h[1:].t()[..., None])  # (C, 2d, 1)
    return torch.stack([x[:, :d, 0], x[:, d:, 0]], -1)  # (C, d, 2)


@dataclass
class ModalFit:
    """A fitted filter in ModalFilter's parameters, and how well it matches: rel_error over the whole layer
    (||h - h_modal|| / ||h||, all channels and lags), channel_error (C,) per channel."""
    state_size: int
    h0: torch.Tensor         # (C,)
    log_decay: torch.Tensor  # (C, d)
    angle: torch.Tensor      # (C, d)
    residues: torch.Tensor   # (C, d, 2)
    rel_error: float
    channel_error: torch.Tensor


def refine(h, log_decay, angle, residues, steps, lr=1e-3):
    """Adam steps on sum over channels of ||h - h_modal||^2 / ||h||^2 (poles and residues; h0 is exact),
    keeping per channel the best parameters seen, so refinement never makes a channel worse."""
    w, th, R = (t.detach().clone().requires_grad_(True) for t in (log_decay, angle, residues))
    opt = torch.optim.Adam([w, th, R], lr=lr)
    norm = h.pow(2).sum(0).clamp_min(1e-300)  # (C,)
    best, best_err = [t.detach().clone() for t in (w, th, R)], None
    for i in range(steps + 1):
        with torch.enable_grad():
            err = (modal_response(h[0], w, th, R, h.shape[0]) - h).pow(2).sum(0) / norm  # (C,)
        better = err.detach() < best_err if best_err is not None else torch.ones_like(norm, dtype=torch.bool)
        for b, t in zip(best, (w, th, R)):
            b.copy_(torch.where(better.view(-1, *[1] * (t.dim() - 1)), t.detach(), b))
        best_err = torch.where(better, err.detach(), best_err) if best_err is not None else err.detach()
        if i == steps:
            break
        opt.zero_grad()
        err.sum().backward()
        opt.step()
    return best


def fit(h, d, refine_steps=0, cols=None):
    """Fit d modes per channel to the filter h (L, C) (ERA poles, least-squares residues, optional gradient
    refinement), in fp64. Returns a ModalFit (fp64 tensors on h's device)."""
    return fit_states(h, [d], refine_steps, cols)[0]


def fit_tol(h, tol, max_state=64, refine_steps=0, cols=None):
    """The smallest d among 1, 2, 4, ... max_state whose fit has rel_error <= tol (else the max_state fit)."""
    ds = sorted({min(1 << i, max_state) for i in range(max_state.bit_length() + 1)})
    fits = fit_states(h, ds, refine_steps, cols or default_cols(h.shape[0], max_state))
    return next((f for f in fits if f.rel_error <= tol), fits[-1])


def fit_states(h, ds, refine_steps=0, cols=None):
    """One ModalFit per state size in ds; each channel chunk's Hankel SVD is computed once for all of them."""
    L, C = h.shape
    if L < 3:
        raise ValueError(f"a modal fit needs a filter of at least 3 lags, got {L}")
    if min(ds) < 1:
        raise ValueError(f"state sizes must be >= 1, got {ds}")
    h = h.detach().to(torch.float64)
    cols = cols or default_cols(L, max(ds))
    parts = {d: [] for d in ds}
    for c0 in range(0, C, CHUNK):
        hc = h[:, c0:c0 + CHUNK]  # (L, c)
        H = hankel(hc, cols).contiguous()  # (c, L-cols, cols): one copy, not one per product
        U = leading_left_vectors(H, min(cols, 2 * max(ds) + 16))  # (c, L-cols, q)
        for d in ds:
            w, th = poles_to_params(era_poles(U, d))
            R = fit_residues(hc, w, th)
            if refine_steps:
                w, th, R = refine(hc, w, th, R, refine_steps)
            parts[d].append((w, th, R))
    fits = []
    for d in ds:
        w, th, R = (torch.cat(ts) for ts in zip(*parts[d]))
        approx = modal_response(h[0], w, th, R, L)  # (L, C)
        channel = (approx - h).norm(dim=0) / h.norm(dim=0).clamp_min(1e-300)
        fits.append(ModalFit(d, h[0].clone(), w, th, R, rel_error(h, approx), channel))
    return fits
