"""fast/mixer.py, Hyena's mixer fused around the block-Toeplitz convolution, against its plain twin hyena.mix; the
kernels run on the CPU in Triton's interpreter (tests/triton_interpreter.py).

Two checks. The gate kernels alone, on fp64 operands (they compute in fp32, so a few fp32 roundings, 2^-24 each, of
the largest value: 1e-6 relative to it is 16 of them, where a wrong index or mask is off by O(1)): z, dy and o, and
the backward's dp, dw, dwb against autograd of the plain short convolution and gates in fp64, with p a view into a
NaN-filled buffer (a read outside it, a mask missing, shows as a NaN). The whole mixer in bf16 (the Toeplitz kernel
takes bf16/fp16) against hyena.mix in fp64 on the same rounded inputs: its error comes from the roundings to bf16
where the twin stores values, first order in eps each: the forward rounds the short convolution's output, z, the
filter, y and o (5), the backward also dy, dz and each gate's gradient, and dp (4 more, 9 in all). Each rounding
changes a value by at most eps of it (the interpreter's casts truncate: eps, not eps / 2), and a sum or product
carries that through at most the same computation on absolute values; so |fast - fp64| <= 9 eps |...|abs, plus the
fp32 sums' n 2^-24 (n <= B L + 1), far below.
"""

import pytest
import torch

import fast
import hyena
from fast import mixer, toeplitz
from triton_interpreter import output_json, register

CHECK = """
import json, torch
import hyena
from fast import mixer, toeplitz

kept = dict(toeplitz.TILES), dict(mixer.GATE_TILES), dict(mixer.BACK_TILES)
tiles = dict(chunk=8, width=16, rows=2, batch=2, vec=8, warps=4, stages=2)
toeplitz.TILES.update(y=tiles, du=tiles, dk=dict(chunk=4, width=8, rows=4, warps=4, stages=2))
# tiles smaller than the channels and the positions, neither dividing them: masks and several tiles a program
mixer.GATE_TILES.update(BL=8, BD=4)
mixer.BACK_TILES.update(BL=16, BD=16)
out, B, L, D = {}, 2, 21, 6

def in_nans(x):
    # x (B, L, C) as a view into a NaN-filled buffer, a row and L positions on each side
    B, L, C = x.shape
    big = torch.full((B + 2, 3 * L, C), float("nan"), dtype=x.dtype)
    big[1:B + 1, L:2 * L] = x
    return big[1:B + 1, L:2 * L]

def rel(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()

torch.manual_seed(0)
p, go = torch.randn(B, L, 3 * D, dtype=torch.float64), torch.randn(B, L, D, dtype=torch.float64)
w, wb = torch.randn(3 * D, 3, dtype=torch.float64), torch.randn(3 * D, dtype=torch.float64)
y_t, dz_t = torch.randn(B, D, L, dtype=torch.float64), torch.randn(B, D, L, dtype=torch.float64)
# the plain gates, by autograd: f = <go, y x0> + <dz, x1 v> has gradients dp, dw, dwb where the gates' gradients are
# dx0 = go y, dx1 = dz v, dv = dz x1: what _gate_back computes from go, y and dz
a = [t.clone().requires_grad_() for t in (p, w, wb)]
x0, x1, v = hyena.short_conv(a[0], a[1][:, None], a[2]).split(D, dim=-1)
f = (go * y_t.transpose(1, 2) * x0).sum() + (dz_t.transpose(1, 2) * x1 * v).sum()
ref = torch.autograd.grad(f, a)
pn = in_nans(p)
dp, dw, dwb = mixer._gate_back_op(go, y_t, dz_t, pn, w, wb)
out["gates fp64"] = [rel(mixer._gate_in_op(pn, w, wb).transpose(1, 2), x1 * v),
                     rel(mixer._gate_grad_op(go, pn, w, wb).transpose(1, 2), go * x0),
                     rel(mixer._gate_out_op(y_t, pn, w, wb), y_t.transpose(1, 2) * x0),
                     rel(dp, ref[0]), rel(dw, ref[1]), rel(dwb, ref[2])]
# one batch row, one channel tile: the programs split the positions (72 = 5 tiles of 16, the last partial; on the
# CPU 4 programs at most, so 3 segments of 2 tiles, the last one's second tile past L), and the weight's gradient
# sums over them
p1, go1 = torch.randn(1, 72, 6, dtype=torch.float64), torch.randn(1, 72, 2, dtype=torch.float64)
y1, dz1 = torch.randn(1, 2, 72, dtype=torch.float64), torch.randn(1, 2, 72, dtype=torch.float64)
w1, wb1 = w[[0, 1, 6, 7, 12, 13]], wb[[0, 1, 6, 7, 12, 13]]
a = [t.clone().requires_grad_() for t in (p1, w1, wb1)]
x0, x1, v = hyena.short_conv(a[0], a[1][:, None], a[2]).split(2, dim=-1)
f = (go1 * y1.transpose(1, 2) * x0).sum() + (dz1.transpose(1, 2) * x1 * v).sum()
out["gates fp64"] += [rel(x, r) for x, r in zip(mixer._gate_back_op(go1, y1, dz1, p1.contiguous(), w1, wb1),
                                                torch.autograd.grad(f, a))]

def mixed(op, p, k, bias, go, gz, twin):
    # (o, z, dp, dw, dwb, dk, dbias) of `twin` (hyena.mix or mixer.mix), gradients go into o and gz into z
    a = [p.clone().requires_grad_(), k.clone().requires_grad_(), bias.clone().requires_grad_()]
    for prm in op.short_filter.parameters():
        prm.grad = None
    o, zs = twin(op, a[0], a[1], a[2])
    torch.autograd.backward(*(([o, zs[0]], [go, gz]) if go is not None else ([zs[0]], [gz])))
    if go is None:  # o unused: the long filter has no gradient
        return [a[0].grad, op.short_filter.weight.grad[:, 0], op.short_filter.bias.grad]
    return [o.detach(), zs[0].detach(), a[0].grad, op.short_filter.weight.grad[:, 0], op.short_filter.bias.grad,
            a[1].grad[:, 0], a[2].grad[0]]

torch.manual_seed(1)
op = hyena.HyenaOperator(D, L)
with torch.no_grad():  # every value of one scale (the initial short filter is small)
    op.short_filter.weight.normal_()
    op.short_filter.bias.normal_()
p, go, gz = torch.randn(B, L, 3 * D).bfloat16(), torch.randn(B, L, D).bfloat16(), torch.randn(B, L, D).bfloat16()
k, bias = (t.detach() for t in op.filters(L))
got = mixed(op, p, k, bias, go, gz, mixer.mix)
got_z = mixed(op, p, k, bias, None, gz, mixer.mix)  # only z's gradient (a prefill's input kept under autograd)
out["dtypes"] = [str(t.dtype)[6:] for t in got]
op64 = hyena.HyenaOperator(D, L).double()
with torch.no_grad():
    for name, prm in op64.short_filter.named_parameters():
        prm.copy_(getattr(op.short_filter, name).bfloat16())  # rounded, as the kernels take them
    args = (p.double(), k.bfloat16().double(), bias.double(), go.double(), gz.double())
    absolute = [x.abs() for x in args]
ref, ref_z = mixed(op64, *args, hyena.mix), mixed(op64, *args[:3], None, args[4], hyena.mix)
for prm in op64.short_filter.parameters():
    prm.data = prm.data.abs()
bound, bound_z = mixed(op64, *absolute, hyena.mix), mixed(op64, *absolute[:3], None, absolute[4], hyena.mix)
eps = torch.finfo(torch.bfloat16).eps
def excess(x, r, b):
    # max of |x - r| over its bound; where the bound is 0 (x0's gradients when o is unused) x must equal r exactly
    err, tol = (x.double() - r).abs(), (9 * eps + (B * L + 1) * 2 ** -24) * b
    return torch.where(tol > 0, err / tol, torch.where(err == 0, 0.0, float("inf"))).max().item()

out["mix bf16"] = [excess(x, r, b) for x, r, b in zip(got + got_z, ref + ref_z, bound + bound_z)]
out["mix bf16 relative"] = [rel(x, r) for x, r in zip(got, ref)]
# causality, exactly: p changed from t0 on leaves o and z before t0 alone
t0 = L // 2
p2 = p.clone()
p2[:, t0:] = torch.randn(B, L - t0, 3 * D).bfloat16()
with torch.no_grad():
    o2, (z2,) = mixer.mix(op, p2, k, bias)
out["causal"] = [(o2[:, :t0] - got[0][:, :t0]).abs().max().item(), (z2[:, :t0] - got[1][:, :t0]).abs().max().item()]
# torch.compile traces the kernels by their fakes
w16, wb16 = w.bfloat16(), wb.bfloat16()
# small operands: opcheck runs each op several times
p16, go16, y16 = p[:1, :9].contiguous(), go[:1, :9], y_t[:1, :, :9].bfloat16()
out["opcheck"] = [torch.library.opcheck(op_, args_, test_utils=("test_schema", "test_faketensor"))
                  for op_, args_ in ((mixer._gate_in_op, (p16, w16, wb16)),
                                     (mixer._gate_grad_op, (go16, p16, w16, wb16)),
                                     (mixer._gate_out_op, (y16, p16, w16, wb16)),
                                     (mixer._gate_back_op, (go16, y16, y16, p16, w16, wb16)))]
toeplitz.TILES.clear(), toeplitz.TILES.update(kept[0])
mixer.GATE_TILES.update(kept[1]), mixer.BACK_TILES.update(kept[2])
print(json.dumps(out))
"""

register("fused mixer", CHECK)


@pytest.fixture(scope="module")
def interpreted():
    """CHECK's results, run once in Triton's interpreter."""
    return output_json("fused mixer")


def test_gate_kernels_equal_the_plain_gates_and_their_gradients_in_fp64(interpreted):
    """z = v x1 and dy = do x0 (channels first), o = y x0, and the backward's dp, dw, dwb (the short convolution's
    transpose of the gates' gradients) equal the plain short convolution's and gates' in fp64, reading p through
    a view into NaNs (a NaN fails the comparison); to 1e-6 of the largest value (the kernels' fp32 arithmetic). The
    backward also with its positions split over several programs (one batch row, one channel tile), whose
    weight-gradient sums are added."""
    assert len(interpreted["gates fp64"]) == 9
    assert all(e <= 1e-6 for e in interpreted["gates fp64"]), interpreted["gates fp64"]


def test_fused_mixer_equals_the_fp64_mixer_and_its_gradients(interpreted):
    """mixer.mix in bf16 (o, z, dp, the short filter's dw and dwb, the long filter's dk and dbias, with gradients
    into o and z; and dp, dw, dwb with one into z alone) within 9 bf16 roundings of hyena.mix in fp64 on the same
    rounded inputs (the module's docstring); dtypes as the twin's under autocast: o, z, dp in p's dtype, the
    parameters' gradients fp32."""
    assert len(interpreted["mix bf16"]) == 10
    assert all(e <= 1 for e in interpreted["mix bf16"]), interpreted["mix bf16"]
    assert interpreted["dtypes"] == ["bfloat16"] * 3 + ["float32"] * 4


def test_fused_mixer_is_causal(interpreted):
    """Changing p from t0 on leaves o and z before t0 bitwise alone."""
    assert interpreted["causal"] == [0.0, 0.0]


def test_the_gate_ops_fakes_match_their_kernels(interpreted):
    """torch.compile traces fast::gate_in, gate_grad, gate_out and gate_back by their fakes: opcheck runs each
    op and its fake on the same inputs."""
    assert interpreted["opcheck"] == [{"test_schema": "SUCCESS", "test_faketensor": "SUCCESS"}] * 4


def test_mix_hands_what_the_kernels_do_not_serve_to_the_plain_mixer(monkeypatch):
    """Where the kernels do not serve (off CUDA and the interpreter, fp32 activations, order 3, past
    TOEPLITZ_MAX_L, a long convolution other than hyena.fftconv's) mixer.mix is hyena.mix, bitwise."""
    torch.manual_seed(0)
    op2, op3 = hyena.HyenaOperator(4, 16), hyena.HyenaOperator(4, 16, order=3)
    for op in (op2, op3):
        p = torch.randn(2, 9, (op.order + 1) * 4)
        k, bias = op.filters(9)
        for x in (p, p.bfloat16()):
            got, want = mixer.mix(op, x, k, bias), hyena.mix(op, x, k, bias)
            assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    monkeypatch.setattr(toeplitz, "available", lambda u: True)  # would launch a kernel on CPU tensors: an error
    p, (k, bias) = torch.randn(2, 9, 12).bfloat16(), op2.filters(9)
    assert mixer.serves(op2, p) and not mixer.serves(op3, torch.randn(2, 9, 16).bfloat16())
    monkeypatch.setattr(toeplitz, "TOEPLITZ_MAX_L", 8)
    assert not mixer.serves(op2, p)
    monkeypatch.setattr(toeplitz, "TOEPLITZ_MAX_L", 8192)
    op2.long_conv = lambda u, k, bias: u  # not the convolution the kernels compute
    assert not mixer.serves(op2, p)


def test_install_puts_the_fused_mixer_in_and_takes_it_out():
    op = hyena.HyenaOperator(4, 16)
    assert fast.install(op).mix is mixer.mix and fast.install(op, on=False).mix is hyena.mix
