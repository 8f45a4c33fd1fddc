"""GPT-NeoX (Pythia) and its Hyena student.

The teacher is EleutherAI's GPT-NeoX exactly as `transformers.GPTNeoXForCausalLM` computes it (parameter
names are HF's, so checkpoints load by name). The student is the same network with some or all attention
blocks replaced by the Hyena operator (Poli et al. 2023, arXiv 2302.10866), as in "Scavenging Hyena"
(arXiv 2401.17574). The operator mirrors safari's `standalone_hyena.py` (HazyResearch/safari).

The Hyena operator itself lives in hyena_operator.py (glossary of its names there), the configuration in
config.py; this file holds the network around them, checkpoints, and `make_student`.
"""
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib import modal
from lib.cli import write_atomic
from config import Config
from fast.decode import decode_step
from hyena_operator import HyenaOperator
from fast.losses import head_loss
from safetensors_io import read_safetensors, write_safetensors

# Buffers that HF checkpoints may carry but that we recompute: never persistent in this model.
IGNORED_SUFFIXES = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")
# Tensors of the Hyena filter that checkpoints from before it followed safari's convention lack.
SAFARI_FILTER_TENSORS = ("filter_fn.pos_emb.z", "filter_fn.pos_emb.t", "filter_fn.modulation.deltas")


# ----------------------------------------------------------------------------- the decoding cache

@dataclass
class Cache:
    """What cached decoding keeps (GPTNeoX.forward(idx, cache=...) fills and advances it; new_cache makes one):
    room for max_len positions; `pos`, the position the next token takes: ONE 0-dim int64 tensor on the model's
    device, shared by every layer and advanced in place, so a decoding step never reads the host and a CUDA
    graph can replay it (decode.graphed_step); `layers[i]`, what layer i's mixer keeps: None until the prefill
    (from position 0) fills it, then an AttentionState, a HyenaState or a ModalState."""
    max_len: int
    pos: torch.Tensor
    layers: list

    def advance(self, n):
        self.pos += n  # in place: the tensor a captured graph reads

    def nbytes(self):
        """Bytes the layers' states hold (KV, z history, modal states, the filters' copies), pos aside."""
        return sum(t.nbytes for s in self.layers if s is not None for v in vars(s).values()
                   for t in (v if isinstance(v, list) else [v]))


def new_cache(model, max_len):
    """An empty Cache for `model` with room for max_len positions, its position 0 on the model's device."""
    pos = torch.zeros((), dtype=torch.long, device=next(model.parameters()).device)
    return Cache(max_len, pos, [None] * len(model.gpt_neox.layers))


@dataclass
class AttentionState:
    """What an attention layer keeps for decoding: keys and values (B, H, max_len, hd), rotated as made."""
    k: torch.Tensor
    v: torch.Tensor

    def carried(self):
        return []  # nothing moves but the positions a step writes


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
        """x (B, L, D) -> (B, L, D). With a decoding `cache` (Cache): the prefill from position 0 while
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
                shape = (B, self.n_head, cache.max_len, self.head_dim)
                state = cache.layers[layer] = AttentionState(k.new_zeros(shape), v.new_zeros(shape))
                state.k[:, :, :L], state.v[:, :, :L] = k, v
        else:  # decoding: fixed shapes, no host sync, so a CUDA graph can capture it
            at = pos + torch.arange(L, device=x.device)  # (L,) positions written
            state.k.index_copy_(2, at, k.to(state.k.dtype))
            state.v.index_copy_(2, at, v.to(state.v.dtype))
            mask = torch.arange(cache.max_len, device=x.device) <= at[:, None]  # (L, max_len): the past only
            y = F.scaled_dot_product_attention(q, state.k.to(q.dtype), state.v.to(q.dtype), attn_mask=mask)
        return self.dense(y.transpose(1, 2).reshape(B, L, D))


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
        """idx (B, L) -> (logits (B, L, V), None), or with targets (B, L) -> (None, mean CE over targets != -1):
        training never holds the full logits (see FusedHeadLoss). With `cache` (a Cache, see new_cache and
        generate) it decodes on from cache.pos, advances it, and returns the last position's logits."""
        x = self.gpt_neox.embed_in(idx)  # (B, L, D)
        for i, block in enumerate(self.gpt_neox.layers):
            x = block(x, cache, i)
        if cache is not None:  # decoding needs only the last position's logits: (B, 1, V), not (B, L, V)
            cache.advance(idx.shape[1])
            x = x[:, -1:]
        if targets is not None:  # training: the loss without materialising (B, L, V) logits
            return None, head_loss(self, x, targets)
        return self.head(x), None  # (B, L, V)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, cuda_graph=None, stop=None):
        """Sample max_new_tokens after idx (B, T); temperature 0 is greedy. Caches make each step O(T D); on a
        GPU the step is a CUDA graph (cuda_graph=None: when idx is on CUDA). stop(idx) -> True ends it early
        (called after every new token with everything so far, e.g. to look for stop strings)."""
        cache = new_cache(self, idx.shape[1] + max_new_tokens)
        logits, _ = self(idx, cache=cache)
        graphed = idx.is_cuda if cuda_graph is None else cuda_graph
        step = decode_step(self, cache, idx.shape[0], graphed and max_new_tokens > 1)
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
        """Load a local directory or a hub repo (any revision) holding config.json + safetensors weights."""
        from hub import resolve_file  # here, not at the top: the model itself needs no HTTP client
        config_file = resolve_file(name_or_path, "config.json", revision)
        cfg = Config.from_file(config_file)
        model = cls(cfg)
        expected = model.state_dict()
        state = {}
        for path in _weight_files(name_or_path, revision):
            for key, t in read_safetensors(path).items():
                key = "embed_out.weight" if key == "lm_head.weight" else key
                if key.endswith(IGNORED_SUFFIXES):
                    continue
                if key not in expected:
                    raise ValueError(f"{path}: unexpected key {key!r} for a GPT-NeoX with mixers {cfg.mixers}")
                if t.shape != expected[key].shape:
                    raise ValueError(f"{path}: {key!r} has shape {list(t.shape)}, the config implies "
                                     f"{list(expected[key].shape)}")
                state[key] = t
        missing = sorted(set(expected) - set(state))
        if missing and all(k.endswith(SAFARI_FILTER_TENSORS) for k in missing):
            raise ValueError(f"{name_or_path}@{revision}: checkpoint lacks the Hyena filter's {missing[:3]}...: it was "
                             "written before the filter followed safari's convention (decay rates in the opposite "
                             "channel order, fixed positional embedding), so it would compute another function. "
                             "Retrain it with this version")
        if missing:
            raise ValueError(f"{name_or_path}@{revision}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
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


def _weight_files(name_or_path, revision):
    """model.safetensors, or the shards a model.safetensors.index.json names. Pickle files are refused."""
    from hub import HubError, resolve_file
    try:
        return [resolve_file(name_or_path, "model.safetensors", revision)]
    except (FileNotFoundError, HubError) as single_err:
        try:
            index = Path(resolve_file(name_or_path, "model.safetensors.index.json", revision))
        except (FileNotFoundError, HubError):
            raise FileNotFoundError(
                f"{name_or_path}@{revision} has neither model.safetensors nor model.safetensors.index.json "
                f"({single_err}). Only safetensors are loaded (pickle files are never unpickled); convert "
                "pytorch_model.bin with transformers' save_pretrained(safe_serialization=True)") from None
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [resolve_file(name_or_path, s, revision) for s in shards]


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


# ----------------------------------------------------------------------------- the modal student

@torch.no_grad()
def to_modal(model, state_size=16, tol=None, max_state=64, refine_steps=0):
    """A new GPTNeoX whose Hyena layers' long filters are d decaying complex modes each (Laughing Hyena
    Distillery, Massaroli et al. 2023, arXiv 2310.18780): constant-size recurrent decoding, any length.

    Every Hyena layer's filter is materialised at the model's l_max and fitted by modal.fit (ERA poles,
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
        fits[i] = (modal.fit(h, state_size, refine_steps) if tol is None
                   else modal.fit_tol(h, tol, max_state, refine_steps))
    states = [fits[i].state_size if i in fits else 0 for i in range(cfg.num_hidden_layers)]
    param = next(model.parameters())
    with param.device:
        out = GPTNeoX(Config(**{**asdict(cfg), "hyena_modal_state": states})).to(param.dtype)
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
