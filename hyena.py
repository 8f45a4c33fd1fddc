"""GPT-NeoX (Pythia) and its Hyena student, in plain PyTorch, in one file read top to bottom.

The teacher is EleutherAI's GPT-NeoX exactly as `transformers.GPTNeoXForCausalLM` computes it (parameter names
are HF's, so checkpoints load by name). The student is the same network with some or all attention blocks
replaced by the Hyena operator (Poli et al. 2023, arXiv 2302.10866), as in "Scavenging Hyena" (arXiv 2401.17574);
the operator and its implicit filter are safari's `standalone_hyena.py` (HazyResearch/safari), name for name.
Activations are time-major: (B, L, D) = (batch, positions, channels).

Glossary (code name -> paper symbol, Hyena paper section 3):
  x0, x1, ... x_{N-1}, v   projections of the input u (x^n and v in the paper; N = `order`)
  short_filter             the depthwise causal convolution (kernel 3) applied to every projection
  k / HyenaFilter          the implicit long filter h^n(t) = FFN(PositionalEmbedding(t)) * Window(t)
  bias                     the per-channel skip term D in y = h * u + D u
  z                        the input of a long convolution (x^n ⊙ z^n), kept for decoding
  pos_emb.z                the filter's positional embedding table z(t) (safari's name; not the above)
  l_max                    the longest sequence the filter is defined for (t = 0 .. l_max-1)

What this file leaves out, and where it is:
  speed        fast/: the same functions, faster (Triton kernels for the long convolution, its gates, decoding and
               the draw; the loss fused in chunks; CUDA graphs), put in from outside by `fast.install(model)`.
  modal        modal/: Laughing Hyena's filters of d modes, decoded by a recurrence (Config.hyena_modal_state).
  checkpoints  from_pretrained / save_pretrained import the project's checked reader and writer when called
               (pretrained/, hub.py), as nanoGPT's from_pretrained imports transformers.
  training     train.py, finetune.py, distill.py. Also absent: dropout, padding masks (a batch's rows share a
               length), tied embeddings, RoPE scalings other than linear and dynamic (NTK).
"""
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

MIXERS = ("attention", "hyena")
ROPE_TYPES = ("default", "linear", "dynamic")

# ----------------------------------------------------------------------------- the configuration

@dataclass
class Config:
    """GPT-NeoX's fields under HF's names (config.json maps across), plus the student's mixers and Hyena settings."""
    vocab_size: int = 50304
    hidden_size: int = 512                # D
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int = 2048         # the MLP's width
    max_position_embeddings: int = 2048   # the longest context attention was trained at (RoPE runs past it)
    rotary_pct: float = 0.25              # the share of each head's dims that RoPE rotates
    rotary_emb_base: float = 10000.0
    rope_type: str = "default"            # "default" | "linear" | "dynamic" (NTK), as transformers' rope_parameters
    rope_factor: float = 1.0              # the scaling factor of linear / dynamic RoPE
    attention_bias: bool = True           # query_key_value and dense carry biases
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True    # x + attn(ln1(x)) + mlp(ln2(x)), Pythia's; False: one after the other
    mixers: list = field(default_factory=list)  # per layer "attention" | "hyena"; empty = all attention
    hyena_order: int = 2                  # N: projections gated in; N-1 long convolutions
    hyena_filter_order: int = 64          # width of the implicit filter's FFN
    hyena_emb_dim: int = 33               # the filter's positional embedding size (1 + 2 * bands), odd
    hyena_l_max: int = 0                  # the filter's length; 0 = max_position_embeddings
    hyena_filter_lr: float = 0.0          # own learning rate of the filters; 0 = the run's
    hyena_modal_state: list = field(default_factory=list)  # per layer: 0 implicit filter, d > 0 d modes (modal/)

    def __post_init__(self):
        n = self.num_hidden_layers
        self.mixers = list(self.mixers) or ["attention"] * n
        if len(self.mixers) != n or any(m not in MIXERS for m in self.mixers):
            raise ValueError(f"Config.mixers must list {n} entries from {MIXERS}, got {self.mixers}")
        self.hyena_modal_state = list(self.hyena_modal_state) or [0] * n
        if len(self.hyena_modal_state) != n:
            raise ValueError(f"Config.hyena_modal_state (config.json hyena.modal_state) must list {n} entries, one "
                             f"per layer, got {self.hyena_modal_state}")
        for i, (d, m) in enumerate(zip(self.hyena_modal_state, self.mixers)):
            if isinstance(d, bool) or not isinstance(d, int) or d < 0 or (d and m != "hyena"):
                raise ValueError(f"Config.hyena_modal_state[{i}] = {d!r}: each entry is an int, 0 (implicit "
                                 f"filter) or d > 0 (d modes) on a Hyena layer only; layer {i} is {m!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        if self.rope_type != "default" and not (isinstance(self.rope_factor, (int, float)) and self.rope_factor >= 1):
            raise ValueError(f"the RoPE factor must be a number >= 1 for {self.rope_type} RoPE, got {self.rope_factor!r}")
        head_dim = self.hidden_size // self.num_attention_heads
        rot = int(head_dim * self.rotary_pct)
        if rot % 2 and rot == head_dim:  # transformers rotates 2 * ceil(rot / 2) dims: one more than the head has
            raise ValueError(f"rotary_pct {self.rotary_pct} gives an odd rotary dimension {rot} equal to the head "
                             f"size {head_dim}; transformers fails on it too. Use an even rotary dimension")
        if self.rope_type == "dynamic" and rot <= 2:  # transformers divides by rot - 2
            raise ValueError(f"dynamic RoPE needs more than 2 rotary dimensions, rotary_pct {self.rotary_pct} "
                             f"gives {rot}")

    @property
    def l_max(self):
        return self.hyena_l_max or self.max_position_embeddings

    @property
    def filter_context(self):
        """The longest sequence the model computes: l_max while a Hyena layer has an implicit filter, else None."""
        conv = any(m == "hyena" and d == 0 for m, d in zip(self.mixers, self.hyena_modal_state))
        return self.l_max if conv else None

    @property
    def native_context(self):
        """The longest context the model is native to (None: any): max_position_embeddings with attention layers
        (past it RoPE extrapolates), l_max with implicit filters; modal filters have no limit."""
        limits = [self.max_position_embeddings] if "attention" in self.mixers else []
        limits += [self.filter_context] if self.filter_context is not None else []
        return min(limits) if limits else None


# ----------------------------------------------------------------------------- attention (the teacher's mixer)

def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """`transformers.GPTNeoXAttention`: causal, with rotary embeddings on the first int(head_dim * rotary_pct) dims
    of each head (an odd count rotates one more, as transformers). "linear" RoPE divides the frequencies by the
    factor; "dynamic" (NTK) raises the base once the length S passes max_pos, for that call alone (a fresh
    transformers model's behaviour); cached keys keep the rotation they were made with."""
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        self.rot = int(self.head_dim * cfg.rotary_pct)  # transformers' rotary_ndims
        self.base, self.rope_type, self.factor = cfg.rotary_emb_base, cfg.rope_type, cfg.rope_factor
        self.max_pos = cfg.max_position_embeddings
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)
        inv_freq = 1.0 / self.base ** (torch.arange(0, self.rot, 2, dtype=torch.float32) / self.rot)
        if self.rope_type == "linear":
            inv_freq = inv_freq / self.factor
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (ceil(rot/2),)
        self.cached_attention = cached_attention  # decoding's attention (fast.install: one Triton kernel)

    def frequencies(self, seq_len):
        """The rotary frequencies of a call whose last position is seq_len - 1 (an int or a device tensor)."""
        if self.rope_type != "dynamic":
            return self.inv_freq
        exps = torch.arange(0, self.rot, 2, dtype=torch.float32, device=self.inv_freq.device) / self.rot
        s = torch.as_tensor(seq_len, device=self.inv_freq.device).clamp(min=self.max_pos)  # no host sync
        base = self.base * (self.factor * s / self.max_pos - (self.factor - 1)) ** (self.rot / (self.rot - 2))
        return 1.0 / base ** exps  # (ceil(rot/2),) in fp32 as transformers computes it

    def forward(self, x, cache=None, layer=0):
        """x (B, L, D) -> (B, L, D). With a decoding `cache`: the prefill from position 0 while cache.layers[layer]
        is None (it fills it), then steps of any length from cache.pos."""
        B, L, D = x.shape
        pos = cache.pos if cache is not None else 0
        qkv = self.query_key_value(x).view(B, L, self.n_head, 3 * self.head_dim)  # per-head [q|k|v]
        q, k, v = qkv.transpose(1, 2).split(self.head_dim, dim=-1)  # (B, H, L, hd) each
        t = (pos + torch.arange(L, device=x.device)).float()  # (L,) positions
        freqs = torch.outer(t, self.frequencies(pos + L))  # (L, r/2), r = 2 * ceil(rot/2) dims rotated
        emb = torch.cat((freqs, freqs), dim=-1)  # (L, r)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        r = emb.shape[-1]
        q = torch.cat((q[..., :r] * cos + rotate_half(q[..., :r]) * sin, q[..., r:]), -1)  # (B, H, L, hd)
        k = torch.cat((k[..., :r] * cos + rotate_half(k[..., :r]) * sin, k[..., r:]), -1)  # (B, H, L, hd)
        state = cache.layers[layer] if cache is not None else None
        if state is None:  # no cache, or the prefill: plain causal attention over the prompt (flash kernel, no mask)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None or L > 1)  # (B, H, L, hd)
            if cache is not None:
                cache.layers[layer] = AttentionState.prefill(k, v, cache.max_len)
        else:  # decoding: fixed shapes, no host sync, so a CUDA graph can capture it
            y = self.cached_attention(state, q, k, v, pos)  # (B, H, L, hd)
        return self.dense(y.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


@dataclass
class AttentionState:
    """What an attention layer keeps for decoding: keys and values (B, H, max_len, hd), rotated as made."""
    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def prefill(cls, k, v, max_len):
        B, H, L, hd = k.shape
        state = cls(k.new_zeros(B, H, max_len, hd), v.new_zeros(B, H, max_len, hd))  # preallocated: fixed shapes
        state.k[:, :, :L], state.v[:, :, :L] = k, v
        return state

    def carried(self):
        return []  # what a step moves besides the positions it writes (a CUDA graph's warm-up restores it)


def cached_attention(state, q, k, v, pos):
    """q, k, v (B, H, L, hd) at pos.. (a device tensor) into the state's cache, each query against its past."""
    at = pos + torch.arange(q.shape[2], device=q.device)  # (L,) positions written
    state.k.index_copy_(2, at, k.to(state.k.dtype))
    state.v.index_copy_(2, at, v.to(state.v.dtype))
    mask = torch.arange(state.k.shape[2], device=q.device) <= at[:, None]  # (L, max_len): the past only
    return F.scaled_dot_product_attention(q, state.k.to(q.dtype), state.v.to(q.dtype), attn_mask=mask)


# ----------------------------------------------------------------------------- the implicit filter (section 3.3)

class Sin(nn.Module):
    """sin(w x) with a learnable frequency per channel: the implicit filter's activation."""
    def __init__(self, dim, w=1.0):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, dim))

    def forward(self, x):
        return torch.sin(self.freq * x)


class PositionalEmbedding(nn.Module):
    """z(t) = [t / (l_max-1), Re e^{-i f_b w_t}, Im e^{-i f_b w_t}] for t < l_max, w_t = 2 pi t / l_max, bands
    f_b = linspace(1e-4, bands-1, bands). As in safari, z is trainable with its own lr (`lr`) and no weight decay."""
    def __init__(self, emb_dim, l_max, lr=1e-5):
        super().__init__()
        bands = (emb_dim - 1) // 2
        # In fp64, rounded once (safari's fp32 is off by ~1e-5 in the top bands).
        t = torch.linspace(0, 1, l_max, dtype=torch.float64)[None, :, None]  # (1, L, 1)
        w = 2 * math.pi * torch.arange(l_max, dtype=torch.float64)[None, :, None] / l_max  # (1, L, 1)
        angle = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)[None, None] * w  # (1, L, bands)
        self.z = nn.Parameter(torch.cat([t, angle.cos(), -angle.sin()], dim=-1).float())  # (1, L, emb_dim)
        self.lr = lr
        self.register_buffer("t", t.float())

    def forward(self, L):
        return self.z[:, :L], self.t[:, :L]  # (1, L, emb_dim), (1, L, 1)


class ExponentialModulation(nn.Module):
    """The window exp(-|delta_c| t), delta_c = linspace(log(target) / slow_decay, log(target) / fast_decay): channel 0
    decays slowest (to `target` at t = slow_decay, past the sequence's end t = 1), the last fastest (a local filter)."""
    def __init__(self, channels, fast_decay=0.3, slow_decay=1.5, target=1e-2):
        super().__init__()
        deltas = torch.linspace(math.log(target) / slow_decay, math.log(target) / fast_decay, channels,
                                dtype=torch.float64)
        self.register_buffer("deltas", deltas.float()[None, None])  # (1, 1, C)

    def forward(self, t, h):
        return h * torch.exp(-t * self.deltas.abs())  # (1, L, C)


class HyenaFilter(nn.Module):
    """h(t) = FFN(PositionalEmbedding(t)) * Window(t) for `channels` channels, t < l_max: safari's parameters under
    safari's names (FFN = Linear, Sin, Linear, Sin, Linear, Sin, Linear without bias, the three Sin one module).
    On purpose unlike safari: bf16 / fp16 casts leave it fp32 (bf16 keeps ~640 of 2048 times distinct), and
    forward(L) refuses L > l_max (safari truncates silently). A prefill asks how far decoding reads it
    (`prefill_length`) and for the decoding state (`new_state`): the z history, stepped by `history_conv`."""
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
        self.history_conv = history_conv

    def forward(self, L):
        """The filter for lags 0..L-1 as (L, channels), fp32 (fp64 in an fp64 model): a prefix of the l_max one."""
        if L > self.l_max:
            raise ValueError(f"sequence length {L} exceeds the Hyena filter's l_max {self.l_max}; "
                             "build the model with a larger Config.hyena_l_max")
        z, t = self.pos_emb(L)  # (1, L, emb_dim), (1, L, 1)
        with torch.autocast(z.device.type, enabled=False):  # tiny, and feeds an fp32 FFT anyway
            return self.modulation(t, self.implicit_filter(z))[0]  # (L, C)

    def prefill_length(self, L, max_len):
        return max_len  # decoding reads the filter up to the cache's end

    def new_state(self, op, p, zs, k, bias, max_len):
        return HyenaState.prefill(op, p, zs, k, bias, max_len, self.history_conv)

    def _apply(self, fn, *args, **kwargs):
        """Casts to bf16 / fp16 leave the filter fp32 (see the class docstring); devices and fp64 follow."""
        def keep_fp32(t):
            out = fn(t)
            if t.is_floating_point() and out.dtype in (torch.bfloat16, torch.float16):
                return t.to(device=out.device, dtype=torch.float32)  # from t itself: nothing rounded
            return out
        return super()._apply(keep_fp32, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        """The shared Sin appears under three names: differing values (three separate activations) are refused."""
        super()._load_from_state_dict(state_dict, prefix, *args)
        names = [f"{prefix}implicit_filter.{i}.freq" for i in (1, 3, 5)]
        given = [state_dict[n] for n in names if n in state_dict]
        if any(not torch.equal(g, given[0]) for g in given[1:]):
            args[-1].append(f"{', '.join(names)} differ, but the filter shares one Sin (one frequency) across its "
                            "activations, as safari: the checkpoint was made with separate activations")


# ----------------------------------------------------------------------------- the Hyena operator

def fft_size(n):
    """Smallest 2^a * {1, 3} >= n: cuFFT and pocketfft are fastest on such sizes."""
    p = 1 << max(0, (n - 1).bit_length())
    return min(p, 3 * (p >> 2)) if p >= 4 and 3 * (p >> 2) >= n else p


def fftconv(u, k, bias):
    """Causal long convolution y_t = sum_{s<=t} k_{t-s} u_s + bias * u_t by FFT of size >= 2L (the zero padding
    makes it linear), differentiated by autograd; u (B, L, D), k (L, D), bias (D,). fp32 (fp64 if given) even under
    bf16 autocast: torch.fft rejects bf16, and half-precision FFTs lose too much over long sequences."""
    L, dtype = u.shape[1], torch.promote_types(u.dtype, torch.float32)
    n = fft_size(2 * L)
    with torch.autocast(u.device.type, enabled=False):
        u32 = u.to(dtype)
        k_f = torch.fft.rfft(k.to(dtype), n=n, dim=0)  # (n/2+1, D), once for the whole batch
        y = torch.fft.irfft(torch.fft.rfft(u32, n=n, dim=1) * k_f, n=n, dim=1)[:, :L]  # (B, L, D)
        return (y + u32 * bias.to(dtype)).to(u.dtype)


def short_conv(p, weight, bias):
    """Depthwise causal convolution of p (B, L, C) along time, weight (C, 1, K): nn.Conv1d(padding=K-1)[..., :L] on
    p.transpose(1, 2), as K shifted multiply-adds (no transposes; one fused kernel under torch.compile)."""
    K, L = weight.shape[-1], p.shape[1]
    w, b = weight[:, 0].to(p.dtype), bias.to(p.dtype)  # (C, K): stay in p's dtype (bf16 under autocast)
    out = p * w[:, K - 1] + b  # (B, L, C): the last tap multiplies the current position
    for j in range(1, K):  # tap K-1-j multiplies the input j steps back
        out = out + F.pad(p, (0, 0, j, 0))[:, :L] * w[:, K - 1 - j]
    return out


def history_conv(z, k_pad, pos):
    """One long convolution's output at position pos (a 0-dim device tensor) from its input history z (B, D, T):
    sum_{s<=pos} z[..., s] k[pos-s], k_pad (D, 2T-1) the filter reversed then zeros (k_pad[d, T-1-j] = k[j, d]).
    Fixed shapes, so a CUDA graph captures it: the whole history meets a window of k_pad (stale history, its zeros)."""
    T = z.shape[-1]
    kr = k_pad.index_select(1, torch.arange(T, device=z.device) + (T - 1 - pos))  # (D, T): k[pos..0], 0...
    return torch.bmm(z.transpose(0, 1), kr[..., None])[..., 0].transpose(0, 1)  # (B, D) per-channel dot products


def tail_of(p, kw):
    """The short convolution's last kw inputs (B, kw, C) after a prompt p (B, L, C), zeros before its start."""
    return F.pad(p, (0, 0, max(0, kw - p.shape[1]), 0))[:, -kw:].clone()


@dataclass
class HyenaState:
    """What a Hyena layer keeps for decoding: O(max_len D), so a step costs O(pos D)."""
    tail: torch.Tensor   # (B, K-1, (N+1)D) the short conv's last inputs
    z: list              # per long conv (B, D, max_len): its inputs so far, channels first (for bmm)
    k_pad: torch.Tensor  # (N-1, D, 2 max_len - 1): each filter reversed, then zeros (history_conv's layout)
    bias: torch.Tensor   # (N-1, D) the skip term D, in the model's dtype
    conv: object         # history_conv, or its fast twin

    @classmethod
    def prefill(cls, op, p, zs, k, bias, max_len, conv):
        """After the prompt: p (B, L, (N+1)D) the projections before the short conv, zs each long conv's input
        (B, L, D), k (max_len, N-1, D) and bias (N-1, D) the filters of HyenaOperator `op`."""
        (B, L, D), T = zs[0].shape, max_len
        z = [zs[0].new_zeros(B, D, T) for _ in zs]  # (B, D, T) each
        for hist, z_o in zip(z, zs):
            hist[..., :L] = z_o.transpose(1, 2)
        k_rev = k.flip(0).permute(1, 2, 0).to(zs[0].dtype)  # (N-1, D, T): k[T-1], ..., k[0]
        k_pad = F.pad(k_rev, (0, T - 1)).contiguous()  # (N-1, D, 2T-1)
        # The skip term in the model's dtype: in a bf16 model the filter itself stays fp32.
        return cls(tail_of(p, op.short_filter.kernel_size[0] - 1), z, k_pad, bias.to(op.in_proj.weight.dtype), conv)

    def long_conv(self, o, z, pos):
        """Long convolution o's output at position pos for its input there z (B, D), which joins the history."""
        hist = self.z[o]  # (B, D, T)
        hist.index_copy_(2, pos.view(1), z[..., None].to(hist.dtype))
        return self.conv(hist, self.k_pad[o], pos).to(hist.dtype) + z * self.bias[o]  # (B, D)

    def carried(self):
        return [self.tail]  # updated in place at every step (the history is written at the step's own position)


def mix(op, p, k, bias):
    """A Hyena layer between its projections: the short conv, v <- h_n * (x_n ⊙ v) + D_n (x_n ⊙ v) for n = N-1..1
    (op.long_conv; k, bias from op.filters), x0 ⊙ v. p (B, L, (N+1)D) -> (x0 ⊙ v, zs: each long conv's input)."""
    L = p.shape[1]
    pc = short_conv(p, op.short_filter.weight, op.short_filter.bias)  # (B, L, (N+1)D) sees t-2..t
    *x, v = pc.split(op.d_model, dim=-1)  # N gates x (B, L, D), value v (B, L, D)
    zs = []
    for o, x_i in enumerate(reversed(x[1:])):
        zs.append(v * x_i)  # (B, L, D)
        v = op.long_conv(zs[o], k[:L, o], bias[o])  # (B, L, D)
    return v * x[0], zs


def mix_step(op, state, p, pos):
    """A decoding step at pos (a device tensor: a CUDA graph captures it) from p (B, (N+1)D) the token's in_proj
    to x0 ⊙ v (B, D): the short conv from the state's tail (which keeps p), each long conv from its state."""
    window = torch.cat([state.tail, p[:, None].to(state.tail.dtype)], dim=1)  # (B, K, (N+1)D)
    state.tail.copy_(window[:, 1:])
    pc = short_conv(window, op.short_filter.weight, op.short_filter.bias)[:, -1]  # (B, (N+1)D)
    *x, v = pc.split(op.d_model, dim=-1)  # (B, D) each
    for o, x_i in enumerate(reversed(x[1:])):
        v = state.long_conv(o, v * x_i, pos)  # (B, D)
    return v * x[0]  # (B, D)


class HyenaOperator(nn.Module):
    """The Hyena operator of order N: u (B, L, D) -> (B, L, D). `long_conv` (fftconv), `mix` and `mix_step` are
    plain functions fast.install swaps for twins; `filter_fn` the long filter, a HyenaFilter (modal/: a ModalFilter)."""
    def __init__(self, d_model, l_max, order=2, filter_order=64, emb_dim=33, short_filter_order=3, filter_lr=0.0):
        super().__init__()
        if order < 2:
            raise ValueError(f"Hyena order must be >= 2 (one gate and one long convolution), got {order}")
        self.d_model, self.order = d_model, order
        self.filter_lr = filter_lr  # the long filter's own lr (0: the run's), which train.optim_groups reads
        self.in_proj = nn.Linear(d_model, (order + 1) * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        width = (order + 1) * d_model
        # An nn.Conv1d only to hold the (C, 1, K) weight under safari's name; short_conv() applies it.
        self.short_filter = nn.Conv1d(width, width, short_filter_order, groups=width, padding=short_filter_order - 1)
        self.filter_fn = HyenaFilter(d_model * (order - 1), l_max, emb_dim, filter_order)
        self.long_conv = fftconv
        self.mix = mix  # everything between the projections over a sequence (fast.install: fused kernels)
        self.mix_step = mix_step  # decoding's step between the projections (fast.install: a fused kernel)

    def filters(self, L):
        k = self.filter_fn(L).view(L, self.order - 1, self.d_model)  # (L, N-1, D)
        return k, self.filter_fn.bias.view(self.order - 1, self.d_model)  # (N-1, D)

    def forward(self, u, cache=None, layer=0):
        """out_proj(mix(in_proj(u))); with a `cache`, a prefill fills cache.layers[layer], then mix_step decodes."""
        L = u.shape[1]
        if cache is not None and cache.layers[layer] is not None:
            if L != 1:
                raise ValueError(f"Hyena decoding takes one token at a time after the prefill, got {L}")
            return self.out_proj(self.mix_step(self, cache.layers[layer], self.in_proj(u)[:, 0], cache.pos))[:, None]
        p = self.in_proj(u)  # (B, L, (N+1)D)
        # A prefill computes the filter as far as the layer's decoding state will read it.
        k, bias = self.filters(L if cache is None else self.filter_fn.prefill_length(L, cache.max_len))
        y, zs = self.mix(self, p, k, bias)  # (B, L, D), the long convolutions' inputs
        if cache is not None:  # the prefill: the filter makes the layer's decoding state
            cache.layers[layer] = self.filter_fn.new_state(self, p, zs, k, bias, cache.max_len)
        return self.out_proj(y)  # (B, L, D)


# ----------------------------------------------------------------------------- the network

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))  # (B, L, D); exact-erf GELU, as GPT-NeoX


class Block(nn.Module):
    def __init__(self, cfg, mixer):
        super().__init__()
        self.mixer, self.parallel = mixer, cfg.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if mixer == "attention":  # attribute names are HF's, so `gpt_neox.layers.N.attention.*` loads by name
            self.attention = Attention(cfg)
        else:
            self.hyena = HyenaOperator(cfg.hidden_size, cfg.l_max, cfg.hyena_order, cfg.hyena_filter_order,
                                       cfg.hyena_emb_dim, filter_lr=cfg.hyena_filter_lr)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, layer=0):
        a = getattr(self, self.mixer)(self.input_layernorm(x), cache, layer)  # (B, L, D)
        if self.parallel:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + a + self.mlp(self.post_attention_layernorm(x))
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


@dataclass
class Cache:
    """What cached decoding keeps: room for max_len positions; `pos`, the next token's position, ONE 0-dim int64
    tensor on the model's device, shared by every layer and advanced in place (a step never reads the host, so a
    CUDA graph can replay it); `layers[i]`, layer i's state (None until the prefill from position 0 fills it)."""
    max_len: int
    pos: torch.Tensor
    layers: list

    def advance(self, n):
        self.pos += n  # in place: the tensor a captured graph reads

    def nbytes(self):
        """Bytes the layers' states hold (KV, z history, modal states, the filters' copies), pos aside."""
        return sum(t.nbytes for s in self.layers if s is not None for v in vars(s).values()
                   for t in (v if isinstance(v, list) else [v]) if isinstance(t, torch.Tensor))


def new_cache(model, max_len):
    """An empty Cache for `model` with room for max_len positions, its position 0 on the model's device."""
    pos = torch.zeros((), dtype=torch.long, device=next(model.parameters()).device)
    return Cache(max_len, pos, [None] * len(model.gpt_neox.layers))


def sample(logits, temperature=1.0, top_k=None):
    """Next tokens (B, 1) from logits (B, V): argmax at temperature 0, else drawn from softmax(logits / T) over the
    top_k as torch.multinomial(probs, 1) draws (probs / Exp(1) noise, argmax) minus its host check: graph-safe."""
    if top_k is not None and top_k < 1:
        raise ValueError(f"sample: top_k {top_k}: keep at least 1 token, or None for all")
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1, keepdim=True)  # (B, 1)


def eager_step(model, cache, batch, pick):
    """generate's step after a prefill: tokens (B, 1) -> pick(next logits (B, V)) (fast/: a CUDA graph's replay)."""
    return lambda tokens: pick(model(tokens, cache=cache)[0][:, -1])


class GPTNeoX(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if any(cfg.hyena_modal_state):
            raise ValueError(f"hyena_modal_state {cfg.hyena_modal_state}: modal filters are modal/'s; build such a "
                             "model with modal.student.build(cfg), load one with modal.student.load_pretrained(path)")
        self.config = cfg
        self.gpt_neox = nn.Module()
        self.gpt_neox.embed_in = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.gpt_neox.layers = nn.ModuleList(Block(cfg, m) for m in cfg.mixers)
        self.gpt_neox.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.embed_out = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for name, m in self.named_modules():  # GPT-NeoX's N(0, initializer_range); the filter keeps torch's
            if isinstance(m, (nn.Linear, nn.Embedding)) and ".filter_fn." not in name:  # (sin FFN needs it)
                nn.init.normal_(m.weight, std=cfg.initializer_range)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        self.make_step = eager_step  # generate's decoding step (fast.install: a CUDA graph's replay)
        self.sample = sample  # generate's draw (fast.install: two Triton kernels)

    def head(self, x):
        return self.embed_out(self.gpt_neox.final_layer_norm(x))  # (B, L, V)

    def hidden_states(self, idx, n_layers=None):
        """[embedding output, output of layer 0, ..., of layer n_layers-1 (default all)], each (B, L, D)."""
        hs = [self.gpt_neox.embed_in(idx)]
        for block in self.gpt_neox.layers[:n_layers]:
            hs.append(block(hs[-1]))
        return hs

    def forward(self, idx, targets=None, cache=None):
        """idx (B, L) -> (logits (B, L, V), loss): with targets (B, L) the mean cross-entropy over targets != -1,
        else None. With a `cache` (generate's) it decodes on from cache.pos, advances it, and returns (B, 1, V)."""
        x = self.gpt_neox.embed_in(idx)  # (B, L, D)
        for i, block in enumerate(self.gpt_neox.layers):
            x = block(x, cache, i)  # (B, L, D)
        if cache is not None:
            cache.advance(idx.shape[1])
            x = x[:, -1:]  # (B, 1, D)
        logits = self.head(x)  # (B, L, V)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, stop=None, extrapolate=False):
        """Sample max_new_tokens after idx (B, T) (`sample`; temperature 0 is greedy). Caches make each step O(T D).
        stop(idx) -> True ends it early (called after each new token with all so far: a host read per token).
        Attention runs up to max_position_embeddings; extrapolate=True lets RoPE run past it (never trained at)."""
        T, limit = idx.shape[1] + max_new_tokens, self.config.max_position_embeddings
        if "attention" in self.config.mixers and T > limit and not extrapolate:
            raise ValueError(f"generate: {idx.shape[1]} prompt tokens + {max_new_tokens} new = {T} positions, past "
                             f"max_position_embeddings {limit}, the longest context this model's attention trained "
                             "at; shorten the prompt or max_new_tokens, or pass extrapolate=True to run RoPE past it")
        cache = new_cache(self, T)
        logits, _ = self(idx, cache=cache)  # (B, 1, V)
        pick = lambda logits: self.sample(logits, temperature, top_k)  # noqa: E731
        step = self.make_step(self, cache, idx.shape[0], pick)  # tokens (B, 1) -> the next ones: step and draw
        out = torch.cat([idx.long(), idx.new_empty(idx.shape[0], max_new_tokens, dtype=torch.long)], 1)  # new in place
        for n in range(idx.shape[1], T):
            nxt = pick(logits[:, -1]) if n == idx.shape[1] else step(nxt)  # (B, 1); no read of the device
            out[:, n] = nxt[:, 0]
            if stop is not None and stop(out[:, :n + 1]):
                return out[:, :n + 1].contiguous()
        return out

    @classmethod
    def from_pretrained(cls, name_or_path, revision="main", dtype=torch.float32):
        """A local folder or a hub repo (any revision) holding config.json + safetensors weights, by HF's names."""
        from pretrained.config import read_config  # the project's checked reading: the model itself needs none
        from hub import resolve_file
        from pretrained.weights import load_weights
        model = cls(read_config(resolve_file(name_or_path, "config.json", revision)))
        return load_weights(model, name_or_path, revision).to(dtype)

    def save_pretrained(self, out_dir, metadata=None):
        """config.json + model.safetensors, readable by from_pretrained and (pure attention) transformers."""
        import json
        from pathlib import Path
        from pretrained.config import to_hf  # the project's writers (atomic: a file is whole or absent)
        from cli import write_atomic
        from pretrained.safetensors import write_safetensors
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        write_safetensors(out / "model.safetensors", tensors, {"format": "pt", **(metadata or {})})
        write_atomic(out / "config.json", json.dumps(to_hf(self.config), indent=2))


# ----------------------------------------------------------------------------- the student

def make_student(teacher, layers=None, init="teacher", order=None, l_max=None, filter_lr=None):
    """The teacher with attention replaced by Hyena in `layers` (all by default); all else copied exactly.
    init="teacher" fills Hyena's projections from the attention they replace, reading Hyena as a gated linear
    recurrence y_t = x0_t * sum_s h_{t-s} (x1_s * v_s): the post-gate x0 plays the query (C in SSM terms), the
    pre-gate x1 the key (B), v the value, and out_proj the output `dense` (as MOHAWK and "The Mamba in the Llama"
    map attention to SSMs). The short filter starts as the identity, so at initialisation every projection the
    MLP and the residual stream see is the teacher's own. order / l_max / filter_lr override the teacher's (None)."""
    cfg = teacher.config
    n = cfg.num_hidden_layers
    layers = list(range(n)) if layers is None else sorted(set(layers))
    if any(not 0 <= i < n for i in layers):
        raise ValueError(f"layers {layers} out of range for a {n}-layer teacher")
    if init not in ("teacher", "random"):
        raise ValueError(f"init must be 'teacher' or 'random', got {init!r}")
    mixers = ["hyena" if i in layers else m for i, m in enumerate(cfg.mixers)]
    hyena = {f"hyena_{k}": v for k, v in dict(order=order, l_max=l_max, filter_lr=filter_lr).items() if v is not None}
    student = GPTNeoX(replace(cfg, **hyena, mixers=mixers)).to(next(teacher.parameters()).device)
    teacher_state = teacher.state_dict()
    own = {k for k in student.state_dict() if ".hyena." in k and k not in teacher_state}  # new Hyena tensors
    missing, _ = student.load_state_dict({k: v for k, v in teacher_state.items() if k not in own}, strict=False)
    assert set(missing) <= own, f"teacher lacks {set(missing) - own}"
    if init == "teacher":
        for i in layers:
            att = getattr(teacher.gpt_neox.layers[i], "attention", None)
            if att is None:  # already Hyena in the teacher: its trained weights were copied above
                continue
            _init_from_attention(student.gpt_neox.layers[i].hyena, att)
    return student


@torch.no_grad()
def _init_from_attention(hy, att):
    D, H, hd, N = hy.d_model, att.n_head, att.head_dim, hy.order
    w = att.query_key_value.weight.view(H, 3, hd, D).transpose(0, 1).reshape(3, D, D)  # [q, k, v] de-interleaved
    src = [0] + [1] * (N - 1) + [2]  # in_proj rows are [x0, x1, ..., x_{N-1}, v]: x0 <- q, other gates <- k, v <- v
    hy.in_proj.weight.copy_(torch.cat([w[s] for s in src]))
    b = att.query_key_value.bias  # None under attention_bias false: the projections start without offsets
    b = w.new_zeros(3, D) if b is None else b.view(H, 3, hd).transpose(0, 1).reshape(3, D)
    hy.in_proj.bias.copy_(torch.cat([b[s] for s in src]))
    hy.out_proj.weight.copy_(att.dense.weight)
    hy.out_proj.bias.copy_(att.dense.bias if att.dense.bias is not None else torch.zeros_like(hy.out_proj.bias))
    hy.short_filter.weight.zero_()
    hy.short_filter.weight[..., -1] = 1.0  # identity: the last tap multiplies the current position
    hy.short_filter.bias.zero_()
