"""A whole cached decoding step on CUDA in few kernels, replayed from a CUDA graph.

At Pythia-70M's size a decoding step's work is small (its weights are ~90 MB of bf16, ~27 us at an H100's
bandwidth) and the eager step spends its time launching ~120-250 small kernels. `fused_step` runs a block of a
parallel-residual GPT-NeoX (x + mixer(ln1(x)) + mlp(ln2(x))) in three or four:

    A  _norm_matmul     x -> [ln1(x) | ln2(x)] @ [W_mixer_in | W_mlp_up] + biases, GELU on the MLP's part: both
                        projections that read x in one matmul (h, (B, (N+1)D + 4D) or (B, 3D + 4D))
    B  the mixer's core  a modal Hyena layer's fast.decode.mix_step (short conv, recurrences, gates: one kernel),
                        any other Hyena layer's installed mix_step, or attention's RoPE + cached attention
                        (fast.attention.attend: two kernels)
    C  _matmul_parts    [y | gelu part of h] @ [W_mixer_out | W_mlp_down]: both output projections in one
                        matmul, split along K into partial sums that the next A (or the head) adds to the residual

and the head (final norm and unembedding) as one more A. The residual stream stays in fp32; the matmuls take
the model's dtype (the autocast dtype under autocast) and accumulate in fp32. The weights a step reads are copied,
concatenated, when the step is made (as generate does at each call).

`graphed_step` captures a step (fused where `fused_step` serves, else the eager one) with the draw of the next
tokens as a CUDA graph, which GPTNeoX.generate replays once fast.install put `cuda_graph_step` in its make_step.
Plain twin of all three: hyena.eager_step.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fast.attention import attend, serves as attention_serves
from fast.decode import available
from hyena import AttentionState, eager_step

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager step serves
    triton = None

if triton is not None:
    @triton.jit
    def _residual(x_ptr, part_ptr, rb_ptr, rm, rk, M, D, KS: tl.constexpr):
        """(BM, BK) of the residual stream, x + the previous layer's C partial sums (KS of them) + their bias."""
        m = (rm < M)[:, None] & (rk < D)[None, :]
        x = tl.load(x_ptr + rm[:, None] * D + rk[None, :], mask=m, other=0.0)
        if KS > 0:
            x += tl.load(rb_ptr + rk, mask=rk < D, other=0.0)[None, :]
            for j in tl.static_range(KS):
                x += tl.load(part_ptr + (j * M + rm)[:, None] * D + rk[None, :], mask=m, other=0.0)
        return x

    @triton.jit
    def _norm_matmul(x_ptr, part_ptr, rb_ptr, xo_ptr, lnw_ptr, lnb_ptr, w_ptr, b_ptr, out_ptr, M, D, N, split,
                     gelu_from, eps, KS: tl.constexpr, WRITE_X: tl.constexpr, HAS_BIAS: tl.constexpr,
                     PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """out[rows, cols] = norm(x) @ w[cols].T + b, GELU from column gelu_from on; norm is LayerNorm by
        lnw[:D], lnb[:D] for column blocks before `split`, by lnw[D:], lnb[D:] from it (a block never straddles
        it). x is _residual's; WRITE_X: the first column block writes it to xo (the next layer's x)."""
        pm, pn = tl.program_id(0), tl.program_id(1)
        rm = pm * BM + tl.arange(0, BM)  # (BM,) batch rows
        rn = pn * BN + tl.arange(0, BN)  # (BN,) output columns
        s1 = tl.zeros((BM,), dtype=tl.float32)
        s2 = tl.zeros((BM,), dtype=tl.float32)
        for k0 in range(0, D, BK):  # the norm's statistics, one pass
            x = _residual(x_ptr, part_ptr, rb_ptr, rm, k0 + tl.arange(0, BK), M, D, KS)
            s1 += tl.sum(x, axis=1)
            s2 += tl.sum(x * x, axis=1)
        mean = s1 / D
        rstd = 1.0 / tl.sqrt(tl.maximum(s2 / D - mean * mean, 0.0) + eps)
        ln = tl.where(pn * BN >= split, D, 0)  # which norm this block's columns read
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, D, BK):
            rk = k0 + tl.arange(0, BK)
            x = _residual(x_ptr, part_ptr, rb_ptr, rm, rk, M, D, KS)  # (BM, BK)
            if WRITE_X:
                tl.store(xo_ptr + rm[:, None] * D + rk[None, :], x,
                         mask=(rm < M)[:, None] & (rk < D)[None, :] & (pn == 0))
            gw = tl.load(lnw_ptr + ln + rk, mask=rk < D, other=0.0)
            gb = tl.load(lnb_ptr + ln + rk, mask=rk < D, other=0.0)
            xn = ((x - mean[:, None]) * rstd[:, None] * gw[None, :] + gb[None, :]).to(w_ptr.dtype.element_ty)
            w = tl.load(w_ptr + rn[None, :] * D + rk[:, None], mask=(rn < N)[None, :] & (rk < D)[:, None], other=0.0)
            acc = tl.dot(xn, w, acc, input_precision=PREC)  # (BM, BN)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0)[None, :]
        acc = tl.where((rn >= gelu_from)[None, :], 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476)), acc)
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rm < M)[:, None] & (rn < N)[None, :])

    @triton.jit
    def _matmul_parts(y_ptr, g_ptr, w_ptr, part_ptr, M, D, K1, K2, sg, slice_k, PREC: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """part[program_id(2), rows, cols] = [y | g][rows, ks] @ w[cols, ks].T over this program's slice ks of
        the K1 + K2 inputs (y (M, K1) contiguous, g (M, K2) with row stride sg)."""
        pm, pn, ps = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        mm = (rm < M)[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(ps * slice_k, tl.minimum(ps * slice_k + slice_k, K1 + K2), BK):
            rk = k0 + tl.arange(0, BK)
            ky = rk < K1
            a = tl.load(y_ptr + rm[:, None] * K1 + rk[None, :], mask=mm & ky[None, :], other=0.0).to(
                w_ptr.dtype.element_ty) + tl.load(g_ptr + rm[:, None] * sg + (rk - K1)[None, :],
                                                  mask=mm & (~ky & (rk < K1 + K2))[None, :], other=0.0)
            w = tl.load(w_ptr + rn[None, :] * (K1 + K2) + rk[:, None], mask=(rn < D)[None, :] &
                        (rk < K1 + K2)[:, None], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PREC)
        tl.store(part_ptr + (ps * M + rm)[:, None] * D + rn[None, :], acc, mask=mm & (rn < D)[None, :])


class Tiles(NamedTuple):
    """A fused step's blocks (each a power of two; the matmuls' M, N and K tiles)."""
    bm: int       # batch rows a program takes (tl.dot needs 16 or more)
    bn: int       # A's output columns a program takes
    bn_c: int     # C's output columns a program takes
    splits: int   # C's K splits: partial sums the next A adds
    bk: int       # the K chunk of every matmul
    bn_head: int  # the head's vocabulary columns a program takes


# Short batches spread the weights over more programs (a step reads them once); long ones re-read the residual
# rows less. Chosen by the sweep in results/gpu-logs-2026-12-07h/step-sweep.md.
SMALL_BATCH_TILES = Tiles(16, 32, 16, 4, 128, 256)
LARGE_BATCH_TILES = Tiles(32, 128, 32, 2, 64, 128)
# past this batch the eager step's kernels (cuBLAS) ran faster than these: the fused step's graph gave 1.35x the
# eager step's at B = 64, 0.84x at 256 (bench.py serve, one H100, results/gpu-logs-2026-12-07d)
FUSED_MAX_BATCH = 128


def _tiles(batch):
    return SMALL_BATCH_TILES if batch <= 16 else LARGE_BATCH_TILES


def _compute_dtype(weight):
    """The dtype a step's matmuls take: autocast's where it is on for the weight's device, else the weight's."""
    dev = weight.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype


def serves(model, cache):
    """Whether fused_step runs model's step: kernels (`available`, not fp64), parallel-residual blocks with one
    norm eps, attention layers (AttentionState) with static RoPE (not "dynamic") and a cache the kernels take."""
    W = model.gpt_neox.embed_in.weight
    x = W.new_empty(0, dtype=_compute_dtype(W))
    if not available(x):
        return False
    for block, state in zip(model.gpt_neox.layers, cache.layers):
        if not block.parallel or block.input_layernorm.eps != block.post_attention_layernorm.eps or state is None:
            return False
        if block.mixer == "attention":
            att, hd = block.attention, block.attention.head_dim
            if not isinstance(state, AttentionState) or att.rope_type == "dynamic":
                return False
            q = state.k.new_empty(state.k.shape[0], att.n_head, hd, dtype=x.dtype)
            if not attention_serves(state, q, q, q):
                return False
    return True


class _Layer:
    """What a fused step reads of one block: the concatenated weights (in the step's dtype) and norms."""
    def __init__(self, block, dt):
        mix = block.attention if block.mixer == "attention" else block.hyena
        w_in, w_out = (mix.query_key_value, mix.dense) if block.mixer == "attention" else (mix.in_proj, mix.out_proj)
        mlp, ln1, ln2 = block.mlp, block.input_layernorm, block.post_attention_layernorm
        self.block, self.mixer, self.eps, self.split = block, mix, ln1.eps, w_in.out_features
        self.w_in = torch.cat([w_in.weight, mlp.dense_h_to_4h.weight]).to(dt).contiguous()  # ((N+1)D + 4D, D)
        self.b_in = torch.cat([_bias_of(w_in), _bias_of(mlp.dense_h_to_4h)]).float()
        self.w_out = torch.cat([w_out.weight, mlp.dense_4h_to_h.weight], 1).to(dt).contiguous()  # (D, D + 4D)
        self.b_out = (_bias_of(w_out) + _bias_of(mlp.dense_4h_to_h)).float()
        self.ln_w = torch.cat([ln1.weight, ln2.weight]).float()
        self.ln_b = torch.cat([ln1.bias, ln2.bias]).float()


def _bias_of(linear):
    return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)


@torch.no_grad()
def fused_step(model, cache, batch, pick):
    """generate's step after a prefill, tokens (B, 1) -> pick(logits (B, V)), in ~3 kernels a block (see the
    module's docstring) where `serves` says the kernels take the model, batch <= FUSED_MAX_BATCH and every
    mixer's input width is a multiple of A's column block; else hyena.eager_step. Logits come in the step's
    dtype, as the eager step's; a step moves the cache as the eager one does.
    Plain twin: hyena.eager_step; held equal, in Triton's CPU interpreter, by
    tests/test_step.py::test_fused_step_equals_the_eager_step_in_tritons_interpreter (and on the GPU by
    bench/bench.py's check section)."""
    rows = {(s.k if isinstance(s, AttentionState) else s.tail).shape[0] for s in cache.layers if s is not None}
    if rows and rows != {batch}:  # the kernels would read past the cache's rows where the eager step raises
        raise ValueError(f"fused_step: batch {batch}, but the cache holds {sorted(rows)} sequences: pass the batch "
                         "the prefill ran with")
    if not serves(model, cache) or batch > FUSED_MAX_BATCH:
        return eager_step(model, cache, batch, pick)
    embed, head = model.gpt_neox.embed_in.weight, model.embed_out.weight
    dt = _compute_dtype(embed)
    layers = [_Layer(block, dt) for block in model.gpt_neox.layers]
    final = model.gpt_neox.final_layer_norm
    head_w, final_w, final_b = head.to(dt).contiguous(), final.weight.float(), final.bias.float()
    prec = "ieee" if dt == torch.float32 else None  # fp32 models: fp32 products, not tf32
    BM, BN, BNC, KS, BK, BNH = _tiles(batch)
    D, V, M = embed.shape[1], head.shape[0], batch
    if any(layer.split % BN for layer in layers):  # (a column block of A reads one norm)
        return eager_step(model, cache, batch, pick)

    def step(tokens):
        x = F.embedding(tokens[:, 0], embed).float()  # (B, D) the residual stream, fp32
        nxt = torch.empty_like(x)
        part = x.new_empty(KS, M, D)
        ks, rb = 0, x  # the partial sums the next A adds (none before the first block)
        for i, layer in enumerate(layers):
            Nw = layer.w_in.shape[0]
            h = x.new_empty(M, Nw, dtype=dt)  # [mixer input projections | GELU(MLP up)]
            _norm_matmul[(triton.cdiv(M, BM), triton.cdiv(Nw, BN))](
                x, part, rb, nxt, layer.ln_w, layer.ln_b, layer.w_in, layer.b_in, h, M, D, Nw, layer.split,
                layer.split, layer.eps,
                KS=ks, WRITE_X=True, HAS_BIAS=True, PREC=prec, BM=BM, BN=BN, BK=BK)
            x, nxt = nxt, x
            y = _mixer_step(layer, cache.layers[i], h[:, :layer.split], cache.pos)  # (B, D) rows contiguous
            slice_k = triton.cdiv(triton.cdiv(layer.w_out.shape[1], KS), BK) * BK
            _matmul_parts[(triton.cdiv(M, BM), triton.cdiv(D, BNC), KS)](
                y, h[:, layer.split:], layer.w_out, part, M, D, D, layer.w_out.shape[1] - D, h.stride(0), slice_k,
                PREC=prec, BM=BM, BN=BNC, BK=BK)
            ks, rb = KS, layer.b_out
        logits = x.new_empty(M, V, dtype=dt)
        _norm_matmul[(triton.cdiv(M, BM), triton.cdiv(V, BNH))](
            x, part, rb, x, final_w, final_b, head_w, head_w, logits, M, D, V, V, V, final.eps,
            KS=ks, WRITE_X=False, HAS_BIAS=False, PREC=prec, BM=BM, BN=BNH, BK=BK)
        cache.advance(1)
        return pick(logits)
    return step


def _mixer_step(layer, state, p, pos):
    """A block's mixer between its projections for the token at pos: p (B, W) its input projections (rows
    strided) -> (B, D), contiguous as C reads it (the plain history convolution returns a transposed view),
    in p's dtype or, from a plain Hyena step under autocast, fp32 (C casts it)."""
    mix = layer.mixer
    if layer.block.mixer != "attention":
        return mix.mix_step(mix, state, p, pos).contiguous()  # fast.decode.mix_step for a modal layer, installed
    B, H, hd = p.shape[0], mix.n_head, mix.head_dim
    qkv = p.view(B, H, 3 * hd)  # per head [q | k | v]
    return attend(state, qkv[..., :hd], qkv[..., hd:2 * hd], qkv[..., 2 * hd:], pos, mix.inv_freq).view(B, H * hd)


@torch.no_grad()
def graphed_step(model, cache, batch, pick=lambda logits: logits, fused=True):
    """One cached decoding step of a hyena.Cache and the `pick` of its logits (hyena.sample: the draw of the next
    tokens), captured together as a CUDA graph after a prefill: step(tokens (B, 1)) -> pick(logits (B, V)) (one
    static tensor, overwritten by the next call). The step captured is fused_step's (fused=False: the eager
    one's, as a comparison); replaying skips the launches that otherwise cost more than their work; with the draw
    inside, nothing reads the device back.
    Runs under the caller's autocast (with its weight-cast cache off, as graphs need). The warm-up runs pick
    twice (random draws move the generator: sampled tokens are the eager step's distribution, not its stream).
    Plain twin: hyena.eager_step (one eager cached step); the CPU holds the step capturable, in
    test_hyena.py::test_decoding_steps_never_read_the_device_back_so_a_cuda_graph_can_capture_them and
    tests/test_modal.py::test_modal_decoding_steps_never_read_the_device_back; bench/bench.py's check section
    holds replayed and eager logits, and greedy tokens, equal on the GPU."""
    pos = cache.pos
    if int(pos) + 2 > cache.max_len:  # a host read, before any capture
        raise ValueError(f"graphed_step warms up on the next two positions, but the cache ends at "
                         f"{cache.max_len} with pos {int(pos)}: make max_len at least pos + 2")
    tok = torch.zeros(batch, 1, dtype=torch.long, device=pos.device)
    moving = [pos] + [t for state in cache.layers for t in state.carried()]  # what warm-up steps move
    saved = [t.clone() for t in moving]  # (a modal layer's recurrence state must come back exactly)
    amp = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                         cache_enabled=False)
    with amp:
        one = (fused_step if fused else eager_step)(model, cache, batch, pick)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), amp:
        for _ in range(2):  # warm-up off the capture: cuBLAS handles, allocator pools, kernels compiled
            one(tok)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), amp:
        out = one(tok)  # captured, not run
    for t, now in zip(saved, moving):
        now.copy_(t)  # undo the warm-up (its history writes lie at positions the real steps overwrite first)

    def step(tokens):
        tok.copy_(tokens)
        graph.replay()
        return out
    step.captured = one  # what the graph reads lives as long as it: fused_step's weight copies are one's alone
    return step


def cuda_graph_step(model, cache, batch, pick):
    """generate's decoding step (GPTNeoX.make_step) replayed from a CUDA graph (graphed_step) where the cache is on
    CUDA with room for the graph's warm-up, else launched eagerly: step(tokens (B, 1)) -> pick(logits (B, V)).
    Plain twin: hyena.eager_step; held equal on the GPU by bench/bench.py's check section, and capturable by
    test_hyena.py::test_decoding_steps_never_read_the_device_back_so_a_cuda_graph_can_capture_them."""
    graph = cache.pos.is_cuda and int(cache.pos) + 2 <= cache.max_len  # (a host read, before any capture)
    return decode_step(model, cache, batch, graph, pick)


def decode_step(model, cache, batch, graph, pick=lambda logits: logits, fused=True):
    """step(tokens (B, 1)) -> pick(logits (B, V)) after a prefill: replayed from a CUDA graph (of fused_step's
    kernels, or with fused=False of the eager step's), or the eager step launched as it is."""
    return graphed_step(model, cache, batch, pick, fused) if graph else eager_step(model, cache, batch, pick)
