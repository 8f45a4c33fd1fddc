"""The Hyena operator (Poli et al. 2023, arXiv 2302.10866), mirroring safari's `standalone_hyena.py`
(HazyResearch/safari). Activations are time-major (B, L, D) like the rest of the network; only the long
convolution's FFTs run channels-first, on copies it makes anyway for the fp32 cast and the zero padding.

Glossary (code name -> paper symbol, Hyena paper section 3):
  x0, x1, ... x_{N-1}, v   projections of the input u (x^n and v in the paper; N = `order`)
  short_filter             the depthwise causal convolution (kernel 3) applied to every projection
  k / HyenaFilter          the implicit long filter h^n(t) = FFN(PositionalEmbedding(t)) * Window(t)
  bias                     the per-channel skip term D in y = h * u + D u
  z                        the input of a long convolution (x^n ⊙ z^n), cached for decoding
  pos_emb.z                the filter's positional embedding table z(t) (safari's name; not the above)
  l_max                    the longest sequence the filter is defined for (t = 0 .. l_max-1)
  ModalFilter              h as d decaying complex modes per channel (Laughing Hyena; convention in modal.py):
                           any length, and decoding by a (B, channels, d) recurrence state instead of z history
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fast import decode
from lib import modal


def fft_size(n):
    """Smallest 2^a * {1, 3} >= n: cuFFT and pocketfft are fastest on such sizes."""
    p = 1 << max(0, (n - 1).bit_length())
    return min(p, 3 * (p >> 2)) if p >= 4 and 3 * (p >> 2) >= n else p


def fftconv_reference(u, k, bias):
    """Causal long convolution y_t = sum_{s<=t} k_{t-s} u_s + bias * u_t, by FFT of size >= 2L along time,
    differentiated by autograd: the plain definition `fftconv` must equal (tests hold it to this).

    u (B, L, D), k (L, D), bias (D,). Runs in fp32 (fp64 if given fp64) even under bf16 autocast: torch.fft
    rejects bf16, and fp16/bf16 FFTs lose too much precision over long sequences.
    """
    L, dtype = u.shape[1], torch.promote_types(u.dtype, torch.float32)
    n = fft_size(2 * L)  # zero-padding to >= 2L turns the circular convolution into a linear one
    with torch.autocast(u.device.type, enabled=False):
        u32 = u.to(dtype)
        k_f = torch.fft.rfft(k.to(dtype), n=n, dim=0)  # (n/2+1, D), once for the whole batch
        y = torch.fft.irfft(torch.fft.rfft(u32, n=n, dim=1) * k_f, n=n, dim=1)[:, :L]  # (B, L, D)
        return (y + u32 * bias.to(dtype)).to(u.dtype)


def fftconv(u, k, bias):
    """The same function as fftconv_reference, computed faster (FFTConv): u (B, L, D), k (L, D), bias (D,)."""
    with torch.autocast(u.device.type, enabled=False):
        return FFTConv.apply(u, k, bias)


def channels_first(x, n, dtype):
    """(B, L, C) -> (B, C, n) in `dtype`, zero-padded along time: cuFFT is fastest along a contiguous axis (a
    strided time axis makes torch copy anyway). One pass: the transpose, the cast and the padding together."""
    B, L, C = x.shape
    out = x.new_empty(B, C, n, dtype=dtype)
    out[..., L:].zero_()
    out[..., :L].copy_(x.transpose(1, 2))
    return out  # (B, C, n)


def cmul(a, b, conj_b=False):
    """a * b, or a * conj(b), for complex tensors. Under torch.compile as real arithmetic on view_as_real, which
    inductor fuses into one pass (it leaves complex ops to generic, broadcast-slow kernels); eagerly one complex op."""
    if not torch.compiler.is_compiling():
        return a * (b.conj() if conj_b else b)
    (ar, ai), (br, bi) = torch.view_as_real(a).unbind(-1), torch.view_as_real(b).unbind(-1)
    bi = -bi if conj_b else bi
    return torch.view_as_complex(torch.stack((ar * br - ai * bi, ar * bi + ai * br), dim=-1).contiguous())


@torch.library.custom_op("hyena::rfft", mutates_args=())
def rfft(x: torch.Tensor) -> torch.Tensor:
    """torch.fft.rfft along the last axis, as an op torch.compile does not look into: inductor must then hand
    it the contiguous layout it was traced with. Left to itself, inductor lays the padded channels-first copy
    out time-strided (the order of the activations it came from), and torch then copies it once more before
    calling cuFFT."""
    return torch.fft.rfft(x)


@rfft.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2 + 1, dtype=torch.promote_types(x.dtype, torch.complex64))


class FFTConv(torch.autograd.Function):
    """fftconv_reference with a hand-written backward and a layout for speed (measurements: README, results/):
    FFTs run along a contiguous time axis, channels first (`channels_first`); the 1/n of the inverse FFT is folded
    into the filter's padded copy (no extra pass over the output); the input's spectrum is kept for the
    filter's gradient. With y = irfft(U K)[:L] + bias u, and G the spectrum of dLoss/dy:
      du = irfft(G conj(K))[:L] + bias g   (correlation with the filter)
      dk = irfft(sum_b G conj(U))[:L]      (correlation with the input, summed over the batch)
    both exact for n >= 2L, where the circular correlation never wraps into real samples."""

    @staticmethod
    def forward(ctx, u, k, bias):
        B, L, D = u.shape
        n, dtype = fft_size(2 * L), torch.promote_types(u.dtype, torch.float32)
        U = rfft(channels_first(u, n, dtype))  # (B, D, n/2+1)
        K = rfft(channels_first(k[None].to(dtype) / n, n, dtype)[0])  # (D, n/2+1), scaled by 1/n in the copy
        y = torch.fft.irfft(cmul(U, K), n=n, norm="forward")[..., :L]  # (B, D, L); unscaled inverse
        ctx.save_for_backward(u, U, K, bias)
        return (y.transpose(1, 2) + u.to(dtype) * bias.to(dtype)).to(u.dtype)  # (B, L, D)

    @staticmethod
    def backward(ctx, g):
        u, U, K, bias = ctx.saved_tensors
        B, L, D = u.shape
        n, dtype = fft_size(2 * L), U.real.dtype
        G = rfft(channels_first(g, n, dtype))  # (B, D, n/2+1)
        du = dk = dbias = None
        if ctx.needs_input_grad[0]:
            du = torch.fft.irfft(cmul(G, K, conj_b=True), n=n, norm="forward")[..., :L]  # (B, D, L)
            du = (du.transpose(1, 2) + g.to(dtype) * bias.to(dtype)).to(u.dtype)  # (B, L, D)
        if ctx.needs_input_grad[1]:
            dk = torch.fft.irfft(cmul(G, U, conj_b=True).sum(0), n=n)[:, :L].t()  # (L, D); autograd casts to k's dtype
        if ctx.needs_input_grad[2]:
            dbias = (g.to(dtype) * u.to(dtype)).sum((0, 1))  # (D,)
        return du, dk, dbias


def short_conv(p, weight, bias):
    """Depthwise causal convolution along time of p (B, L, C) with weight (C, 1, K): the same numbers as
    nn.Conv1d(padding=K-1)[..., :L] on p.transpose(1, 2), as K shifted multiply-adds (no transposes; one
    fused kernel under torch.compile)."""
    K, L = weight.shape[-1], p.shape[1]
    w, b = weight[:, 0].to(p.dtype), bias.to(p.dtype)  # (C, K): stay in p's dtype (bf16 under autocast)
    out = p * w[:, K - 1] + b  # (B, L, C): the last tap multiplies the current position
    for j in range(1, K):  # tap K-1-j multiplies the input j steps back
        out = out + F.pad(p, (0, 0, j, 0))[:, :L] * w[:, K - 1 - j]
    return out


class Sin(nn.Module):
    """sin(w x) with a learnable frequency per channel: the implicit filter's activation."""
    def __init__(self, dim, w=1.0):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, dim))

    def forward(self, x):
        return torch.sin(self.freq * x)


class PositionalEmbedding(nn.Module):
    """safari's positional embedding of the filter's time axis, a table over t = 0 .. l_max-1:
    z(t) = [t / (l_max-1), Re e^{-i f_b w_t}, Im e^{-i f_b w_t}] with w_t = 2 pi t / l_max and bands f_b =
    linspace(1e-4, bands-1, bands). As in safari, z is a trainable parameter with its own learning rate
    (`lr`, 1e-5; HyenaOperator.optim_settings hands it to the optimizer) and no weight decay; the normalised
    time `t` is a buffer."""
    def __init__(self, emb_dim, l_max, lr=1e-5):
        super().__init__()
        bands = (emb_dim - 1) // 2
        # Computed in fp64 and rounded once (safari computes in fp32: its top bands are off by ~1e-5).
        t = torch.linspace(0, 1, l_max, dtype=torch.float64)[None, :, None]  # (1, L, 1)
        w = 2 * math.pi * torch.arange(l_max, dtype=torch.float64)[None, :, None] / l_max  # (1, L, 1)
        angle = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)[None, None] * w  # (1, L, bands)
        self.z = nn.Parameter(torch.cat([t, angle.cos(), -angle.sin()], dim=-1).float())  # (1, L, emb_dim)
        self.lr = lr
        self.register_buffer("t", t.float())

    def forward(self, L):
        return self.z[:, :L], self.t[:, :L]  # (1, L, emb_dim), (1, L, 1)


class ExponentialModulation(nn.Module):
    """safari's window exp(-|delta_c| t): decay rates delta_c = linspace(log(target) / slow_decay,
    log(target) / fast_decay, channels) (a buffer), so channel 0 decays slowest (|delta| 3.07 by default: it
    would fall to `target` at t = slow_decay, past the sequence's end t = 1) and the last fastest (15.35:
    `target` at t = fast_decay, a local filter)."""
    def __init__(self, channels, fast_decay=0.3, slow_decay=1.5, target=1e-2):
        super().__init__()
        deltas = torch.linspace(math.log(target) / slow_decay, math.log(target) / fast_decay, channels,
                                dtype=torch.float64)
        self.register_buffer("deltas", deltas.float()[None, None])  # (1, 1, C)

    def forward(self, t, h):
        return h * torch.exp(-t * self.deltas.abs())  # (1, L, C)


class HyenaFilter(nn.Module):
    """h(t) = FFN(PositionalEmbedding(t)) * exp(-|delta| t): implicit filters for `channels` channels, defined up
    to l_max. Parameters and their names are safari's HyenaFilter's (filter_fn.bias, filter_fn.pos_emb.z / .t,
    filter_fn.implicit_filter.N.weight / .bias / .freq, filter_fn.modulation.deltas): FFN = Linear, Sin, Linear,
    Sin, Linear, Sin, Linear without bias, where the three Sin are ONE module (one shared `freq`), so a safari
    state dict loads by name and computes the same function.

    Deviations from safari, on purpose:
    - Under model.to(bf16 / fp16) the filter's tensors stay fp32 (`_apply`): bf16 would round the time grid
      (256 steps per octave: only ~640 of 2048 normalised times would stay distinct), the embedding z and the
      decay rates. Under .double() they follow (the filter is then fp64 end to end). safari casts them all.
    - forward(L) returns the filter (L, channels) rather than convolving (safari's `filter(L)` is (1, L, C));
      L > l_max is refused, where safari silently truncates the filter to l_max.
    - The FFN weights get `Config.hyena_filter_lr` (0: the run's lr) where safari's default is 1e-3.
    - z is computed in fp64 and rounded once to fp32 (safari computes it in fp32).
    """
    def __init__(self, channels, l_max, emb_dim=33, filter_order=64, fast_decay=0.3, slow_decay=1.5, target=1e-2,
                 lr_pos_emb=1e-5):
        super().__init__()
        if emb_dim % 2 == 0 or emb_dim < 3:
            raise ValueError(f"hyena_emb_dim must be odd and >= 3 (1 + 2 * bands), got {emb_dim}")
        self.l_max, self.channels = l_max, channels
        self.bias = nn.Parameter(torch.randn(channels))  # created first, as safari, so seeded inits agree
        self.pos_emb = PositionalEmbedding(emb_dim, l_max, lr_pos_emb)
        act = Sin(filter_order)  # one module: one frequency shared by all three activations, as safari
        self.implicit_filter = nn.Sequential(
            nn.Linear(emb_dim, filter_order), act,
            nn.Linear(filter_order, filter_order), act,
            nn.Linear(filter_order, filter_order), act,
            nn.Linear(filter_order, channels, bias=False))
        self.modulation = ExponentialModulation(channels, fast_decay, slow_decay, target)

    def forward(self, L):
        """The filter for lags 0..L-1 as (L, channels), fp32 (fp64 in an fp64 model): a prefix of the l_max filter."""
        if L > self.l_max:
            raise ValueError(f"sequence length {L} exceeds the Hyena filter's l_max {self.l_max}; "
                             "build the model with a larger Config.hyena_l_max")
        z, t = self.pos_emb(L)  # (1, L, emb_dim), (1, L, 1)
        with torch.autocast(z.device.type, enabled=False):  # tiny, and feeds an fp32 FFT anyway
            return self.modulation(t, self.implicit_filter(z))[0]  # (L, C)

    def _apply(self, fn, *args, **kwargs):
        """Casts to bf16 / fp16 leave the filter fp32 (see the class docstring); devices and fp64 follow."""
        def keep_fp32(t):
            out = fn(t)
            if t.is_floating_point() and out.dtype in (torch.bfloat16, torch.float16):
                return t.to(device=out.device, dtype=torch.float32)  # from t itself: nothing rounded
            return out
        return super()._apply(keep_fp32, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        """The shared Sin appears under three names (implicit_filter.1/.3/.5.freq): refuse differing values
        (e.g. from a checkpoint with three separate activations) rather than keep whichever loads last."""
        super()._load_from_state_dict(state_dict, prefix, *args)
        names = [f"{prefix}implicit_filter.{i}.freq" for i in (1, 3, 5)]
        given = [state_dict[n] for n in names if n in state_dict]
        if any(not torch.equal(g, given[0]) for g in given[1:]):
            args[-1].append(f"{', '.join(names)} differ, but the filter shares one Sin (one frequency) across its "
                            "activations, as safari: the checkpoint was made with separate activations")


class ModalFilter(nn.Module):
    """h(0) = h0, h(t) = 2 Re sum_n R_n lambda_n^(t-1) for t >= 1 (modal.py's convention), d = state_size modes per
    channel, defined for every t: HyenaFilter's interface (forward(L) -> (L, channels), `bias` the skip D).
    lambda = exp(-exp(log_decay) + i angle) stays inside the unit circle whatever the parameters; residues are
    (Re R, Im R) pairs. `hyena.to_modal` fills them from a trained filter; the init here is for models built
    directly (random, stable, spread decay rates)."""
    def __init__(self, channels, state_size):
        super().__init__()
        if state_size < 1:
            raise ValueError(f"ModalFilter needs state_size >= 1, got {state_size}")
        self.channels, self.state_size = channels, state_size
        rate = torch.exp(torch.empty(channels, state_size).uniform_(math.log(1e-3), math.log(0.5)))  # -log|lambda|
        self.log_decay = nn.Parameter(rate.log())
        self.angle = nn.Parameter(torch.rand(channels, state_size) * math.pi)
        self.residues = nn.Parameter(torch.randn(channels, state_size, 2) * (rate[..., None] / state_size).sqrt())
        self.h0 = nn.Parameter(torch.randn(channels) * 0.1)
        self.bias = nn.Parameter(torch.randn(channels))

    def forward(self, L):
        """The filter for lags 0..L-1, (L, channels), fp32 (fp64 for fp64 parameters), for any L."""
        return modal.modal_response(self.h0, self.log_decay, self.angle, self.residues, L)

    def poles(self):
        """lambda as a (channels, d) complex tensor, complex64 (complex128 for fp64 parameters)."""
        dt = modal.work_dtype(self.log_decay)
        w, th = self.log_decay.to(dt), self.angle.to(dt)
        return torch.polar(torch.exp(-w.exp()), th)


@dataclass
class HyenaState:
    """What a Hyena layer keeps for decoding (its cache.layers entry, filled by the prefill): O(max_len D)."""
    tail: torch.Tensor   # (B, K-1, (N+1)D) the short conv's last inputs
    z: list              # per long conv (B, D, max_len): its inputs so far, channels first (for bmm)
    k_pad: torch.Tensor  # (N-1, D, 2 max_len - 1): k_pad[..., T-1-t+s] = k[t-s] for s <= t, 0 for s > t
    lags: torch.Tensor   # (max_len,) 0 .. max_len-1
    bias: torch.Tensor   # (N-1, D) the skip term D, in the model's dtype

    def carried(self):
        """The tensors a step updates in place at every position (the history is written at the step's own)."""
        return [self.tail]


@dataclass
class ModalState:
    """What a modal Hyena layer keeps for decoding: O(channels d), whatever the context or max_len."""
    tail: torch.Tensor    # (B, K-1, (N+1)D) the short conv's last inputs
    state: torch.Tensor   # (B, (N-1)D, d) complex: each long conv's recurrence state
    lam: torch.Tensor     # (C, d) the poles
    res: torch.Tensor     # (C, d) the residues
    direct: torch.Tensor  # (C,) h0 + D, the current input's weight

    def carried(self):
        return [self.tail, self.state]


class HyenaOperator(nn.Module):
    def __init__(self, d_model, l_max, order=2, filter_order=64, emb_dim=33, short_filter_order=3, filter_lr=0.0,
                 modal_state=0):
        super().__init__()
        if order < 2:
            raise ValueError(f"Hyena order must be >= 2 (one gate and one long convolution), got {order}")
        self.d_model, self.order, self.filter_lr = d_model, order, filter_lr
        self.in_proj = nn.Linear(d_model, (order + 1) * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        width = (order + 1) * d_model
        # An nn.Conv1d only to hold the (C, 1, K) weight under safari's name; short_conv() applies it.
        self.short_filter = nn.Conv1d(width, width, short_filter_order, groups=width, padding=short_filter_order - 1)
        self.modal = modal_state > 0  # a ModalFilter: decoded by its recurrence, not by the z history
        self.filter_fn = (ModalFilter(d_model * (order - 1), modal_state) if self.modal
                          else HyenaFilter(d_model * (order - 1), l_max, emb_dim, filter_order))

    def optim_settings(self):
        """{parameter: AdamW settings} where they differ from the run's (GPTNeoX.optim_groups reads them): the long
        filter's parameters take no weight decay, and their own lr when filter_lr is set; the positional
        embedding z takes safari's lr (PositionalEmbedding.lr)."""
        own = {p: {"weight_decay": 0.0, **({"lr": self.filter_lr} if self.filter_lr else {})}
               for p in self.filter_fn.parameters()}
        if isinstance(self.filter_fn, HyenaFilter):
            own[self.filter_fn.pos_emb.z] = {"lr": self.filter_fn.pos_emb.lr, "weight_decay": 0.0}
        return own

    def filters(self, L):
        k = self.filter_fn(L).view(L, self.order - 1, self.d_model)  # (L, N-1, D)
        return k, self.filter_fn.bias.view(self.order - 1, self.d_model)  # (N-1, D)

    def forward(self, u, cache=None, layer=0):
        """u (B, L, D) -> (B, L, D). With a decoding `cache` (hyena.Cache): the prefill from position 0 while
        cache.layers[layer] is None (it fills it), then one token at a time (`step`)."""
        B, L, D = u.shape
        if cache is not None and cache.layers[layer] is not None:
            return self.step(u, cache, layer)
        p = self.in_proj(u)  # (B, L, (N+1)D)
        pc = short_conv(p, self.short_filter.weight, self.short_filter.bias)  # (B, L, (N+1)D) sees t-2..t
        *x, v = pc.split(D, dim=-1)  # N gates x (B, L, D), value v (B, L, D)
        if self.modal and cache is not None:
            return self.modal_prefill(p, x, v, cache, layer)
        k, bias = self.filters(cache.max_len if cache is not None else L)
        zs = []  # prefill: every long-conv input, remembered for O(L D) decoding
        for o, x_i in enumerate(reversed(x[1:])):
            z = v * x_i  # (B, L, D)
            if cache is not None:
                zs.append(z.new_zeros(B, D, cache.max_len))  # channels-first for bmm
                zs[o][..., :L] = z.transpose(1, 2)
            v = fftconv(z, k[:L, o], bias[o])  # (B, L, D)
        if cache is not None:
            T, kw = cache.max_len, self.short_filter.kernel_size[0] - 1
            tail = F.pad(p, (0, 0, max(0, kw - L), 0))[:, -kw:].clone()  # (B, kw, (N+1)D) last inputs
            # The reversed filter then as many zeros: k_pad[..., T-1-t+s] = k[t-s] for s <= t, 0 for s > t.
            k_rev = k.flip(0).permute(1, 2, 0).to(v.dtype)  # (N-1, D, T): k[T-1], ..., k[0]
            k_pad = F.pad(k_rev, (0, T - 1)).contiguous()  # (N-1, D, 2T-1)
            # The skip term in the model's dtype: in a bf16 model the filter itself stays fp32.
            cache.layers[layer] = HyenaState(tail, zs, k_pad, torch.arange(T, device=u.device),
                                             bias.to(self.in_proj.weight.dtype))
        return self.out_proj(v * x[0])  # (B, L, D)

    def modal_prefill(self, p, x, v, cache, layer):
        """The prompt through the FFT path, and each long conv's recurrence state after it, computed exactly
        (modal.prefill_state): the cache holds O(channels d) numbers whatever the context or max_len."""
        B, L, D = v.shape
        f, kw = self.filter_fn, self.short_filter.kernel_size[0] - 1
        k, bias = self.filters(L)
        lam = f.poles()  # (N-1) D channels, (C, d)
        w, th = f.log_decay, f.angle
        states = []
        for o, x_i in enumerate(reversed(x[1:])):
            z = v * x_i  # (B, L, D)
            ch = slice(o * D, (o + 1) * D)
            states.append(modal.prefill_state(z, w[ch], th[ch]))  # (B, D, d): sum_t lambda^(L-1-t) z_t
            v = fftconv(z, k[:L, o], bias[o])  # (B, L, D)
        R = f.residues.to(lam.real.dtype)
        cache.layers[layer] = ModalState(
            tail=F.pad(p, (0, 0, max(0, kw - L), 0))[:, -kw:].clone(),  # (B, kw, (N+1)D) last inputs
            state=torch.cat(states, 1),  # (B, (N-1)D, d) complex
            lam=lam.detach(), res=torch.complex(R[..., 0], R[..., 1]).detach(),  # (C, d) each
            direct=(f.h0.to(lam.real.dtype) + f.bias.to(lam.real.dtype)).detach())  # (C,) h0 + D
        return self.out_proj(v * x[0])  # (B, L, D)

    def modal_step(self, x, v, state):
        """One token through the recurrences: y = 2 Re(R . state) + (h0 + D) z, then state = lambda state + z.
        No position and no history: the same work at any context."""
        D = self.d_model
        for o, x_i in enumerate(reversed(x[1:])):
            ch = slice(o * D, (o + 1) * D)
            s = state.state[:, ch]  # (B, D, d) view: updated in place (fixed shapes, a CUDA graph replays it)
            z = (v * x_i).to(state.direct.dtype)  # (B, D) in fp32 (fp64)
            y = 2 * (s * state.res[ch]).real.sum(-1) + state.direct[ch] * z  # (B, D)
            s.mul_(state.lam[ch]).add_(z[..., None])
            v = y.to(v.dtype)
        return self.out_proj(v * x[0])[:, None]  # (B, 1, D)

    def step(self, u, cache, layer):
        """One token at position cache.pos (a device tensor; fixed shapes, so a CUDA graph can capture it):
        the short conv from the cached tail, each long conv the z history against the filter reversed from
        pos. On CUDA one Triton kernel (decode.py) reads only positions <= pos; the PyTorch reference
        takes the whole history against a gathered filter window (later, stale history meets its zeros)."""
        B, L, D = u.shape
        if L != 1:
            raise ValueError(f"Hyena decoding takes one token at a time after the prefill, got {L}")
        T, pos, state = cache.max_len, cache.pos, cache.layers[layer]
        window = torch.cat([state.tail, self.in_proj(u).to(state.tail.dtype)], dim=1)  # (B, K, (N+1)D)
        state.tail.copy_(window[:, 1:])
        pc = short_conv(window, self.short_filter.weight, self.short_filter.bias)[:, -1]  # (B, (N+1)D)
        *x, v = pc.split(D, dim=-1)  # (B, D) each
        if self.modal:
            return self.modal_step(x, v, state)
        for o, x_i in enumerate(reversed(x[1:])):
            z = v * x_i  # (B, D)
            hist = state.z[o]  # (B, D, T)
            hist.index_copy_(2, pos.view(1), z[..., None].to(hist.dtype))
            if decode.available(hist):  # one Triton kernel reading only s <= pos (fp32 sums)
                y = decode.long_conv_step(hist, state.k_pad[o], pos).to(hist.dtype)  # (B, D)
            else:  # the reference: the whole history against the filter window (k_pad[T-1-pos+s] = k[pos-s])
                kr = state.k_pad[o].index_select(1, state.lags + (T - 1 - pos))  # (D, T): k[pos..0], 0...
                y = torch.bmm(hist.transpose(0, 1), kr[..., None])[..., 0].transpose(0, 1)  # (B, D) per-channel GEMV
            v = y + z * state.bias[o]  # (B, D)
        return self.out_proj(v * x[0])[:, None]  # (B, 1, D)
