"""The Hyena operator's implicit long filter (Hyena paper, Poli et al. 2023, section 3.3): the filter is not a
table of L weights per channel but a function of time, h(t) = FFN(PositionalEmbedding(t)) * Window(t), so its
parameter count does not grow with the sequence and it is defined at every t = 0 .. l_max-1. Built as safari's
`standalone_hyena.py` builds it (HazyResearch/safari), parameter for parameter: a safari filter's state dict
loads by name and computes the same function; HyenaFilter's docstring lists the deliberate deviations.

  Sin                    the FFN's activation, sin(w x) with a learnable frequency per channel
  PositionalEmbedding    z(t): normalised time and sinusoids of t, a table over t (safari's `pos_emb.z`)
  ExponentialModulation  Window(t) = exp(-|delta_c| t): channel c's filter decays at its own rate
  HyenaFilter            the three together: forward(L) -> h for lags 0 .. L-1, (L, channels)

hyena.py's HyenaOperator holds one HyenaFilter (`filter_fn`) for all its long convolutions; a modal student holds
modal/student.py's ModalFilter instead, which has the same interface.
"""
import math

import torch
import torch.nn as nn


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
    (`lr`, 1e-5; train.optim_groups hands it to the optimizer) and no weight decay; the normalised
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
