"""Behaviour of the Hyena operator (hyena.py): the long convolution and its fast twin (fast/fftconv.py), causality,
the implicit filter, the decoding kernel (fast/decode.py) and fast.install, which puts the twins in."""
import math

import pytest
import torch

from fast.fftconv import cmul, fftconv as fast_fftconv
from hyena import HyenaOperator, fftconv
from triton_interpreter import output, register


def direct_causal_conv(u, k, bias):
    """y_t = sum_{s<=t} k_{t-s} u_s + bias u_t, the definition, by loops. u (B, L, D), k (L, D)."""
    y = torch.zeros_like(u)
    for t in range(u.shape[1]):
        y[:, t] = (u[:, :t + 1] * k[:t + 1].flip(0)).sum(1)
    return y + u * bias


@pytest.mark.parametrize("L", [64, 100, 1])
def test_fft_convolution_equals_direct_convolution(L):
    torch.manual_seed(L)
    u, k, bias = (torch.randn(2, L, 8, dtype=torch.float64), torch.randn(L, 8, dtype=torch.float64),
                  torch.randn(8, dtype=torch.float64))
    err = (fast_fftconv(u, k, bias) - direct_causal_conv(u, k, bias)).abs().max().item()
    print(f"fast_fftconv vs direct, L={L}: {err:.1e}")
    assert err <= 1e-10


@pytest.mark.parametrize("order", [2, 3])
def test_hyena_is_causal(order):
    torch.manual_seed(order)
    op = HyenaOperator(32, l_max=128, order=order).double()
    x = torch.randn(2, 100, 32, dtype=torch.float64, requires_grad=True)
    y = op(x)
    assert y.shape == x.shape
    t = 57
    x2 = x.detach().clone()
    x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
    err = (op(x2)[:, :t + 1] - y[:, :t + 1]).abs().max().item()
    print(f"order {order}: max change at <= t after editing the future: {err:.1e}")
    assert err <= 1e-12
    (g,) = torch.autograd.grad(y[:, t].sum(), x)
    past, future = g[:, :t + 1].abs().max().item(), g[:, t + 1:].abs().max().item()
    assert past > 1e-3 and future <= 1e-12 * past  # zero up to fp64 FFT rounding (~1e-18)


@pytest.mark.parametrize("order", [2, 3])
def test_operator_equals_reference_built_from_conv1d_and_direct_convolution(order):
    """The fast path (shifted-sum short conv, FFTConv) computes safari's operator exactly."""
    torch.manual_seed(0)
    op = HyenaOperator(8, l_max=40, order=order).double()
    u = torch.randn(2, 33, 8, dtype=torch.float64)
    p = op.in_proj(u).transpose(1, 2)  # (B, (N+1)D, L): safari's channels-first layout
    *x, v = op.short_filter(p)[..., :33].transpose(1, 2).split(8, dim=-1)
    k, bias = op.filters(33)
    for o, x_i in enumerate(reversed(x[1:])):
        v = direct_causal_conv(v * x_i, k[:, o], bias[o])
    ref = op.out_proj(v * x[0])
    assert (op(u) - ref).abs().max().item() <= 1e-10


def test_shorter_filters_are_prefixes_and_limits_are_checked():
    op = HyenaOperator(16, l_max=64)
    k64, k10 = op.filter_fn(64), op.filter_fn(10)
    assert k64.shape == (64, 16) and torch.allclose(k10, k64[:10], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sequence length 65 exceeds the Hyena filter's l_max 64"):
        op(torch.randn(1, 65, 16))
    with pytest.raises(ValueError, match="order must be >= 2"):
        HyenaOperator(16, l_max=64, order=1)



# ----------------------------------------------------------------------------- the fast path = the reference

@pytest.mark.parametrize("L", [1, 2, 7, 64, 100, 383])
def test_fast_fftconv_equals_the_reference_and_so_do_its_gradients(L):
    """FFTConv (channels-first FFTs, 1/n folded into the filter, hand-written backward) computes the function
    fftconv defines and autograd differentiates: output and all three gradients, in fp64."""
    torch.manual_seed(L)
    u, k = torch.randn(3, L, 8, dtype=torch.float64), torch.randn(L, 8, dtype=torch.float64)
    bias, g = torch.randn(8, dtype=torch.float64), torch.randn(3, L, 8, dtype=torch.float64)
    out = {}
    for name, conv in (("fast", fast_fftconv), ("reference", fftconv)):
        args = [t.clone().requires_grad_() for t in (u, k, bias)]
        y = conv(*args)
        out[name] = (y, *torch.autograd.grad(y, args, g))
    for what, a, b in zip(("y", "du", "dk", "dbias"), out["fast"], out["reference"]):
        err = ((a - b).norm() / b.norm()).item()
        print(f"L={L} {what}: relative error {err:.1e}")
        assert err <= 1e-13


def test_fast_fftconv_passes_gradcheck_and_skips_gradients_nobody_needs():
    torch.manual_seed(0)
    u, k, bias = (torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True),
                  torch.randn(9, 3, dtype=torch.float64, requires_grad=True),
                  torch.randn(3, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(fast_fftconv, (u, k, bias))
    frozen = k.detach()  # a frozen filter: only du and dbias are formed
    (du,) = torch.autograd.grad(fast_fftconv(u, frozen, bias).sum(), u)
    (du_ref,) = torch.autograd.grad(fftconv(u, frozen, bias).sum(), u)
    assert torch.allclose(du, du_ref, rtol=0, atol=1e-12)


def test_fast_fftconv_keeps_dtypes_like_the_reference():
    """bf16 activations in, bf16 out (fp32 FFTs inside); the fp32 filter's gradient stays fp32."""
    u = torch.randn(2, 50, 16).bfloat16().requires_grad_()
    k, bias = torch.randn(50, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    y = fast_fftconv(u, k, bias)
    y.float().square().sum().backward()
    assert (y.dtype, u.grad.dtype, k.grad.dtype, bias.grad.dtype) == (torch.bfloat16, torch.bfloat16,
                                                                      torch.float32, torch.float32)
    ref = fftconv(u.detach(), k.detach(), bias.detach())
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() <= 1e-2  # bf16 rounding of the output


@pytest.mark.parametrize("conj_b", [False, True])
def test_complex_product_in_real_arithmetic_equals_the_complex_op(conj_b, monkeypatch):
    """The path torch.compile takes (view_as_real arithmetic, fused by inductor) runs here eagerly."""
    torch.manual_seed(1)
    a = torch.randn(2, 5, 33, dtype=torch.complex128)
    b = torch.randn(5, 33, dtype=torch.complex128)
    eager = cmul(a, b, conj_b)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    real = cmul(a, b, conj_b)
    assert torch.allclose(real, a * (b.conj() if conj_b else b), rtol=0, atol=1e-14)
    assert torch.allclose(real, eager, rtol=0, atol=1e-14)


KERNEL_CHECK = """
import torch
import fast
from fast import decode
assert decode.available(torch.zeros(1))  # Triton's interpreter: the kernel serves CPU tensors
torch.manual_seed(0)
B, D, T = 2, 6, 1100  # D not a multiple of the channel block, T over two position blocks
z, k = torch.randn(B, D, T), torch.randn(T, D)
k_pad = torch.cat([k.flip(0).T, torch.zeros(D, T - 1)], 1).contiguous()  # HyenaOperator's cache layout
worst = 0.0
for pos in (0, 1, 511, 512, 700, T - 1):
    ref = torch.einsum("bds,sd->bd", z[..., :pos + 1], k[:pos + 1].flip(0))  # sum_s z[s] k[pos - s]
    out = decode.long_conv_step(z, k_pad, torch.tensor(pos))
    worst = max(worst, ((out - ref).abs().max() / ref.abs().max()).item())
# a bf16 student decoding through the kernel (fast.install) matches the PyTorch step (and keeps its dtype)
from fast import toeplitz
max_l, toeplitz.TOEPLITZ_MAX_L = toeplitz.TOEPLITZ_MAX_L, 0  # its prefill by FFTConv: Toeplitz is not this check's
from hyena import Config, GPTNeoX, make_student, new_cache
cfg = Config(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, vocab_size=97,
             max_position_embeddings=48)
student = fast.install(make_student(GPTNeoX(cfg)).to(torch.bfloat16).eval())
idx, kernel = torch.randint(97, (2, 48)), decode.available
runs = []
for use_kernel in (True, False):
    decode.available = kernel if use_kernel else (lambda t: False)  # long_conv_step hands over to history_conv
    cache = new_cache(student, 48)
    with torch.no_grad():
        student(idx[:, :40], cache=cache)
        runs.append(torch.cat([student(idx[:, i:i + 1], cache=cache)[0] for i in range(40, 48)], 1).float())
worst = max(worst, ((runs[0] - runs[1]).norm() / runs[1].norm()).item() / 100)  # bf16: within 1e-3
decode.available, toeplitz.TOEPLITZ_MAX_L = kernel, max_l
print(worst)
"""


ATTEND_CHECK = """
import torch
import fast
import hyena
from fast import attention, decode
from hyena import AttentionState, Config, GPTNeoX, new_cache
assert decode.available(torch.zeros(1))  # Triton's interpreter: the kernels serve CPU tensors
torch.manual_seed(0)
B, H, T, hd = 1, 2, 300, 16
excess = 0.0
n, blk = attention.ATTEND_PROGRAMS, attention.ATTEND_BLOCK
for dtype, bound, programs in ((torch.float32, None, n), (torch.bfloat16, torch.finfo(torch.bfloat16).eps, n),
                               (torch.float32, None, 4)):
    attention.ATTEND_PROGRAMS = programs  # splits of one ATTEND_BLOCK each; at 4 programs, 2 splits of 2 blocks
    for pos in (0, blk - 1, blk, 200, T - 1):  # the new token alone, a block's and a split's edges, the last
        kc, vc = torch.randn(B, H, T, hd).to(dtype), torch.randn(B, H, T, hd).to(dtype)
        q, k = (torch.randn(B, H, 1, hd).to(dtype) for _ in range(2))
        v = torch.randn(B, H, 1, 3 * hd).to(dtype)[..., hd:2 * hd]  # a strided view, as the model's v
        ref = hyena.cached_attention(AttentionState(kc.double(), vc.double()), q.double(), k.double(), v.double(),
                                     torch.tensor(pos))
        runs = []
        for f in (hyena.cached_attention, attention.cached_attention):
            state = AttentionState(kc.clone(), vc.clone())
            runs.append((f(state, q, k, v, torch.tensor(pos)), state))
        (plain, plain_state), (got, state) = runs
        assert got.dtype == dtype and torch.equal(state.k, plain_state.k) and torch.equal(state.v, plain_state.v)
        err = lambda y: ((y.double() - ref).norm() / ref.norm()).item()
        excess = max(excess, err(got) / (bound or max(2 * err(plain), 1e-6)))  # fp32: as the plain; bf16: an ulp
attention.ATTEND_PROGRAMS = n
# a teacher decoding through it (fast.install) gives the plain teacher's greedy tokens and logits
cfg = Config(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2, vocab_size=97,
             max_position_embeddings=40)
teacher, idx = GPTNeoX(cfg).eval(), torch.randint(97, (2, 28))
runs = []
for on in (True, False):
    fast.install(teacher, on)
    out = teacher.generate(idx, 12, temperature=0)
    cache = new_cache(teacher, 40)
    with torch.no_grad():
        teacher(out[:, :28], cache=cache)
        runs.append((out, torch.cat([teacher(out[:, i:i + 1], cache=cache)[0] for i in range(28, 39)], 1)))
assert torch.equal(runs[0][0], runs[1][0])
excess = max(excess, ((runs[0][1] - runs[1][1]).norm() / runs[1][1].norm()).item() / 1e-5)
print(excess)
"""


register("decode kernel", KERNEL_CHECK)
register("decoding attention", ATTEND_CHECK)


def test_decode_kernel_equals_the_definition_in_tritons_interpreter():
    """The Triton decode kernel, run on the CPU by Triton's interpreter, against sum_{s<=pos} z_s k_{pos-s}
    (GPU agreement with the PyTorch step is bench.py's check section)."""
    assert float(output("decode kernel").split()[-1]) <= 1e-5


def test_decoding_attention_kernel_equals_the_plain_attention_in_tritons_interpreter():
    """fast.attention.cached_attention (the new token's k, v written, the positions up to pos scored in splits, then
    combined), in Triton's interpreter, against hyena.cached_attention in fp64: no further than the plain one in
    fp32 (2x), an ulp in bf16, the same cache written; and a teacher decoding through it generates the plain
    teacher's greedy tokens, its logits within 1e-5."""
    assert float(output("decoding attention").split()[-1]) <= 1


# ----------------------------------------------------------------------------- the filter = the paper's definition

def paper_positional_embedding(L_max, emb_dim, dtype=torch.float64):
    """Hyena paper (Poli et al. 2023) sec. 3.3 / appendix: the filter's input is the time t_n = n / (L_max - 1) with
    `bands` complex exponentials e^{-i f_b 2 pi n / L_max} (real then imaginary parts), f_b from 1e-4 to bands-1
    evenly (safari's choice of frequencies). Returns z (L_max, emb_dim) and t (L_max, 1)."""
    bands = (emb_dim - 1) // 2
    n = torch.arange(L_max, dtype=dtype)[:, None]
    t = n / (L_max - 1)
    f = torch.tensor([1e-4 + b * (bands - 1 - 1e-4) / max(bands - 1, 1) for b in range(bands)], dtype=dtype)
    angle = 2 * torch.pi * n * f / L_max
    return torch.cat([t, torch.cos(angle), -torch.sin(angle)], dim=1), t


def paper_decay_rates(channels, fast=0.3, slow=1.5, target=1e-2, dtype=torch.float64):
    """Window exp(-|delta_c| t), delta_c evenly from log(target)/slow (channel 0: decays slowest, reaching `target`
    at t = slow) to log(target)/fast (last channel: fastest), safari's channel order."""
    lo, hi = math.log(target) / slow, math.log(target) / fast
    return torch.tensor([lo + c * (hi - lo) / (channels - 1) for c in range(channels)], dtype=dtype)


def paper_filter(W, z, t, deltas):
    """h(t) = FFN(z(t)) * exp(-|delta| t), FFN = (Linear, sin(w .)) x 3 then a Linear without bias, one
    frequency vector w for all three activations. W: safari-named tensors (prefix-free). (L, C)."""
    a = z
    for i in (0, 2, 4):
        a = a @ W[f"implicit_filter.{i}.weight"].T + W[f"implicit_filter.{i}.bias"]
        a = torch.sin(W["implicit_filter.1.freq"] * a)
    return (a @ W["implicit_filter.6.weight"].T) * torch.exp(-t * deltas.abs())


def test_filter_tables_are_the_papers_positional_embedding_and_safaris_decay_order():
    op = HyenaOperator(8, l_max=300, order=3, emb_dim=9)
    z, t = paper_positional_embedding(300, 9)
    f = op.filter_fn
    assert f.pos_emb.z.shape == (1, 300, 9) and f.pos_emb.t.shape == (1, 300, 1)
    assert torch.allclose(f.pos_emb.z[0].double(), z, rtol=0, atol=1e-6)  # stored in fp32
    assert torch.allclose(f.pos_emb.t[0].double(), t, rtol=0, atol=1e-7)
    deltas = f.modulation.deltas[0, 0].double()
    assert torch.allclose(deltas, paper_decay_rates(16), rtol=1e-6)
    assert deltas.abs()[0] < deltas.abs()[-1]  # channel 0 is the long filter (the old code had it reversed)
    assert isinstance(f.pos_emb.z, torch.nn.Parameter) and "pos_emb.t" in dict(f.named_buffers())
    assert f.implicit_filter[1] is f.implicit_filter[3] is f.implicit_filter[5]  # one Sin, one freq


@pytest.mark.parametrize("order", [2, 3])
def test_filter_is_the_papers_definition_in_fp64(order):
    torch.manual_seed(order)
    op = HyenaOperator(8, l_max=200, order=order, emb_dim=5, filter_order=16).double()
    with torch.no_grad():
        for p in op.filter_fn.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # z and freq too: the definition holds for any values
    W = {k[len("filter_fn."):]: v for k, v in op.state_dict().items() if k.startswith("filter_fn.")}
    ref = paper_filter(W, W["pos_emb.z"][0], W["pos_emb.t"][0], W["modulation.deltas"][0, 0])  # (200, C)
    h = op.filter_fn(200)
    assert h.dtype == torch.float64
    err = ((h - ref).norm() / ref.norm()).item()
    print(f"filter vs definition, order {order}, fp64: {err:.1e}")
    assert err <= 1e-12


def safari_state_dict(d_model, l_max, order, emb_dim, filter_order, seed):
    """A state dict under safari's HyenaOperator names, with random weights and the paper's tables."""
    g = torch.Generator().manual_seed(seed)
    C, W = d_model * (order - 1), (order + 1) * d_model
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.3  # noqa: E731
    z, t = paper_positional_embedding(l_max, emb_dim)
    freq = 1 + r(1, filter_order)
    return {"in_proj.weight": r(W, d_model), "in_proj.bias": r(W), "out_proj.weight": r(d_model, d_model),
            "out_proj.bias": r(d_model), "short_filter.weight": r(W, 1, 3), "short_filter.bias": r(W),
            "filter_fn.bias": r(C), "filter_fn.pos_emb.z": z[None], "filter_fn.pos_emb.t": t[None],
            "filter_fn.implicit_filter.0.weight": r(filter_order, emb_dim),
            "filter_fn.implicit_filter.0.bias": r(filter_order),
            "filter_fn.implicit_filter.1.freq": freq, "filter_fn.implicit_filter.3.freq": freq,
            "filter_fn.implicit_filter.5.freq": freq,
            "filter_fn.implicit_filter.2.weight": r(filter_order, filter_order),
            "filter_fn.implicit_filter.2.bias": r(filter_order),
            "filter_fn.implicit_filter.4.weight": r(filter_order, filter_order),
            "filter_fn.implicit_filter.4.bias": r(filter_order),
            "filter_fn.implicit_filter.6.weight": r(C, filter_order),
            "filter_fn.modulation.deltas": paper_decay_rates(C)[None, None]}


def paper_operator(S, u, order):
    """Hyena (paper eq. 3 / safari's order): projections through a depthwise causal conv of width 3, then
    v <- h^n * (x^n v) + D^n (x^n v) for n = N-1 .. 1, output out_proj(x^0 v). Direct convolution, fp64."""
    D, L = u.shape[-1], u.shape[1]
    p = torch.nn.functional.conv1d((u @ S["in_proj.weight"].T + S["in_proj.bias"]).transpose(1, 2),
                                   S["short_filter.weight"], S["short_filter.bias"], padding=2, groups=(order + 1) * D)
    *x, v = p[..., :L].transpose(1, 2).split(D, dim=-1)
    W = {k[len("filter_fn."):]: val for k, val in S.items() if k.startswith("filter_fn.")}
    h = paper_filter(W, W["pos_emb.z"][0, :L], W["pos_emb.t"][0, :L], W["modulation.deltas"][0, 0])
    h, bias = h.view(L, order - 1, D), W["bias"].view(order - 1, D)
    for o, x_i in enumerate(reversed(x[1:])):
        v = direct_causal_conv(v * x_i, h[:, o], bias[o])
    return (v * x[0]) @ S["out_proj.weight"].T + S["out_proj.bias"]


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=["fp64", "fp32"])
def test_a_safari_state_dict_loads_by_name_and_computes_the_same_function(order, dtype, tol):
    S = safari_state_dict(8, 128, order, emb_dim=7, filter_order=16, seed=order)
    S = {k: v.to(dtype) for k, v in S.items()}
    op = HyenaOperator(8, l_max=128, order=order, emb_dim=7, filter_order=16).to(dtype)
    op.load_state_dict(S, strict=True)  # every name is safari's, none missing or extra
    u = torch.randn(2, 128, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = op(u.to(dtype)).double()
    ref = paper_operator({k: v.double() for k, v in S.items()}, u.to(dtype).double(), order)
    err = ((y - ref).norm() / ref.norm()).item()
    print(f"safari state dict, order {order}, {dtype}: relative error {err:.1e}")
    assert err <= tol


def test_a_state_dict_with_three_different_sin_frequencies_is_refused():
    S = safari_state_dict(8, 64, 2, emb_dim=7, filter_order=16, seed=0)
    S["filter_fn.implicit_filter.3.freq"] = S["filter_fn.implicit_filter.3.freq"] + 1
    op = HyenaOperator(8, l_max=64, emb_dim=7, filter_order=16).double()
    with pytest.raises(RuntimeError, match="implicit_filter.5.freq differ, but the filter shares one Sin"):
        op.load_state_dict(S)
