"""GPT-NeoX (Pythia) and its Hyena student, in plain PyTorch, read top to bottom.

The teacher is EleutherAI's GPT-NeoX exactly as `transformers.GPTNeoXForCausalLM` computes it (parameter
names are HF's, so checkpoints load by name). The student is the same network with some or all attention
blocks replaced by the Hyena operator (Poli et al. 2023, arXiv 2302.10866), as in "Scavenging Hyena"
(arXiv 2401.17574). The operator mirrors safari's `standalone_hyena.py` (HazyResearch/safari). In order:
attention, the Hyena operator (the FFT convolution, the short convolution, the implicit filter, the operator and
its decoding step), the network with its loss, `generate` and checkpoints, `make_student`. Activations are
time-major (B, L, D); the configuration is config.py's. What cached decoding keeps per layer lives in
lib/decoding.py, the modal student (its filter, its decoding state, and `to_modal`) in lib/modal_student.py.

The speed work lives in fast/ and computes the same functions: the FFT convolution with a hand-written
backward (fast/fftconv.py), the fused chunked head loss (fast/losses.py), the Triton kernels of decoding (the
long-conv step, the modal prefill's state scan) and the CUDA-graph step (fast/decode.py). It is switched in by
ONE call, `fast.enable(on)` (True: everywhere, False: nowhere, None: the default), read by `fast.active(tensor)`
at each place that could take it; by default it is on for CUDA tensors, so GPU users keep the speed, and off on
the CPU, where the plain code runs. train.py's training loop switches it on for its run on any device unless it
was switched off (on the CPU the fused loss keeps each step's memory on the heap). A CPU test holds each fast
path to its plain twin (tests/test_hyena_operator.py, tests/test_losses.py, tests/test_modal.py).

Glossary (code name -> paper symbol, Hyena paper section 3):
  x0, x1, ... x_{N-1}, v   projections of the input u (x^n and v in the paper; N = `order`)
  short_filter             the depthwise causal convolution (kernel 3) applied to every projection
  k / HyenaFilter          the implicit long filter h^n(t) = FFN(PositionalEmbedding(t)) * Window(t)
  bias                     the per-channel skip term D in y = h * u + D u
  z                        the input of a long convolution (x^n ⊙ z^n), cached for decoding
  pos_emb.z                the filter's positional embedding table z(t) (safari's name; not the above)
  l_max                    the longest sequence the filter is defined for (t = 0 .. l_max-1)
  ModalFilter              h as d decaying complex modes per channel (Laughing Hyena; lib/modal_student.py, the
                           convention lib/modal.py's): any length, and decoding by a (B, channels, d) recurrence
                           state (ModalState) instead of z history (HyenaState, lib/decoding.py)
"""
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import fast
import fast.decode
import fast.fftconv
import fast.losses
from config import Config
from fast.fftconv import fft_size
from lib.cli import write_atomic
from lib.decoding import AttentionState, HyenaState, new_cache
from lib.modal_student import ModalFilter, ModalState
from lib.safetensors_io import write_safetensors

# ----------------------------------------------------------------------------- attention (the teacher)

def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """GPT-NeoX attention with rotary embeddings on the first rotary_ndims = int(head_dim * rotary_pct) dims.
    As in transformers, the frequencies are base^(-i / rotary_ndims) for even i < rotary_ndims, each rotating a
    pair of dims: an odd rotary_ndims rotates 2 * ceil(rotary_ndims / 2) dims (one more). RoPE scaling: "linear"
    divides the frequencies by the factor; "dynamic" (NTK) raises the base with the current sequence length S
    (the last position + 1): base * (factor * S / max_pos - (factor - 1)) ** (r / (r - 2)) once S > max_pos.
    In cached decoding S grows with each token and the cached keys keep the rotation they were made with, as in
    transformers. (transformers' module also remembers the longest S it has seen until a short input resets it;
    here the frequencies depend on the current call alone, which is what a fresh transformers model computes.)"""
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

    def frequencies(self, seq_len):
        """The rotary frequencies for a call whose last position is seq_len - 1 (an int or a device tensor)."""
        if self.rope_type != "dynamic":
            return self.inv_freq
        exps = torch.arange(0, self.rot, 2, dtype=torch.float32, device=self.inv_freq.device) / self.rot
        s = torch.as_tensor(seq_len, device=self.inv_freq.device).clamp(min=self.max_pos)  # no host sync
        base = self.base * (self.factor * s / self.max_pos - (self.factor - 1)) ** (self.rot / (self.rot - 2))
        return 1.0 / base ** exps  # (ceil(rot/2),) in fp32 as transformers computes it

    def forward(self, x, cache=None, layer=0):
        """x (B, L, D) -> (B, L, D). With a decoding `cache` (lib/decoding.Cache): the prefill from position 0 while
        cache.layers[layer] is None (it fills it), then steps of any length from cache.pos."""
        B, L, D = x.shape
        pos = cache.pos if cache is not None else 0
        qkv = self.query_key_value(x).view(B, L, self.n_head, 3 * self.head_dim)  # per-head [q|k|v]
        q, k, v = qkv.transpose(1, 2).split(self.head_dim, dim=-1)  # (B, H, L, hd) each
        t = (pos + torch.arange(L, device=x.device)).float()  # (L,) positions
        freqs = torch.outer(t, self.frequencies(pos + L))  # (L, r/2), r = 2 * ceil(rot/2) dims rotated
        emb = torch.cat((freqs, freqs), dim=-1)  # (L, r)
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        r = emb.shape[-1]
        q = torch.cat((q[..., :r] * cos + rotate_half(q[..., :r]) * sin, q[..., r:]), -1)
        k = torch.cat((k[..., :r] * cos + rotate_half(k[..., :r]) * sin, k[..., r:]), -1)
        state = cache.layers[layer] if cache is not None else None
        if state is None:  # no cache, or the prefill: plain causal attention over the prompt (flash kernel, no mask)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None or L > 1)  # (B, H, L, hd)
            if cache is not None:  # keep its keys and values in a preallocated KV cache
                cache.layers[layer] = AttentionState.prefill(k, v, cache.max_len)
        else:  # decoding: fixed shapes, no host sync, so a CUDA graph can capture it
            y = state.attend(q, k, v, pos)  # (B, H, L, hd)
        return self.dense(y.transpose(1, 2).reshape(B, L, D))


# ----------------------------------------------------------------------------- the Hyena operator

def fftconv(u, k, bias):
    """Causal long convolution y_t = sum_{s<=t} k_{t-s} u_s + bias * u_t, by FFT of size >= 2L along time,
    differentiated by autograd (fast.fftconv.fftconv computes the same with a hand-written backward).

    u (B, L, D), k (L, D), bias (D,). Runs in fp32 (fp64 if given fp64) even under bf16 autocast: torch.fft
    rejects bf16, and fp16/bf16 FFTs lose too much precision over long sequences.
    """
    L, dtype = u.shape[1], torch.promote_types(u.dtype, torch.float32)
    n = fft_size(2 * L)  # >= 2L, a length FFTs are fast on: the zero padding makes the circular convolution linear
    with torch.autocast(u.device.type, enabled=False):
        u32 = u.to(dtype)
        k_f = torch.fft.rfft(k.to(dtype), n=n, dim=0)  # (n/2+1, D), once for the whole batch
        y = torch.fft.irfft(torch.fft.rfft(u32, n=n, dim=1) * k_f, n=n, dim=1)[:, :L]  # (B, L, D)
        return (y + u32 * bias.to(dtype)).to(u.dtype)


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
        """u (B, L, D) -> (B, L, D): for n = N-1 down to 1, v <- h * (x_n ⊙ v) + D (x_n ⊙ v) (a long convolution
        and its skip term), then y = out_proj(x0 ⊙ v).
        With a decoding `cache` (lib/decoding.Cache): the prefill from position 0 while cache.layers[layer] is
        None (it fills it), then one token at a time (`step`)."""
        B, L, D = u.shape
        if cache is not None and cache.layers[layer] is not None:
            return self.step(u, cache, layer)
        p = self.in_proj(u)  # (B, L, (N+1)D)
        pc = short_conv(p, self.short_filter.weight, self.short_filter.bias)  # (B, L, (N+1)D) sees t-2..t
        *x, v = pc.split(D, dim=-1)  # N gates x (B, L, D), value v (B, L, D)
        conv = fast.fftconv.fftconv if fast.active(u) else fftconv  # one function; fast/ computes it faster
        # A prefill keeps the filter up to max_len (decoding reads it there); a modal one needs only the prompt's.
        k, bias = self.filters(cache.max_len if cache is not None and not self.modal else L)
        zs = []  # every long convolution's input, which a prefill remembers for decoding
        for o, x_i in enumerate(reversed(x[1:])):
            zs.append(v * x_i)  # (B, L, D)
            v = conv(zs[o], k[:L, o], bias[o])  # (B, L, D)
        if cache is not None:  # the prefill: the layer's decoding state (lib/decoding.py, lib/modal_student.py)
            state = ModalState if self.modal else HyenaState
            cache.layers[layer] = state.prefill(self, p, zs, k, bias, cache.max_len)
        return self.out_proj(v * x[0])  # (B, L, D)

    def step(self, u, cache, layer):
        """One token at position cache.pos (a device tensor; fixed shapes, so a CUDA graph can capture it): the
        short conv from the cached tail, then each long conv from the layer's state: HyenaState's z history
        against the filter reversed from pos, or ModalState's recurrences."""
        B, L, D = u.shape
        if L != 1:
            raise ValueError(f"Hyena decoding takes one token at a time after the prefill, got {L}")
        state = cache.layers[layer]
        window = torch.cat([state.tail, self.in_proj(u).to(state.tail.dtype)], dim=1)  # (B, K, (N+1)D)
        state.tail.copy_(window[:, 1:])
        pc = short_conv(window, self.short_filter.weight, self.short_filter.bias)[:, -1]  # (B, (N+1)D)
        *x, v = pc.split(D, dim=-1)  # (B, D) each
        for o, x_i in enumerate(reversed(x[1:])):
            v = state.long_conv(o, v * x_i, cache.pos)  # (B, D)
        return self.out_proj(v * x[0])[:, None]  # (B, 1, D)


# ----------------------------------------------------------------------------- the network

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))  # exact-erf GELU, as GPT-NeoX


class Block(nn.Module):
    def __init__(self, cfg, mixer, modal_state=0):
        super().__init__()
        self.mixer, self.parallel = mixer, cfg.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        if mixer == "attention":  # attribute names are HF's, so `gpt_neox.layers.N.attention.*` loads by name
            self.attention = Attention(cfg)
        else:
            self.hyena = HyenaOperator(cfg.hidden_size, cfg.l_max, cfg.hyena_order, cfg.hyena_filter_order,
                                       cfg.hyena_emb_dim, filter_lr=cfg.hyena_filter_lr, modal_state=modal_state)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, layer=0):
        a = getattr(self, self.mixer)(self.input_layernorm(x), cache, layer)  # (B, L, D)
        if self.parallel:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + a + self.mlp(self.post_attention_layernorm(x))
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTNeoX(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.gpt_neox = nn.Module()
        self.gpt_neox.embed_in = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.gpt_neox.layers = nn.ModuleList(Block(cfg, m, d) for m, d in zip(cfg.mixers, cfg.hyena_modal_state))
        self.gpt_neox.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.embed_out = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for name, m in self.named_modules():  # GPT-NeoX's N(0, initializer_range); the filter keeps torch's
            if isinstance(m, (nn.Linear, nn.Embedding)) and ".filter_fn." not in name:  # (sin FFN needs it)
                nn.init.normal_(m.weight, std=cfg.initializer_range)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

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
        else None. On the fast path the loss is fast.losses.head_loss, fused with its gradient, which never holds
        the (B, L, V) logits: it returns (None, loss). With `cache` (a lib/decoding.Cache, see generate) it
        decodes on from cache.pos, advances it, and returns the last position's logits."""
        x = self.gpt_neox.embed_in(idx)  # (B, L, D)
        for i, block in enumerate(self.gpt_neox.layers):
            x = block(x, cache, i)
        if cache is not None:  # decoding needs only the last position's logits: (B, 1, V), not (B, L, V)
            cache.advance(idx.shape[1])
            x = x[:, -1:]
        if targets is not None and fast.active(x):  # the same loss without materialising (B, L, V) logits
            return None, fast.losses.head_loss(self, x, targets)
        logits = self.head(x)  # (B, L, V)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, cuda_graph=None, stop=None):
        """Sample max_new_tokens after idx (B, T); temperature 0 is greedy. Caches make each step O(T D); on the
        fast path the step is a CUDA graph (cuda_graph=None: when idx is on CUDA and fast.active(idx)). stop(idx)
        -> True ends it early (called after every new token with everything so far, e.g. to look for stop strings)."""
        cache = new_cache(self, idx.shape[1] + max_new_tokens)
        logits, _ = self(idx, cache=cache)
        graphed = (idx.is_cuda and fast.active(idx) if cuda_graph is None else cuda_graph) and max_new_tokens > 1
        step = lambda tokens: self(tokens, cache=cache)[0]  # noqa: E731 (one cached step: (B, 1) -> (B, 1, V))
        if graphed:  # the same step replayed from a CUDA graph (fast/decode.py)
            step = fast.decode.graphed_step(self, cache, idx.shape[0])
        for _ in range(max_new_tokens):
            logits = logits[:, -1].float()  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
            if stop is not None and stop(idx):
                break
            if idx.shape[1] < cache.max_len:
                logits = step(nxt)
        return idx

    def optim_groups(self, weight_decay, lr):
        """AdamW groups, one per (weight decay, lr): decay on matrices and embeddings only; the Hyena filters'
        parameters take the settings their operator gives (HyenaOperator.optim_settings)."""
        own = {}
        for m in self.modules():
            if isinstance(m, HyenaOperator):
                own.update(m.optim_settings())
        groups = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            hint = {"weight_decay": weight_decay if p.dim() >= 2 else 0.0, "lr": lr, **own.get(p, {})}
            groups.setdefault((hint["weight_decay"], hint["lr"]), []).append(p)
        return [{"params": ps, "weight_decay": wd, "lr": glr} for (wd, glr), ps in groups.items()]

    # ------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, name_or_path, revision="main", dtype=torch.float32):
        """Load a local directory or a hub repo (any revision) holding config.json + safetensors weights, by HF's
        parameter names (lib/checkpoint.read_pretrained checks every tensor's name and shape)."""
        from hub import resolve_file  # here, not at the top: the model needs no HTTP client
        from lib.checkpoint import read_pretrained
        model = cls(Config.from_file(resolve_file(name_or_path, "config.json", revision)))
        state = read_pretrained(name_or_path, revision, model.state_dict(), model.config.mixers)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:  # e.g. the filter's shared Sin given different frequencies
            raise ValueError(f"{name_or_path}@{revision}: {e}") from None
        return model.to(dtype)

    def save_pretrained(self, out_dir, metadata=None):
        """config.json + model.safetensors, readable by from_pretrained and (pure attention) transformers."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        write_safetensors(out / "model.safetensors", tensors, {"format": "pt", **(metadata or {})})
        write_atomic(out / "config.json", json.dumps(self.config.to_hf(), indent=2))


# ----------------------------------------------------------------------------- the student

def make_student(teacher, layers=None, init="teacher", order=None, l_max=None, filter_lr=None):
    """The teacher with attention replaced by Hyena in `layers` (all by default); all else copied exactly.

    init="teacher" fills Hyena's projections from the attention they replace, reading Hyena as a gated
    linear recurrence y_t = x0_t * sum_s h_{t-s} (x1_s * v_s): the post-gate x0 plays the query (C in
    SSM terms), the pre-gate x1 the key (B), v the value, and out_proj the output `dense` (as MOHAWK and
    "The Mamba in the Llama" map attention to SSMs). The short filter starts as the identity, so at
    initialisation every projection the MLP and the residual stream see is the teacher's own.
    order / l_max / filter_lr override the teacher config's Hyena settings (None keeps them).
    """
    cfg = teacher.config
    n = cfg.num_hidden_layers
    layers = list(range(n)) if layers is None else sorted(set(layers))
    if any(not 0 <= i < n for i in layers):
        raise ValueError(f"layers {layers} out of range for a {n}-layer teacher")
    if init not in ("teacher", "random"):
        raise ValueError(f"init must be 'teacher' or 'random', got {init!r}")
    mixers = ["hyena" if i in layers else m for i, m in enumerate(cfg.mixers)]
    hyena = {f"hyena_{k}": v for k, v in dict(order=order, l_max=l_max, filter_lr=filter_lr).items() if v is not None}
    student = GPTNeoX(Config(**{**asdict(cfg), **hyena, "mixers": mixers})).to(next(teacher.parameters()).device)
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
    # in_proj rows are [x0, x1, ..., x_{N-1}, v]: x0 <- q, every other gate <- k, v <- v
    src = [0] + [1] * (N - 1) + [2]
    hy.in_proj.weight.copy_(torch.cat([w[s] for s in src]))
    b = att.query_key_value.bias  # None under attention_bias false: the projections start without offsets
    b = w.new_zeros(3, D) if b is None else b.view(H, 3, hd).transpose(0, 1).reshape(3, D)
    hy.in_proj.bias.copy_(torch.cat([b[s] for s in src]))
    hy.out_proj.weight.copy_(att.dense.weight)
    hy.out_proj.bias.copy_(att.dense.bias if att.dense.bias is not None else torch.zeros_like(hy.out_proj.bias))
    hy.short_filter.weight.zero_()
    hy.short_filter.weight[..., -1] = 1.0  # identity: the last tap multiplies the current position
    hy.short_filter.bias.zero_()
