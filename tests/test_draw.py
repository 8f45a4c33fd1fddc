"""fast/draw.py, generate's draw in two kernels, against its plain twin hyena.sample; the kernel runs on the CPU in
Triton's interpreter (tests/triton_interpreter.py).

hyena.sample draws argmax(softmax(x / T) / E) with E from Tensor.exponential_; the kernel draws argmax(x / T - log E)
with E = -log U, U from torch.rand: the same argmax (the softmax's normalizer is one number a row). Given the same
E (the plain draw's exponential_ replaced by -log U), both pick the same tokens, barring a near-tie within fp32
rounding of two scores (none in these draws: the check would show it). And drawn many times, the kernel's tokens
follow the softmax (a chi-square test at a fixed seed).
"""

import pytest
import torch

import fast
import hyena
from fast import draw
from triton_interpreter import output_json, register

CHECK = """
import json, torch
import hyena
from fast import draw

kept = draw.DRAW_BLOCK
draw.DRAW_BLOCK = 256  # several blocks a row, the last one partial
out = {}
torch.manual_seed(0)
B, V = 16, 1000
for dtype in (torch.float32, torch.bfloat16):
    logits = (3 * torch.randn(B, V)).to(dtype)
    for T in (1.0, 0.5, 2.0):
        state = torch.get_rng_state()
        got = draw.sample(logits, T)
        torch.set_rng_state(state)
        u = torch.rand(B, V)  # the noise the kernel drew
        exponential = torch.Tensor.exponential_
        torch.Tensor.exponential_ = lambda self: self.copy_(-torch.log(u))
        try:
            want = hyena.sample(logits, T)
        finally:
            torch.Tensor.exponential_ = exponential
        out[f"same noise {str(dtype)[6:]} T={T}"] = [got.shape == want.shape, got.dtype == want.dtype,
                                                     int((got != want).sum())]
# drawn many times from one row: the tokens against softmax(x / T), chi-square over 4 tokens (3 degrees of freedom)
x = torch.tensor([[0.0, 0.7, 1.1, 1.4]])
draw.DRAW_BLOCK = 8  # half the block past V: masked entries must never win
for T in (1.0, 0.5):
    n = 400
    tokens = draw.sample(x.expand(n, 4), T)[:, 0]
    expect = n * torch.softmax(x[0] / T, -1)
    counts = torch.bincount(tokens, minlength=4).double()
    out[f"chi2 T={T}"] = ((counts - expect) ** 2 / expect).sum().item()
# equal maxima in blocks 1 and 2 (and everywhere): the first wins, as argmax keeps it
draw.DRAW_BLOCK = 256
x = torch.zeros(2, 1000)
x[0, 300] = x[0, 700] = 5.0
rand = torch.rand
torch.rand = lambda *shape, **kw: torch.full(shape, 0.5)  # equal noise: ties stay ties
try:
    out["ties"] = draw.sample(x, 1.0)[:, 0].tolist()
finally:
    torch.rand = rand
# 768 = 3 blocks of 256, padded to 4 partial sums: padding filled with the largest values must never count as a
# block; a row of NaN logits draws token 0, as the plain draw does (never a token past the vocabulary)
x = 3 * torch.randn(2, 768)
x[0, 700] = 100.0  # the winner in the last block, not the first
x[1] = float("nan")
empty = torch.empty
torch.empty = lambda *shape, dtype=None, **kw: empty(*shape, dtype=dtype, **kw).fill_(
    2 ** 62 if dtype == torch.long else 3e38)
state = torch.get_rng_state()
try:
    got = draw.sample(x, 1.0)[:, 0].tolist()
finally:
    torch.empty = empty
torch.set_rng_state(state)
want = (x[0] - torch.log(-torch.log(torch.rand(2, 768)[0]))).argmax().item()
out["padding, nan"] = [got[0] == want, got[1]]
draw.DRAW_BLOCK = kept
print(json.dumps(out))
"""

register("draw", CHECK)


@pytest.fixture(scope="module")
def interpreted():
    return output_json("draw")


def test_fused_draw_equals_the_plain_draw_on_the_same_noise(interpreted):
    """Given the plain draw the kernel's noise (E = -log U), both pick the same token in every row, at three
    temperatures, for fp32 and bf16 logits; shapes (B, 1) and dtype int64 alike."""
    same = {k: v for k, v in interpreted.items() if k.startswith("same noise")}
    assert len(same) == 6 and all(v == [True, True, 0] for v in same.values()), same


def test_fused_draw_keeps_the_first_of_equal_maxima_across_blocks(interpreted):
    """Equal scores at 300 and 700 (blocks 1 and 2 of 256) give 300, a row of equal scores gives 0: the plain
    draw's argmax keeps the first maximum, so a tie must not go to a later block."""
    assert interpreted["ties"] == [300, 0], interpreted


def test_fused_draw_never_reads_the_padding_and_draws_token_0_from_a_nan_row(interpreted):
    """Three blocks padded to four partial sums, the padding holding the largest float and int: the token is the
    same-noise argmax; a row of NaN logits gives token 0, as hyena.sample does, never an index past V."""
    assert interpreted["padding, nan"] == [True, 0], interpreted


def test_fused_draw_follows_the_softmax(interpreted):
    """400 draws of one row at T = 1 and T = 0.5: chi-square against softmax(x / T) below 16.3 (3 degrees of
    freedom: p = 0.001), where drawing uniformly would give about 120 and ignoring T = 0.5 about 80."""
    for T in ("1.0", "0.5"):
        assert interpreted[f"chi2 T={T}"] < 16.3, interpreted


def test_draw_hands_greedy_top_k_and_the_cpu_to_the_plain_sample():
    """Off CUDA and the interpreter, at temperature 0 and with top_k, draw.sample is hyena.sample, bitwise
    (the same generator state gives the same tokens); fast.install puts it in GPTNeoX.sample."""
    logits = torch.randn(3, 50)
    for T, k in ((1.0, None), (0, None), (1.0, 5)):
        state = torch.get_rng_state()
        a = draw.sample(logits, T, k)
        torch.set_rng_state(state)
        assert torch.equal(a, hyena.sample(logits, T, k))
    model = hyena.GPTNeoX(hyena.Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32))
    assert model.sample is hyena.sample and fast.install(model).sample is draw.sample
