"""Cached decoding: what a model keeps between tokens (a Cache, one state per layer), and how each state steps.

GPTNeoX.generate makes a Cache (new_cache) and calls the model on the prompt, then on one token at a time, with it.
Each mixer (lib/attention.py's Attention, hyena.py's HyenaOperator) fills its layer's state in the prefill (from
position 0) and, from then on, hands the new positions to that state: attention's AttentionState keeps keys and
values; a Hyena operator's HyenaState keeps the inputs of its long convolutions so far and its filter, reversed, so
one step is one dot product per channel (O(pos D)); a modal Hyena operator's ModalState (modal/student.py) keeps
a recurrence state of fixed size. A step reads the position from `Cache.pos`, a device tensor, and never the host:
its shapes are fixed, so a CUDA graph can capture it (fast.decode.graphed_step).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fast
import fast.decode


@dataclass
class Cache:
    """What cached decoding keeps (GPTNeoX.forward(idx, cache=...) fills and advances it; new_cache makes one):
    room for max_len positions; `pos`, the position the next token takes: ONE 0-dim int64 tensor on the model's
    device, shared by every layer and advanced in place, so a decoding step never reads the host and a CUDA
    graph can replay it (fast.decode.graphed_step); `layers[i]`, what layer i's mixer keeps: None until the prefill
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

    @classmethod
    def prefill(cls, k, v, max_len):
        """A preallocated KV cache holding the prompt's keys and values k, v (B, H, L, hd) at positions 0..L-1."""
        B, H, L, hd = k.shape
        state = cls(k.new_zeros(B, H, max_len, hd), v.new_zeros(B, H, max_len, hd))
        state.k[:, :, :L], state.v[:, :, :L] = k, v
        return state

    def attend(self, q, k, v, pos):
        """q, k, v (B, H, L, hd) of the positions pos.. (pos a device tensor): their keys and values written into
        the cache, then each query against the past and itself -> (B, H, L, hd). Fixed shapes, no host sync."""
        at = pos + torch.arange(q.shape[2], device=q.device)  # (L,) positions written
        self.k.index_copy_(2, at, k.to(self.k.dtype))
        self.v.index_copy_(2, at, v.to(self.v.dtype))
        mask = torch.arange(self.k.shape[2], device=q.device) <= at[:, None]  # (L, max_len): the past only
        return F.scaled_dot_product_attention(q, self.k.to(q.dtype), self.v.to(q.dtype), attn_mask=mask)

    def carried(self):
        return []  # nothing moves but the positions a step writes


def tail_of(p, kw):
    """The short convolution's last kw inputs (B, kw, C) after a prompt p (B, L, C), zeros before its start."""
    return F.pad(p, (0, 0, max(0, kw - p.shape[1]), 0))[:, -kw:].clone()


@dataclass
class HyenaState:
    """What a Hyena layer keeps for decoding (its cache.layers entry, filled by the prefill): O(max_len D)."""
    tail: torch.Tensor   # (B, K-1, (N+1)D) the short conv's last inputs
    z: list              # per long conv (B, D, max_len): its inputs so far, channels first (for bmm)
    k_pad: torch.Tensor  # (N-1, D, 2 max_len - 1): k_pad[..., T-1-t+s] = k[t-s] for s <= t, 0 for s > t
    lags: torch.Tensor   # (max_len,) 0 .. max_len-1
    bias: torch.Tensor   # (N-1, D) the skip term D, in the model's dtype

    @classmethod
    def prefill(cls, op, p, zs, k, bias, max_len):
        """After the prompt: p (B, L, (N+1)D) the projections before the short conv, zs each long conv's input
        (B, L, D), k (max_len, N-1, D) and bias (N-1, D) the filters of HyenaOperator `op`."""
        (B, L, D), T = zs[0].shape, max_len
        z = [zs[0].new_zeros(B, D, T) for _ in zs]  # channels-first for bmm
        for hist, z_o in zip(z, zs):
            hist[..., :L] = z_o.transpose(1, 2)
        # The reversed filter then as many zeros: k_pad[..., T-1-t+s] = k[t-s] for s <= t, 0 for s > t.
        k_rev = k.flip(0).permute(1, 2, 0).to(zs[0].dtype)  # (N-1, D, T): k[T-1], ..., k[0]
        k_pad = F.pad(k_rev, (0, T - 1)).contiguous()  # (N-1, D, 2T-1)
        # The skip term in the model's dtype: in a bf16 model the filter itself stays fp32.
        return cls(tail_of(p, op.short_filter.kernel_size[0] - 1), z, k_pad, torch.arange(T, device=p.device),
                   bias.to(op.in_proj.weight.dtype))

    def long_conv(self, o, z, pos):
        """Long convolution o's output at position pos (a device tensor) for its input there z (B, D): z joins the
        history, which meets the filter reversed from pos. Here the whole history against a gathered filter window
        (later, stale history meets its zeros); on the fast path (CUDA) one Triton kernel (fast/decode.py)
        computes the same reading only positions <= pos."""
        T, hist = self.lags.shape[0], self.z[o]  # (B, D, T)
        hist.index_copy_(2, pos.view(1), z[..., None].to(hist.dtype))
        if fast.active(hist) and fast.decode.available(hist):  # one Triton kernel over s <= pos (fp32 sums)
            y = fast.decode.long_conv_step(hist, self.k_pad[o], pos).to(hist.dtype)  # (B, D)
        else:  # the plain formula: the whole history against the filter window (k_pad[T-1-pos+s] = k[pos-s])
            kr = self.k_pad[o].index_select(1, self.lags + (T - 1 - pos))  # (D, T): k[pos..0], 0...
            y = torch.bmm(hist.transpose(0, 1), kr[..., None])[..., 0].transpose(0, 1)  # (B, D) per-channel GEMV
        return y + z * self.bias[o]  # (B, D)

    def carried(self):
        """The tensors a step updates in place at every position (the history is written at the step's own)."""
        return [self.tail]
