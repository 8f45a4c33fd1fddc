"""Modal filters (Laughing Hyena, modal/): the fit (modal/fit.py), ModalFilter's recurrence in a HyenaOperator,
to_modal, modal students built and loaded (modal/student.py), and fast/'s twin of the prefill's state."""
import json
import math

import pytest
import torch

import fast
from pretrained.config import from_hf, to_hf
from fast import decode
from hyena import Cache, Config, GPTNeoX, HyenaFilter, HyenaOperator, fftconv, make_student, new_cache
from modal import fit
from modal.student import ModalFilter, build, load_pretrained, to_modal
from triton_interpreter import output, register

TINY = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=3, vocab_size=64,
            max_position_embeddings=32)


def random_modes(C, d, real=0, seed=0):
    """(h0, log_decay, angle, residues) of d modes per channel, the last `real` of them real poles."""
    g = torch.Generator().manual_seed(seed)
    rate = torch.rand(C, d, generator=g, dtype=torch.float64) * 0.08 + 0.01
    angle = torch.rand(C, d, generator=g, dtype=torch.float64) * 2.8 + 0.2  # distinct, away from 0 and pi
    if real:
        angle[:, d - real:] = 0.0
    R = torch.randn(C, d, 2, generator=g, dtype=torch.float64)
    return torch.randn(C, generator=g, dtype=torch.float64), rate.log(), angle, R


def test_modal_response_follows_the_documented_convention():
    h0, w, th, R = random_modes(3, 4)
    h = fit.modal_response(h0, w, th, R, 50)  # (L, C)
    lam, Rc = torch.polar(torch.exp(-w.exp()), th), torch.complex(R[..., 0], R[..., 1])
    ref = torch.stack([h0] + [2 * (Rc * lam ** (t - 1)).sum(-1).real for t in range(1, 50)])
    assert h.shape == (50, 3) and (h - ref).abs().max().item() <= 1e-12


@pytest.mark.parametrize("L", [1, 2, 5, 37, 64])
def test_prefill_state_equals_the_recurrence_run_over_the_prompt(L):
    _, w, th, _ = random_modes(5, 3)
    z = torch.randn(2, L, 5, dtype=torch.float64)
    lam, x = torch.polar(torch.exp(-w.exp()), th), torch.zeros(2, 5, 3, dtype=torch.complex128)
    for t in range(L):
        x = lam * x + z[:, t, :, None]
    assert (fit.prefill_state(z, w, th) - x).abs().max().item() <= 1e-12


SCAN_CHECK = """
import math, torch
import fast
from fast import decode
from modal import fit
assert decode.available(torch.zeros(1))  # Triton's interpreter: the kernel serves CPU tensors
g = torch.Generator().manual_seed(0)
C, d = 40, 5  # channels not a multiple of the program's block, modes not a power of 2
chunk, decode.SCAN_CHUNK = decode.SCAN_CHUNK, 16  # short chunks: the interpreter runs each position in turn
w = torch.empty(C, d).uniform_(math.log(1e-4), math.log(0.5), generator=g)
th = torch.rand(C, d, generator=g) * math.pi
worst = plain = 0.0
for L in (1, 7, decode.SCAN_CHUNK, 2 * decode.SCAN_CHUNK + 3):  # one, part of one, exactly one, and 3 chunks
    for dtype in (torch.float32, torch.bfloat16):
        z = torch.randn(2, L, C, generator=g).to(dtype)
        ref = fit.prefill_state(z.double(), w.double(), th.double())
        out = decode.prefill_state(z, w, th)
        assert out.shape == ref.shape and out.dtype == torch.complex64
        worst = max(worst, ((out - ref).abs().max() / ref.abs().max()).item())
        plain = max(plain, ((fit.prefill_state(z, w, th) - ref).abs().max() / ref.abs().max()).item())
decode.SCAN_CHUNK = chunk
print(plain, worst)
"""
register("modal scan", SCAN_CHECK)


def test_prefill_scan_kernel_equals_the_plain_state_in_tritons_interpreter():
    """fast.decode.prefill_state (a Triton scan), run on the CPU by Triton's interpreter, against the plain
    modal.fit.prefill_state in fp64 (GPU agreement: bench.py's check section)."""
    plain, fast_err = map(float, output("modal scan").split()[-2:])
    assert fast_err <= max(2 * plain, 1e-6), (plain, fast_err)  # fp32 rounding, no worse than the plain twin's


MIX_CHECK = """
import copy, torch
import hyena
from fast import decode
from hyena import Cache, HyenaOperator
from modal.student import ModalFilter
torch.manual_seed(0)
D, d, B, steps = 40, 5, 3, 3  # channels not a multiple of the program's block, modes not a power of 2
for order in (2, 3):
    op = HyenaOperator(D, l_max=16, order=order)
    op.filter_fn = ModalFilter(D * (order - 1), d)
    u = torch.randn(B, 9 + steps, D)
    errs = {}
    for dtype in (torch.float32, torch.bfloat16):  # the tail (projections) in the model's dtype
        runs = []
        plain = hyena.mix_step
        for mix, prec in ((plain, torch.float64), (plain, torch.float32), (decode.mix_step, torch.float32)):
            def refuse(*args):  # the fused run must not hand its step to the plain one
                raise AssertionError("decode.mix_step fell back to hyena.mix_step")
            hyena.mix_step = refuse if mix is decode.mix_step else plain
            m = copy.deepcopy(op).to(prec)
            cache = Cache(max_len=9 + steps, pos=torch.tensor(9), layers=[None])
            with torch.no_grad():
                m(u[:, :9].to(prec), cache)  # the prefill fills the state
                state = cache.layers[0]
                state.tail = state.tail.to(dtype if prec == torch.float32 else prec)
                outs = [mix(m, state, m.in_proj(u[:, t].to(prec)).to(state.tail.dtype), cache.pos).double()
                        for t in range(9, 9 + steps)]
            runs.append((torch.stack(outs), state.tail.double(), torch.view_as_real(state.state).double()))
        hyena.mix_step = plain
        ref = runs[0]
        rel = lambda x, r: ((x - r).norm() / r.norm()).item()
        errs[dtype] = [[rel(x, r) for x, r in zip(run, ref)] for run in runs[1:]]  # plain, fused: out, tail, state
        print(order, dtype, errs[dtype])
        (plain_out, plain_tail, plain_state), (out, tail, state) = errs[dtype]
        assert out <= max(2 * plain_out, 1e-6) and state <= max(2 * plain_state, 1e-6), errs[dtype]
        assert tail <= max(plain_tail, 1e-7), errs[dtype]  # the same rounding of the kept projections
print("ok")
"""
register("modal mix", MIX_CHECK)


def test_fused_modal_step_equals_the_plain_step_in_tritons_interpreter():
    """fast.decode.mix_step (the short conv, each recurrence and the gates in one Triton kernel), run on the CPU by
    Triton's interpreter, against hyena.mix_step in fp64, over several steps (the tail and the states move in
    place): its outputs and states no further from fp64 than the plain step's in fp32, with projections kept
    in fp32 or bf16."""
    assert output("modal mix").split()[-1] == "ok"


@pytest.mark.parametrize("order", [2, 3])
def test_recurrent_decoding_equals_the_fft_convolution_with_the_materialised_filter(order):
    """Prefill (FFT + exact state) then one-token recurrence steps = the full forward, whose long convolutions
    are FFTs with ModalFilter's materialised filter (fp64)."""
    torch.manual_seed(order)
    op = HyenaOperator(8, l_max=16, order=order)
    op.filter_fn = ModalFilter(8 * (order - 1), 4)  # what modal.student.build does in a model
    op = op.double()
    u = torch.randn(2, 40, 8, dtype=torch.float64)  # beyond l_max: a modal filter has no length limit
    full = op(u)
    cache = Cache(max_len=40, pos=torch.tensor(0), layers=[None])  # one layer: the operator alone
    outs = [op(u[:, :13], cache)]
    cache.advance(13)  # GPTNeoX.forward advances the position after its layers; alone, the caller does
    for t in range(13, 40):
        outs.append(op(u[:, t:t + 1], cache))
        cache.advance(1)
    err = (torch.cat(outs, 1) - full).abs().max().item()
    print(f"order {order}: recurrence vs FFT: {err:.1e}")
    assert err <= 1e-10
    k, bias = op.filters(40)  # and the FFT path is the convolution with that filter
    p = op.in_proj(u)
    from hyena import short_conv
    *x, v = short_conv(p, op.short_filter.weight, op.short_filter.bias).split(8, dim=-1)
    for o, x_i in enumerate(reversed(x[1:])):
        v = fftconv(v * x_i, k[:, o], bias[o])
    assert (op.out_proj(v * x[0]) - full).abs().max().item() <= 1e-12


@pytest.mark.parametrize("real", [0, 1, 2])
def test_a_sum_of_d_modes_is_recovered_exactly(real):
    h0, w, th, R = random_modes(6, 5, real=real, seed=real)
    h = fit.modal_response(h0, w, th, R, 300)
    f = fit.fit(h, 5)
    print(f"{real} real poles: rel error {f.rel_error:.1e}")
    assert f.rel_error <= 1e-6 and f.channel_error.max().item() <= 1e-6
    lam = torch.polar(torch.exp(-w.exp()), th)
    found = torch.polar(torch.exp(-f.log_decay.exp()), f.angle)
    assert (found[..., None] - lam[:, None]).abs().min(-1).values.max().item() <= 1e-6  # the poles themselves


def test_fit_error_falls_as_the_state_grows_on_an_implicit_filter():
    torch.manual_seed(0)
    with torch.no_grad():
        h = HyenaFilter(8, l_max=256)(256).double()  # a Hyena filter: smooth, decaying, many frequencies
    errs = [fit.fit(h, d).rel_error for d in (1, 2, 4, 8, 16)]
    print("rel errors for d = 1, 2, 4, 8, 16:", [f"{e:.1e}" for e in errs])
    assert all(b < 0.8 * a for a, b in zip(errs, errs[1:])) and errs[-1] < 0.02
    sv = fit.hankel_singular_values(h)
    assert sv.shape[0] == 8 and (sv[:, 1:] <= sv[:, :-1] + 1e-12).all()
    tol = fit.fit_tol(h, tol=errs[2] * 1.01, max_state=16)  # the smallest power of two meeting the tolerance
    assert tol.state_size == 4 and tol.rel_error <= errs[2] * 1.01


def test_refinement_never_makes_the_fit_worse():
    torch.manual_seed(1)
    with torch.no_grad():
        h = HyenaFilter(4, l_max=128)(128).double()
    plain, refined = fit.fit(h, 2), fit.fit(h, 2, refine_steps=30)
    assert (refined.channel_error <= plain.channel_error + 1e-12).all()
    assert refined.rel_error < plain.rel_error


def randomized(cfg, seed=0):
    torch.manual_seed(seed)
    model = GPTNeoX(Config(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # non-zero biases and LayerNorms
    return model


def modal_student(layers=None, order=2, d=4):
    teacher = randomized({**TINY, "hyena_order": order})
    return to_modal(make_student(teacher, layers=layers), state_size=d).eval()


@pytest.mark.parametrize("layers", [None, [0, 2]], ids=["hyena", "hybrid"])
@pytest.mark.parametrize("order", [2, 3])
def test_cached_greedy_generation_of_a_modal_student_equals_full_forward(layers, order):
    model = modal_student(layers, order)
    prompt = torch.randint(0, 64, (2, 7))
    out = model.generate(prompt, max_new_tokens=25, temperature=0)
    with torch.no_grad():
        full = model(out)[0]
    assert out.shape == (2, 32) and torch.equal(out[:, :7], prompt)
    assert torch.equal(full[:, 6:-1].argmax(-1), out[:, 7:])  # greedy tokens are the full forward's argmax
    cache = new_cache(model, 32)
    with torch.no_grad():
        steps = [model(out[:, :7], cache=cache)[0]] + [model(out[:, i:i + 1], cache=cache)[0] for i in range(7, 32)]
    assert (torch.cat(steps, 1) - full[:, 6:]).abs().max().item() <= 1e-4


def test_modal_cache_size_does_not_depend_on_the_context():
    model = modal_student()
    sizes = {}
    for ctx, max_len in ((8, 10), (8, 10 ** 12), (40, 10 ** 12)):
        cache = new_cache(model, max_len)  # room for 10^12 positions: nothing O(max_len) is allocated
        with torch.no_grad():
            model(torch.randint(0, 64, (2, ctx)), cache=cache)
            model(torch.randint(0, 64, (2, 1)), cache=cache)
        sizes[ctx, max_len] = cache.nbytes()
        assert all(type(state).__name__ == "ModalState" for state in cache.layers)  # no z history, no k_pad
    assert len(set(sizes.values())) == 1, sizes
    conv = make_student(randomized(TINY))  # the convolutional student's history does grow (the check can fail)
    grown = []
    for max_len in (10, 30):
        cache = new_cache(conv, max_len)
        with torch.no_grad():
            conv(torch.randint(0, 64, (2, 8)), cache=cache)
        grown.append(cache.nbytes())
    assert grown[1] > grown[0]


def test_a_modal_student_runs_at_four_times_its_l_max():
    model = modal_student()
    L = 4 * model.config.l_max
    idx = torch.randint(0, 64, (1, L))
    with torch.no_grad():
        full = model(idx)[0]
        cache = new_cache(model, L)
        steps = [model(idx[:, :L - 3], cache=cache)[0]] + [model(idx[:, i:i + 1], cache=cache)[0]
                                                           for i in range(L - 3, L)]
    assert full.shape == (1, L, 64) and torch.isfinite(full).all()
    assert (torch.cat(steps, 1) - full[:, L - 4:]).abs().max().item() <= 1e-4
    out = model.generate(idx[:, :8], max_new_tokens=L - 8 + 5, temperature=0)  # decoding past 4 l_max too
    assert out.shape == (1, L + 5)


def test_to_modal_keeps_everything_but_the_filters_and_round_trips(tmp_path):
    student = make_student(randomized(TINY), layers=[0, 2]).eval()
    model = to_modal(student, state_size=6)
    assert model.config.hyena_modal_state == [6, 0, 6] and student.config.hyena_modal_state == [0, 0, 0]
    assert [f["layer"] for f in model.modal_fit] == [0, 2]
    ours, theirs = model.state_dict(), student.state_dict()
    for k, v in theirs.items():
        if ".filter_fn." not in k or k.endswith("filter_fn.bias"):
            assert torch.equal(ours[k], v), k
    for f, i in zip(model.modal_fit, (0, 2)):  # the reported error is the filter's, at l_max
        h = student.gpt_neox.layers[i].hyena.filter_fn(32).double()
        hm = model.gpt_neox.layers[i].hyena.filter_fn(32).double()
        assert math.isclose(f["rel_error"], ((h - hm).norm() / h.norm()).item(), rel_tol=1e-4)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["hyena"]["modal_state"] == [6, 0, 6]
    again = load_pretrained(tmp_path)
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        assert torch.equal(again(idx)[0], model(idx)[0])
    by_tol = to_modal(student, state_size=None, tol=1e-3, max_state=8)
    assert all(f["rel_error"] <= 1e-3 or f["state_size"] == 8 for f in by_tol.modal_fit)
    with pytest.raises(ValueError, match="not both or neither"):
        to_modal(student, state_size=4, tol=1e-3)
    with pytest.raises(ValueError, match="all attention"):
        to_modal(randomized(TINY), state_size=4)


def test_config_refuses_bad_modal_states():
    with pytest.raises(ValueError, match="must list 3 entries"):
        Config(**TINY, mixers=["hyena"] * 3, hyena_modal_state=[4, 4])
    with pytest.raises(ValueError, match="layer 1 is 'attention'"):
        Config(**TINY, mixers=["hyena", "attention", "hyena"], hyena_modal_state=[4, 4, 4])
    with pytest.raises(ValueError, match=r"hyena_modal_state\[0\] = -1"):
        Config(**TINY, mixers=["hyena"] * 3, hyena_modal_state=[-1, 0, 0])
    assert from_hf(to_hf(Config(**TINY, mixers=["hyena"] * 3))).hyena_modal_state == [0, 0, 0]


def test_modal_decoding_steps_never_read_the_device_back(no_host_reads):
    """Fixed shapes and no .item() in a modal step: what fast.step.graphed_step needs to capture it."""
    model = modal_student([0, 2])
    idx = torch.randint(0, 64, (2, 12))
    cache = new_cache(model, 12)
    with torch.no_grad():
        model(idx[:, :8], cache=cache)
        state = cache.layers[0].state
        with no_host_reads():
            steps = [model(idx[:, i:i + 1], cache=cache)[0] for i in range(8, 12)]
        assert cache.layers[0].state is state  # updated in place: a replayed graph sees the same storage
        full = model(idx)[0]
    for i, logits in zip(range(8, 12), steps):
        assert torch.allclose(logits[:, 0], full[:, i], atol=1e-4)


def test_the_core_refuses_modal_configs_by_name_and_modal_builds_and_loads_them(tmp_path):
    """hyena.py builds implicit filters only: a modal config or checkpoint is refused, naming the functions that
    build and load it (modal.student.build, load_pretrained), which give the same model back."""
    cfg = Config(**TINY, mixers=["hyena", "attention", "hyena"], hyena_modal_state=[4, 0, 2])
    with pytest.raises(ValueError, match=r"modal\.student\.build\(cfg\).*modal\.student\.load_pretrained"):
        GPTNeoX(cfg)
    torch.manual_seed(0)
    model = build(cfg).eval()
    assert model.config == cfg and [type(b.hyena.filter_fn).__name__ for b in model.gpt_neox.layers[::2]] == \
        ["ModalFilter", "ModalFilter"] and model.gpt_neox.layers[2].hyena.filter_fn.state_size == 2
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="load one with modal.student.load_pretrained"):
        GPTNeoX.from_pretrained(tmp_path)
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path).eval()(idx)[0], model(idx)[0])
    plain = make_student(randomized(TINY))  # and any other checkpoint, as GPTNeoX.from_pretrained
    plain.save_pretrained(tmp_path / "conv")
    assert torch.equal(load_pretrained(tmp_path / "conv")(idx)[0], GPTNeoX.from_pretrained(tmp_path / "conv")(idx)[0])


def test_fast_install_gives_a_modal_filter_the_scan_twin_and_it_decodes_the_same():
    """fast.install puts fast.decode.prefill_state in each ModalFilter's place of modal.fit.prefill_state; without
    a kernel (CPU, no Triton interpreter) the twin hands over to its plain function, and decoding is unchanged."""
    model = modal_student([0, 2])
    idx = torch.randint(0, 64, (2, 16))
    plain = model.generate(idx[:, :8], 8, temperature=0)
    fast.install(model)
    filters = [b.hyena.filter_fn for b in model.gpt_neox.layers[::2]]
    assert all(f.prefill_state is decode.prefill_state for f in filters)
    assert torch.equal(model.generate(idx[:, :8], 8, temperature=0), plain)
    fast.install(model, False)
    assert all(f.prefill_state is fit.prefill_state for f in filters)
