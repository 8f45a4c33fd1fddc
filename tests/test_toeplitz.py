"""fast/toeplitz.py's block-Toeplitz long convolution (forward, du, dk, dbias) against its plain twin hyena.fftconv
in fp64, its kernel run on the CPU by Triton's interpreter (tests/triton_interpreter.py).

Tolerances. The kernel multiplies bf16/fp16 values, whose products are exact in fp32, and sums them in fp32; so
against fp64 of the SAME rounded inputs (u, k and g rounded to the kernel's dtype) its only error is the fp32
summation's: at most n 2^-24 sum|terms| for n terms (recursive summation's worst case), n <= B L + 1 = 99 here,
within 1e-5 times the convolution of the absolute values ("abs": hyena.fftconv and its gradients of |u|, |k|,
|bias|, |g|). Outputs stored in bf16/fp16 (y, du) add one rounding: an ulp, finfo.eps relative (the interpreter's
cast to bf16 truncates). Against the twin's fp32 filter, rounding k adds at most eps/2 abs (half an ulp per tap: 2^-8
in bf16). Shapes: odd lengths, not multiples of the chunk; a tiny tile (chunk 4, 2 chunks a program: four programs
along time, smaller than a GPU's tensor cores take, which the interpreter runs alike) and a GPU-sized one (16, 16).
"""
import json

import pytest
import torch

import fast.toeplitz as toeplitz
from fast.fftconv import fftconv as fast_fftconv
from triton_interpreter import run_interpreted

CHECK = """
import json, torch
from fast import toeplitz
from hyena import fftconv

def grads(u, k, bias, g):
    # hyena.fftconv in fp64 and autograd's du, dk, dbias
    a = [t.double().requires_grad_() for t in (u, k, bias)]
    y = fftconv(*a)
    return (y, *torch.autograd.grad(y, a, g.double()))

def excess(x, ref, bound):
    # max of |x - ref| / bound: within the tolerance when <= 1
    return ((x.double() - ref).abs() / bound).max().item()

out, B, D = {}, 2, 3
for chunk, rows, L, dtype in ((4, 2, 29, torch.bfloat16), (16, 16, 49, torch.bfloat16), (16, 16, 49, torch.float16)):
    tiles = dict(chunk=chunk, rows=rows, warps=4, stages=2)
    toeplitz.TILES.update(y=tiles, du=tiles, dk=tiles)
    case = f"{chunk}x{rows} L={L} {str(dtype)[6:]}"
    torch.manual_seed(L)
    u, g = torch.randn(B, L, D).to(dtype), torch.randn(B, L, D).to(dtype)
    k, bias = torch.randn(L, D) / L ** 0.5, torch.randn(D)
    kr = k.to(dtype).float()  # the filter as the kernel multiplies it
    ref, abs_ = grads(u, kr, bias, g), grads(u.abs(), kr.abs(), bias.abs(), g.abs())
    eps = torch.finfo(dtype).eps  # an ulp of the output's dtype, relative
    # the products alone, into fp32 outputs: only the fp32 summation's error
    u_t, g_t, k_t = (t.transpose(1, 2).contiguous() for t in (u, g, kr[None].to(dtype)))
    y32 = toeplitz.toeplitz_products(u_t, k_t, bias, torch.empty(B, D, L), True, tiles).transpose(1, 2)
    du32 = toeplitz.toeplitz_products(g_t, k_t, bias, torch.empty(B, D, L), False, tiles).transpose(1, 2)
    dk32 = toeplitz.toeplitz_products(g_t, u_t, None, torch.empty(1, D, L), False, tiles)[0].t()
    out[f"products {case}"] = [excess(x, r, 1e-5 * a) for x, r, a in zip((y32, du32, dk32), ref[:3], abs_[:3])]
    # toeplitz_conv with autograd: y, du in the activations' dtype, dk, dbias fp32
    args = [t.clone().requires_grad_() for t in (u, k, bias)]
    y = toeplitz.toeplitz_conv(*args)
    y.backward(g)
    got = (y, args[0].grad, args[1].grad, args[2].grad)
    out[f"dtypes {case}"] = [str(t.dtype)[6:] for t in got]
    out[f"conv {case}"] = [excess(x, r, eps * r.abs() + 1e-5 * a) for x, r, a in zip(got, ref, abs_)]
    # against the twin itself (its fp32 filter): the filter's rounding, half an ulp per tap, on top
    twin = grads(u, k, bias, g)
    out[f"twin {case}"] = [excess(x, r, eps * r.abs() + (eps / 2 + 1e-5) * a) for x, r, a in zip(got, twin, abs_)]
    # a frozen filter: du and dbias without dk (dbias then by its own sum)
    args = [u.clone().requires_grad_(), k, bias.clone().requires_grad_()]
    du, dbias = torch.autograd.grad(toeplitz.toeplitz_conv(*args), (args[0], args[2]), g)
    out[f"frozen {case}"] = [excess(du, ref[1], eps * ref[1].abs() + 1e-5 * abs_[1]),
                             excess(dbias, ref[3], 1e-5 * abs_[3])]
    # causality, exactly: a later input leaves earlier outputs alone, an earlier gradient later du
    t0 = L // 2 + 1
    u2, g2 = u.clone(), g.clone()
    u2[:, t0:], g2[:, :t0] = torch.randn(B, L - t0, D).to(dtype), torch.randn(B, t0, D).to(dtype)
    du2 = toeplitz.toeplitz_products(g2.transpose(1, 2).contiguous(), k_t, bias, torch.empty(B, D, L), False, tiles)
    out[f"causal {case}"] = [(toeplitz.toeplitz_conv(u2, k, bias)[:, :t0] - y[:, :t0]).abs().max().item(),
                             (du2.transpose(1, 2)[:, t0:] - du32[:, t0:]).abs().max().item()]
out["served"] = [toeplitz.available(torch.zeros(1, dtype=d)) for d in (torch.bfloat16, torch.float16, torch.float32,
                                                                      torch.float64)]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreted():
    """CHECK's results, run once in Triton's interpreter: {check and case: numbers}."""
    out = json.loads(run_interpreted(CHECK).splitlines()[-1])
    for name, value in out.items():
        print(name, value)
    return out


def cases(out, kind):
    found = {name: v for name, v in out.items() if name.startswith(kind + " ")}
    assert len(found) == 3, out
    return found


def test_products_equal_the_fp64_convolution_and_its_gradients_in_fp32(interpreted):
    """The kernel's products into fp32: y (causal, with bias), du (anticausal, with bias), dk (anticausal, summed
    over the batch) within the fp32 summation's bound of fp64 on the same rounded inputs."""
    for name, excess in cases(interpreted, "products").items():
        assert max(excess) <= 1, (name, excess)


def test_toeplitz_conv_equals_the_fp64_convolution_and_its_gradients(interpreted):
    """toeplitz_conv and its backward (y, du, dk, dbias; and du, dbias for a frozen filter) against hyena.fftconv in
    fp64, of the rounded filter within a rounding of the output, of the twin's fp32 filter within that and the
    filter's rounding; dtypes as the twin's: y, du in u's dtype, dk, dbias fp32."""
    for kind in ("conv", "twin", "frozen"):
        for name, excess in cases(interpreted, kind).items():
            assert max(excess) <= 1, (name, excess)
    for name, dtypes in cases(interpreted, "dtypes").items():
        assert dtypes == [name.split()[-1]] * 2 + ["float32"] * 2, (name, dtypes)


def test_toeplitz_conv_is_causal(interpreted):
    """Changing u from t0 on leaves y before t0 bitwise alone; changing g before t0 leaves du from t0 on alone."""
    for name, change in cases(interpreted, "causal").items():
        assert change == [0.0, 0.0], (name, change)


def test_the_kernel_serves_bf16_and_fp16_activations_only(interpreted):
    """In the interpreter (as on CUDA) the kernel takes bf16 and fp16; fp32 and fp64 keep FFTConv's precision
    (tl.dot would round fp32 to TF32)."""
    assert interpreted["served"] == [True, True, False, False]


def test_toeplitz_conv_hands_what_the_kernel_does_not_serve_to_fftconv(monkeypatch):
    """Off CUDA and the interpreter, or for fp32/fp64 activations, toeplitz_conv is FFTConv, bitwise; so is
    long_conv past TOEPLITZ_MAX_L, even where the kernel would serve."""
    torch.manual_seed(0)
    u, k, bias = torch.randn(2, 9, 3), torch.randn(9, 3), torch.randn(3)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x, kx = u.to(dtype), k.to(dtype)
        assert torch.equal(toeplitz.toeplitz_conv(x, kx, bias), fast_fftconv(x, kx, bias))
        assert torch.equal(toeplitz.long_conv(x, kx, bias), fast_fftconv(x, kx, bias))
    monkeypatch.setattr(toeplitz, "available", lambda u: True)  # would launch the kernel on CPU tensors: an error
    monkeypatch.setattr(toeplitz, "TOEPLITZ_MAX_L", 8)
    assert torch.equal(toeplitz.long_conv(u.bfloat16(), k, bias), fast_fftconv(u.bfloat16(), k, bias))
