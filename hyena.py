"""GPT-NeoX (Pythia) and its Hyena student, in plain PyTorch, read top to bottom.

The teacher is EleutherAI's GPT-NeoX exactly as `transformers.GPTNeoXForCausalLM` computes it (parameter
names are HF's, so checkpoints load by name). The student is the same network with some or all attention
blocks replaced by the Hyena operator (Poli et al. 2023, arXiv 2302.10866), as in "Scavenging Hyena"
(arXiv 2401.17574). The operator mirrors safari's `standalone_hyena.py` (HazyResearch/safari). In order:
the Hyena operator (the FFT convolution, the short convolution, the operator and its decoding step), the
network with its loss, `generate` and checkpoints, `make_student`. Activations are time-major (B, L, D); the
configuration is config.py's. The parts this file uses but does not spell out live in lib/: the teacher's
attention with its rotary embeddings (lib/attention.py), the operator's implicit filter (lib/implicit_filter.py),
what cached decoding keeps per layer (lib/decoding.py), and the modal student (modal/student.py: its
filter, its decoding state, and `to_modal`, which makes one from a trained student).

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
                           (lib/implicit_filter.py)
  bias                     the per-channel skip term D in y = h * u + D u
  z                        the input of a long convolution (x^n ⊙ z^n), cached for decoding
  pos_emb.z                the filter's positional embedding table z(t) (safari's name; not the above)
  l_max                    the longest sequence the filter is defined for (t = 0 .. l_max-1)
  ModalFilter              h as d decaying complex modes per channel (Laughing Hyena; modal/student.py, the
                           convention modal/fit.py's): any length, and decoding by a (B, channels, d) recurrence
                           state (ModalState) instead of z history (HyenaState, lib/decoding.py)
"""
import json
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
from lib.attention import Attention
from lib.cli import write_atomic
from lib.decoding import HyenaState, new_cache
from lib.implicit_filter import HyenaFilter
from modal.student import ModalFilter, ModalState
from lib.safetensors_io import write_safetensors

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


class HyenaOperator(nn.Module):
    def __init__(self, d_model, l_max, order=2, filter_order=64, emb_dim=33, short_filter_order=3, filter_lr=0.0,
                 modal_state=0):
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
        self.modal = modal_state > 0  # a ModalFilter: decoded by its recurrence, not by the z history
        self.filter_fn = (ModalFilter(d_model * (order - 1), modal_state) if self.modal
                          else HyenaFilter(d_model * (order - 1), l_max, emb_dim, filter_order))

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
        if cache is not None:  # the prefill: the layer's decoding state (lib/decoding.py, modal/student.py)
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
