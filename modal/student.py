"""The modal student (Laughing Hyena Distillery, Massaroli et al. 2023, arXiv 2310.18780): a Hyena student whose
long filters are d decaying complex modes per channel, so it decodes by a fixed-size recurrence, at any length.
hyena.py knows none of it: a ModalFilter takes a HyenaFilter's place in the operator and answers the same calls.

  ModalFilter      HyenaFilter's interface (forward(L) -> (L, channels), `bias` the skip D, and for decoding
                   prefill_length / new_state) for modal filters
  ModalState       what such a layer keeps for cached decoding: O(channels d) numbers whatever the context or
                   max_len, instead of hyena.HyenaState's z history
  build            a GPTNeoX of a config whose hyena_modal_state asks for modal filters (GPTNeoX refuses those)
  to_modal         a trained Hyena student -> its modal twin, each filter fitted by modal/fit.py
  load_pretrained  any checkpoint, modal or not: the loader of every script that may be given one

The mathematics (the convention, the fit, the prefill state) is modal/fit.py's; this module is the model side.
"""
import json
import math
import sys
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from cli import write_atomic
from pretrained.config import read_config
from hub import resolve_file
from hyena import GPTNeoX, tail_of
from pretrained.weights import load_weights
from modal import fit


class ModalFilter(nn.Module):
    """h(0) = h0, h(t) = 2 Re sum_n R_n lambda_n^(t-1) for t >= 1 (modal/fit.py's convention), d = state_size modes
    per channel, defined for every t: HyenaFilter's interface (forward(L) -> (L, channels), `bias` the skip D).
    lambda = exp(-exp(log_decay) + i angle) stays inside the unit circle whatever the parameters; residues are
    (Re R, Im R) pairs. `to_modal` fills them from a trained filter; the init here is for models built
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
        self.prefill_state = fit.prefill_state  # the state after a prompt (fast.install: a Triton scan)

    def forward(self, L):
        """The filter for lags 0..L-1, (L, channels), fp32 (fp64 for fp64 parameters), for any L."""
        return fit.modal_response(self.h0, self.log_decay, self.angle, self.residues, L)

    def poles(self):
        """lambda as a (channels, d) complex tensor, complex64 (complex128 for fp64 parameters)."""
        dt = fit.work_dtype(self.log_decay)
        w, th = self.log_decay.to(dt), self.angle.to(dt)
        return torch.polar(torch.exp(-w.exp()), th)

    def prefill_length(self, L, max_len):
        return L  # decoding keeps a state, not the filter: the prompt's length is all a prefill needs

    def new_state(self, op, p, zs, k, bias, max_len):
        return ModalState.prefill(self, op, p, zs)


@dataclass
class ModalState:
    """What a modal Hyena layer keeps for decoding: O(channels d), whatever the context or max_len."""
    tail: torch.Tensor    # (B, K-1, (N+1)D) the short conv's last inputs
    state: torch.Tensor   # (B, (N-1)D, d) complex: each long conv's recurrence state
    lam: torch.Tensor     # (C, d) the poles
    res: torch.Tensor     # (C, d) the residues
    direct: torch.Tensor  # (C,) h0 + D, the current input's weight

    @classmethod
    def prefill(cls, f, op, p, zs):
        """After the prompt, of the ModalFilter f of HyenaOperator op: p (B, L, (N+1)D) the projections before the
        short conv, zs each long conv's input (B, L, D). Each long conv's recurrence state is computed exactly
        (f.prefill_state: modal/fit.py's), sum_t lambda^(L-1-t) z_t."""
        D = zs[0].shape[-1]
        lam = f.poles()  # (N-1) D channels, (C, d)
        states = [f.prefill_state(z, f.log_decay[o * D:(o + 1) * D], f.angle[o * D:(o + 1) * D])
                  for o, z in enumerate(zs)]
        R = f.residues.to(lam.real.dtype)
        return cls(tail=tail_of(p, op.short_filter.kernel_size[0] - 1),  # (B, kw, (N+1)D) last inputs
                   state=torch.cat(states, 1),  # (B, (N-1)D, d) complex
                   lam=lam.detach(), res=torch.complex(R[..., 0], R[..., 1]).detach(),  # (C, d) each
                   direct=(f.h0.to(lam.real.dtype) + f.bias.to(lam.real.dtype)).detach())  # (C,) h0 + D

    def long_conv(self, o, z, pos):
        """Long convolution o's output for its input z (B, D) through its recurrence: y = 2 Re(R . state) +
        (h0 + D) z, then state = lambda state + z. No position (pos is HyenaState's) and no history: the same
        work at any context."""
        ch = slice(o * z.shape[-1], (o + 1) * z.shape[-1])
        s = self.state[:, ch]  # (B, D, d) view: updated in place (fixed shapes, a CUDA graph replays it)
        zc = z.to(self.direct.dtype)  # (B, D) in fp32 (fp64)
        y = 2 * (s * self.res[ch]).real.sum(-1) + self.direct[ch] * zc  # (B, D)
        s.mul_(self.lam[ch]).add_(zc[..., None])
        return y.to(z.dtype)

    def carried(self):
        return [self.tail, self.state]


def build(cfg):
    """A GPTNeoX of cfg, its Hyena layers with hyena_modal_state d > 0 holding a ModalFilter of d modes: built
    with implicit filters (what GPTNeoX knows), which are then swapped."""
    model = GPTNeoX(replace(cfg, hyena_modal_state=[]))
    for block, d in zip(model.gpt_neox.layers, cfg.hyena_modal_state):
        if d:
            block.hyena.filter_fn = ModalFilter(block.hyena.filter_fn.channels, d)
    model.config = cfg
    return model


def load_pretrained(name_or_path, revision="main", dtype=torch.float32):
    """GPTNeoX.from_pretrained for any checkpoint, modal students (config.json hyena.modal_state) too: what every
    script given a checkpoint loads it with."""
    model = build(read_config(resolve_file(name_or_path, "config.json", revision)))
    return load_weights(model, name_or_path, revision).to(dtype)


@torch.no_grad()
def to_modal(model, state_size=16, tol=None, max_state=64, refine_steps=0):
    """A new GPTNeoX whose Hyena layers' long filters are d decaying complex modes each (Laughing Hyena
    Distillery, Massaroli et al. 2023, arXiv 2310.18780): constant-size recurrent decoding, any length.

    Every Hyena layer's filter is materialised at the model's l_max and fitted by fit.fit (ERA poles,
    least-squares residues, `refine_steps` Adam steps on the filter error); h(0) and the skip D are kept exactly,
    all other weights are copied. state_size=d fixes d for every layer; state_size=None with tol picks per layer
    the smallest d in 1, 2, 4, ... max_state whose relative filter error is <= tol. The result's `modal_fit`
    attribute lists per Hyena layer {"layer", "state_size", "rel_error" (||h - h_modal|| / ||h|| over the layer),
    "max_channel_error"}; its config's hyena_modal_state says d per layer (0 for attention layers).
    """
    cfg = model.config
    hyena = [i for i, m in enumerate(cfg.mixers) if m == "hyena"]
    if not hyena:
        raise ValueError("to_modal needs a model with Hyena layers (a distilled student); this one is all attention")
    if (state_size is None) == (tol is None):
        raise ValueError(f"to_modal takes either state_size (d for every layer) or tol (d per layer from the "
                         f"fit error), not both or neither: got state_size={state_size}, tol={tol}")
    if state_size is not None and state_size < 1:
        raise ValueError(f"to_modal: state_size must be >= 1, got {state_size}")
    fits = {}
    for i in hyena:
        h = model.gpt_neox.layers[i].hyena.filter_fn(cfg.l_max)  # (l_max, channels)
        fits[i] = (fit.fit(h, state_size, refine_steps) if tol is None
                   else fit.fit_tol(h, tol, max_state, refine_steps))
    states = [fits[i].state_size if i in fits else 0 for i in range(cfg.num_hidden_layers)]
    param = next(model.parameters())
    with param.device:
        out = build(replace(cfg, hyena_modal_state=states)).to(param.dtype)
    theirs, mine = model.state_dict(), out.state_dict()
    shared = {k: v for k, v in theirs.items()  # all but the implicit filters; their skip D (`bias`) stays
              if k in mine and (".filter_fn." not in k or k.endswith(".filter_fn.bias"))}
    missing, _ = out.load_state_dict(shared, strict=False)
    assert all(".filter_fn." in k for k in missing), missing
    for i, f in fits.items():
        filt = out.gpt_neox.layers[i].hyena.filter_fn
        for name in ("h0", "log_decay", "angle", "residues"):
            getattr(filt, name).copy_(getattr(f, name))
    out.modal_fit = [{"layer": i, "state_size": f.state_size, "rel_error": f.rel_error,
                      "max_channel_error": f.channel_error.max().item()} for i, f in fits.items()]
    return out.train(model.training)


def convert(teacher, label, state_size, tol, max_state, refine_steps, out=None):
    """distill.py --modal-state / --modal-tol: to_modal of the teacher (a conv Hyena student, `label` as the user
    named it); the per-layer filter errors printed and written to out/modal_fit.json (out: None on other ranks)."""
    try:
        student = to_modal(teacher, state_size=state_size or None, tol=tol or None, max_state=max_state,
                           refine_steps=refine_steps)
    except ValueError as e:
        raise ValueError(f"--teacher {label}: {e}") from None
    if out is not None:
        for f in student.modal_fit:
            print(f"distill: modal layer {f['layer']}: d={f['state_size']}, filter rel error {f['rel_error']:.2e} "
                  f"(worst channel {f['max_channel_error']:.2e})", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "modal_fit.json", json.dumps({"teacher": str(label), "layers": student.modal_fit},
                                                       indent=2))
    return student
