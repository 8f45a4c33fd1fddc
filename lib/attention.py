"""GPT-NeoX's attention, the teacher's mixer (and a hybrid student's attention layers), exactly as
`transformers.GPTNeoXAttention` computes it, under HF's parameter names (`query_key_value`, `dense`): causal
scaled dot-product attention with rotary position embeddings (RoPE) on part of each head, in the "default",
"linear" and "dynamic" (NTK) flavours config.json may ask for. hyena.py's Block holds one per attention layer,
and make_student reads its weights to initialise the Hyena operator that replaces it. Cached decoding keeps its
keys and values in lib/decoding.py's AttentionState.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.decoding import AttentionState


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
