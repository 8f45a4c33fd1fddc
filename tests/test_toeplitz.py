"""fast/toeplitz.py's block-Toeplitz long convolution (forward, du, dk, dbias) against its plain twin hyena.fftconv
in fp64, its kernels run on the CPU by Triton's interpreter (tests/triton_interpreter.py).

Tolerances. The kernels multiply bf16/fp16 values, whose products are exact in fp32, and sum them in fp32; so
against fp64 of the SAME rounded inputs (u, k and g rounded to the kernel's dtype) their only error is the fp32
summation's: at most n 2^-24 sum|terms| for n terms in any order (the worst case of recursive summation; a tree of
sums does no worse), n <= B L + 1 here (dk's lag 0 sums B L products, a convolution L and the bias term), times
the convolution of the absolute values ("abs": hyena.fftconv and its gradients of |u|, |k|, |bias|, |g|). Outputs
stored in bf16/fp16 (y, du) add one rounding: an ulp, finfo.eps relative (the interpreter's cast to bf16
truncates). Against the twin's fp32 filter, rounding k adds at most eps/2 abs (half an ulp per tap: 2^-8 in bf16).
Cases: odd lengths, not multiples of the chunk nor the width; B = 3 rows, not a multiple of the programs' batch
rows; tiles from tiny ones (chunk 4: several spans, lag blocks and persistent items a program, smaller than a
GPU's tensor cores take, which the interpreter runs alike) to chunk 32, with the filter's shifted copies (vec) and
a batch larger than B (then rows grow).
"""
import json

import pytest
import torch

import fast.toeplitz as toeplitz
from fast.fftconv import fftconv as fast_fftconv
from triton_interpreter import output_json, register

# name: (tiles for y and du, tiles for dk, L, dtype); B = 3 throughout
CASES = {"tiny": (dict(chunk=8, width=16, rows=2, batch=2, vec=8), dict(chunk=4, width=8, rows=4), 29, "bfloat16"),
         "batch>B": (dict(chunk=16, width=32, rows=1, batch=8, vec=8), dict(chunk=16, width=16, rows=16), 49,
                     "bfloat16"),
         "chunk32": (dict(chunk=32, width=64, rows=1, batch=2, vec=8), dict(chunk=32, width=64, rows=16), 97,
                     "float16")}

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

def in_nans(x):
    # x (B, D, L) as a view into a NaN-filled buffer (a row before and after, L before and after each row): a
    # read outside x (a mask missing) makes NaNs; returns the view and a check that nothing was written outside
    B, D, L = x.shape
    big = torch.full((B + 2, D, 3 * L), float("nan"), dtype=x.dtype)
    view = big[1:B + 1, :, L:2 * L]
    view.copy_(x)
    outside = torch.ones_like(big, dtype=torch.bool)
    outside[1:B + 1, :, L:2 * L] = False
    return view, lambda: bool(big[outside].isnan().all())

out, B, D = {}, 3, 2
for case, (tiles_conv, tiles_dk, L, dtype) in json.loads(CASES).items():
    tiles_conv, tiles_dk = {**tiles_conv, "warps": 4, "stages": 2}, {**tiles_dk, "warps": 4, "stages": 2}
    toeplitz.TILES.update(y=tiles_conv, du=tiles_conv, dk=tiles_dk)
    dtype = getattr(torch, dtype)
    torch.manual_seed(L)
    u, g = torch.randn(B, L, D).to(dtype), torch.randn(B, L, D).to(dtype)
    k, bias = torch.randn(L, D) / L ** 0.5, torch.randn(D)
    kr = k.to(dtype).float()  # the filter as the kernel multiplies it
    ref, abs_ = grads(u, kr, bias, g), grads(u.abs(), kr.abs(), bias.abs(), g.abs())
    eps, fp32 = torch.finfo(dtype).eps, (B * L + 1) * 2 ** -24  # an ulp of the output; the fp32 sums' bound
    # the products alone, into fp32 outputs: only the fp32 summation's error; operands and outputs are views
    # into NaN-filled buffers, so a read or a write outside them shows
    u_t, g_t, k_t = (t.transpose(1, 2).contiguous() for t in (u, g, kr.to(dtype)[None]))
    k_t = k_t[0]  # (D, L)
    (u_n, _), (g_n, _), (y_n, y_kept), (du_n, du_kept) = (in_nans(t) for t in (u_t, g_t, u_t.float(), u_t.float()))
    y32 = toeplitz.toeplitz_products(u_n, k_t, bias, y_n, True, tiles_conv).transpose(1, 2)
    du32 = toeplitz.toeplitz_products(g_n, k_t, bias, du_n, False, tiles_conv).transpose(1, 2)
    dk32 = toeplitz.batch_correlation(g_n, u_n, tiles_dk).t()
    out[f"products {case}"] = [excess(x, r, fp32 * a) for x, r, a in zip((y32, du32, dk32), ref[:3], abs_[:3])]
    out[f"stores {case}"] = [y_kept(), du_kept()]
    # toeplitz_conv with autograd: y, du in the activations' dtype, dk, dbias fp32
    args = [t.clone().requires_grad_() for t in (u, k, bias)]
    y = toeplitz.toeplitz_conv(*args)
    y.backward(g)
    got = (y, args[0].grad, args[1].grad, args[2].grad)
    out[f"dtypes {case}"] = [str(dtype)[6:]] + [str(t.dtype)[6:] for t in got]
    out[f"conv {case}"] = [excess(x, r, eps * r.abs() + fp32 * a) for x, r, a in zip(got, ref, abs_)]
    # against the twin itself (its fp32 filter): the filter's rounding, half an ulp per tap, on top
    twin = grads(u, k, bias, g)
    out[f"twin {case}"] = [excess(x, r, eps * r.abs() + (eps / 2 + fp32) * a) for x, r, a in zip(got, twin, abs_)]
    # a frozen filter: du and dbias without dk (dbias then by its own sum)
    args = [u.clone().requires_grad_(), k, bias.clone().requires_grad_()]
    du, dbias = torch.autograd.grad(toeplitz.toeplitz_conv(*args), (args[0], args[2]), g)
    out[f"frozen {case}"] = [excess(du, ref[1], eps * ref[1].abs() + fp32 * abs_[1]),
                             excess(dbias, ref[3], fp32 * abs_[3])]
    # causality, exactly: a later input leaves earlier outputs alone, an earlier gradient later du
    t0 = L // 2 + 1
    u2, g2 = u.clone(), g.clone()
    u2[:, t0:], g2[:, :t0] = torch.randn(B, L - t0, D).to(dtype), torch.randn(B, t0, D).to(dtype)
    du2 = toeplitz.toeplitz_products(g2.transpose(1, 2).contiguous(), k_t, bias, torch.empty(B, D, L), False,
                                     tiles_conv)
    out[f"causal {case}"] = [(toeplitz.toeplitz_conv(u2, k, bias)[:, :t0] - y[:, :t0]).abs().max().item(),
                             (du2.transpose(1, 2)[:, t0:] - du32[:, t0:]).abs().max().item()]
out["served"] = [toeplitz.available(torch.zeros(1, dtype=d)) for d in (torch.bfloat16, torch.float16, torch.float32,
                                                                      torch.float64)]
# the custom ops torch.compile sees: their schemas, and fakes (shapes, dtypes, strides) that match the kernels
u_t, k_t = torch.randn(3, 2, 29).bfloat16(), torch.randn(2, 29).bfloat16()
out["opcheck"] = [torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
                  for op, args in ((toeplitz._y_op, (u_t, k_t, torch.randn(2))),
                                   (toeplitz._du_op, (u_t, k_t, torch.randn(2))), (toeplitz._dk_op, (u_t, u_t)))]
print(json.dumps(out))
"""


register("toeplitz", f"CASES = {json.dumps(json.dumps(CASES))}\n" + CHECK)


@pytest.fixture(scope="module")
def interpreted():
    """CHECK's results, run once in Triton's interpreter: {check and case: numbers}."""
    return output_json("toeplitz")


def cases(out, kind):
    found = {name: v for name, v in out.items() if name.startswith(kind + " ")}
    assert len(found) == len(CASES), out
    return found


def test_products_equal_the_fp64_convolution_and_its_gradients_in_fp32(interpreted):
    """The kernels' products into fp32: y (causal, with bias), du (anticausal, with bias), dk (g correlated with u,
    summed over the batch) within the fp32 summation's bound of fp64 on the same rounded inputs, at every case's
    tiles; with operands in NaN-filled buffers, so no load reaches outside its operand (a NaN times a masked zero
    is NaN), and no store outside its output."""
    for name, excess in cases(interpreted, "products").items():
        assert all(e <= 1 for e in excess), (name, excess)  # a NaN fails too (NaN <= 1 is False)
    for name, kept in cases(interpreted, "stores").items():
        assert kept == [True, True], (name, "a store outside the output")


def test_toeplitz_conv_equals_the_fp64_convolution_and_its_gradients(interpreted):
    """toeplitz_conv and its backward (y, du, dk, dbias; and du, dbias for a frozen filter) against hyena.fftconv in
    fp64, of the rounded filter within a rounding of the output, of the twin's fp32 filter within that and the
    filter's rounding; dtypes as the twin's: y, du in u's dtype, dk, dbias fp32."""
    for kind in ("conv", "twin", "frozen"):
        for name, excess in cases(interpreted, kind).items():
            assert all(e <= 1 for e in excess), (name, excess)
    for name, dtypes in cases(interpreted, "dtypes").items():
        assert dtypes[1:] == [dtypes[0]] * 2 + ["float32"] * 2, (name, dtypes)


def test_toeplitz_conv_is_causal(interpreted):
    """Changing u from t0 on leaves y before t0 bitwise alone; changing g before t0 leaves du from t0 on alone."""
    for name, change in cases(interpreted, "causal").items():
        assert change == [0.0, 0.0], (name, change)


def test_the_kernel_serves_bf16_and_fp16_activations_only(interpreted):
    """In the interpreter (as on CUDA) the kernel takes bf16 and fp16; fp32 and fp64 keep FFTConv's precision
    (tl.dot would round fp32 to TF32)."""
    assert interpreted["served"] == [True, True, False, False]


def test_the_custom_ops_fakes_match_their_kernels(interpreted):
    """torch.compile traces fast::toeplitz_y, _du and _dk by their fakes: torch.library.opcheck runs each op and
    its fake on the same inputs (schema, and the fake's shape, dtype and strides against the real output's)."""
    assert interpreted["opcheck"] == [{"test_schema": "SUCCESS", "test_faketensor": "SUCCESS"}] * 3


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


def test_every_tile_configuration_is_one_the_kernels_take_on_a_gpu():
    """TILES and every TILE_SWEEP candidate (timed by bench.py --conv-tiles on the GPU) have their product's keys
    and shapes the kernels accept: powers of two; y, du: width a multiple of chunk, chunk of vec, vec of 8; dk: chunk <=
    width; each dot's M, N, K at least 16 (tl.dot's least) and its pipelined operands, stages x (M K + K N) bf16,
    within the 227 KB of shared memory an H100 block may use. (Each also compiles for sm_90 with no register
    spills: checked when the list was made, with triton.compile on a CPU; not rerun here.)"""
    keys = {"y": {"chunk", "width", "rows", "batch", "vec", "warps", "stages"}, "dk": {"chunk", "width", "rows", "warps",
                                                                                     "stages"}}
    for product in ("y", "du", "dk"):
        configs = [toeplitz.TILES[product], *toeplitz.TILE_SWEEP[product]]
        assert len(toeplitz.TILE_SWEEP[product]) >= 6 and toeplitz.TILES[product] in toeplitz.TILE_SWEEP[product]
        for t in configs:
            assert set(t) == keys["dk" if product == "dk" else "y"], (product, t)
            assert all(v > 0 and v & (v - 1) == 0 for k, v in t.items() if k != "stages"), (product, t)
            if product == "dk":
                m, n, k = t["chunk"], t["width"], t["rows"]
                assert t["chunk"] <= t["width"], (product, t)
            else:
                m, n, k = t["rows"] * t["batch"], t["width"], t["chunk"]
                assert t["width"] % t["chunk"] == 0 and t["chunk"] % t["vec"] == 0 and t["vec"] % 8 == 0, (product, t)
            assert min(m, n, k) >= 16 and t["stages"] * (m * k + k * n) * 2 <= 227 * 1024, (product, t)


def test_a_tile_whose_rows_are_not_16_byte_aligned_is_refused_by_name():
    """vec (the filter's shifted copies) below 8 leaves the Toeplitz rows unaligned: on an H100 vec=1 faulted with a
    misaligned address, which poisons the CUDA context. toeplitz_products refuses it before any launch."""
    x = torch.zeros(1, 2, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="vec of 8"):
        toeplitz.toeplitz_products(x, x[0], None, torch.empty_like(x), True, {**toeplitz.TILES["y"], "vec": 4})
