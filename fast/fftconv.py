"""The Hyena long convolution, fast: hyena.fftconv with a hand-written backward and a layout for speed.

`fftconv` here computes the same function as `hyena.fftconv` (the plain definition: FFTs of size >= 2L along
time, differentiated by autograd); the test
    tests/test_hyena_operator.py::test_fast_fftconv_equals_the_reference_and_so_do_its_gradients
holds the two equal, output and gradients, and bench/bench.py's check section does on the GPU. fast.install
puts it in a HyenaOperator's `long_conv`.
"""
import torch

from hyena import fft_size


def fftconv(u, k, bias):
    """hyena.fftconv, the plain definition, computed faster (FFTConv): u (B, L, D), k (L, D), bias (D,).
    Plain twin: hyena.fftconv; held equal by
    tests/test_hyena_operator.py::test_fast_fftconv_equals_the_reference_and_so_do_its_gradients
    (and gradcheck-ed by tests/test_hyena_operator.py::test_fast_fftconv_passes_gradcheck_and_skips_gradients_nobody_needs)."""
    with torch.autocast(u.device.type, enabled=False):
        return FFTConv.apply(u, k, bias)


def channels_first(x, n, dtype):
    """(B, L, C) -> (B, C, n) in `dtype`, zero-padded along time: cuFFT is fastest along a contiguous axis (a
    strided time axis makes torch copy anyway). One pass: the transpose, the cast and the padding together."""
    B, L, C = x.shape
    out = x.new_empty(B, C, n, dtype=dtype)
    out[..., L:].zero_()
    out[..., :L].copy_(x.transpose(1, 2))
    return out  # (B, C, n)


def cmul(a, b, conj_b=False):
    """a * b, or a * conj(b), for complex tensors. Under torch.compile as real arithmetic on view_as_real, which
    inductor fuses into one pass (it leaves complex ops to generic, broadcast-slow kernels); eagerly one complex op.
    Plain twin: torch.mul (the complex a * b); held equal by
    tests/test_hyena_operator.py::test_complex_product_in_real_arithmetic_equals_the_complex_op."""
    if not torch.compiler.is_compiling():
        return a * (b.conj() if conj_b else b)
    (ar, ai), (br, bi) = torch.view_as_real(a).unbind(-1), torch.view_as_real(b).unbind(-1)
    bi = -bi if conj_b else bi
    return torch.view_as_complex(torch.stack((ar * br - ai * bi, ar * bi + ai * br), dim=-1).contiguous())


@torch.library.custom_op("hyena::rfft", mutates_args=())
def rfft(x: torch.Tensor) -> torch.Tensor:
    """torch.fft.rfft along the last axis, as an op torch.compile does not look into: inductor must then hand
    it the contiguous layout it was traced with. Left to itself, inductor lays the padded channels-first copy
    out time-strided (the order of the activations it came from), and torch then copies it once more before
    calling cuFFT."""
    return torch.fft.rfft(x)


@rfft.register_fake
def _(x):
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2 + 1, dtype=torch.promote_types(x.dtype, torch.complex64))


class FFTConv(torch.autograd.Function):
    """hyena.fftconv with a hand-written backward and a layout for speed (measurements: README, results/):
    FFTs run along a contiguous time axis, channels first (`channels_first`); the 1/n of the inverse FFT is folded
    into the filter's padded copy (no extra pass over the output); the input's spectrum is kept for the
    filter's gradient. With y = irfft(U K)[:L] + bias u, and G the spectrum of dLoss/dy:
      du = irfft(G conj(K))[:L] + bias g   (correlation with the filter)
      dk = irfft(sum_b G conj(U))[:L]      (correlation with the input, summed over the batch)
    both exact for n >= 2L, where the circular correlation never wraps into real samples.
    Plain twin: hyena.fftconv (autograd's backward); held equal by
    tests/test_hyena_operator.py::test_fast_fftconv_equals_the_reference_and_so_do_its_gradients."""

    @staticmethod
    def forward(ctx, u, k, bias):
        B, L, D = u.shape
        n, dtype = fft_size(2 * L), torch.promote_types(u.dtype, torch.float32)
        U = rfft(channels_first(u, n, dtype))  # (B, D, n/2+1)
        K = rfft(channels_first(k[None].to(dtype) / n, n, dtype)[0])  # (D, n/2+1), scaled by 1/n in the copy
        y = torch.fft.irfft(cmul(U, K), n=n, norm="forward")[..., :L]  # (B, D, L); unscaled inverse
        ctx.save_for_backward(u, U, K, bias)
        return (y.transpose(1, 2) + u.to(dtype) * bias.to(dtype)).to(u.dtype)  # (B, L, D)

    @staticmethod
    def backward(ctx, g):
        u, U, K, bias = ctx.saved_tensors
        B, L, D = u.shape
        n, dtype = fft_size(2 * L), U.real.dtype
        G = rfft(channels_first(g, n, dtype))  # (B, D, n/2+1)
        du = dk = dbias = None
        if ctx.needs_input_grad[0]:
            du = torch.fft.irfft(cmul(G, K, conj_b=True), n=n, norm="forward")[..., :L]  # (B, D, L)
            du = (du.transpose(1, 2) + g.to(dtype) * bias.to(dtype)).to(u.dtype)  # (B, L, D)
        if ctx.needs_input_grad[1]:
            dk = torch.fft.irfft(cmul(G, U, conj_b=True).sum(0), n=n)[:, :L].t()  # (L, D); autograd casts to k's dtype
        if ctx.needs_input_grad[2]:
            dbias = (g.to(dtype) * u.to(dtype)).sum((0, 1))  # (D,)
        return du, dk, dbias
