"""The whole decoding step in few kernels (fast/step.py) against the eager step it replaces."""
import torch

from fast import step as fstep
from hyena import Config, GPTNeoX, new_cache
from triton_interpreter import run_interpreted

FUSED_CHECK = """
import copy
from dataclasses import replace
import torch
import fast
from fast import step as fstep
from hyena import Config, eager_step, new_cache
from modal.student import build
torch.manual_seed(0)
# one layer of each kind a step takes: attention (RoPE on 4 of 16 dims), a modal Hyena layer (fast.decode.mix_step),
# a convolutional one (its history); the vocabulary not a multiple of the head's column block
cfg = Config(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64, mixers=["attention", "hyena", "hyena"], hyena_modal_state=[0, 4, 0])
m = fast.install(build(cfg))
with torch.no_grad():  # norms and biases away from their init (1, 0), so a swapped one shows
    for name, p in m.named_parameters():
        if "layernorm" in name or "layer_norm" in name or (name.endswith(".bias") and "filter_fn" not in name):
            p.add_(torch.randn_like(p) * 0.1)
fstep.SMALL_BATCH_TILES = (16, 64, 32, 2, 128, 128)  # fewer programs (the interpreter runs each in turn); still
# a K chunk across the [mixer | MLP] boundary and past D, a C split across it, masked vocabulary columns
B, T, steps = 2, 9, 2
idx = torch.randint(0, 96, (B, T + steps))
for dtype in (torch.float32, torch.bfloat16):
    c1 = new_cache(m, T + steps)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        m(idx[:, :T], cache=c1)
        c2 = copy.deepcopy(c1)  # the same prefill for both
        assert fstep.serves(m, c2)
        eager, fused = eager_step(m, c1, B, lambda l: l), fstep.fused_step(m, c2, B, lambda l: l)
        assert not fused.__qualname__.startswith("eager_step"), "fused_step handed the step to the eager one"
        errs = []
        for t in range(T, T + steps):
            a, b = eager(idx[:, t:t + 1]), fused(idx[:, t:t + 1])
            assert a.dtype == b.dtype, (a.dtype, b.dtype)
            errs.append(((a.float() - b.float()).norm() / a.float().norm()).item())
    state = max(((x - y).abs().max() / x.abs().max()).item()  # every cache tensor the steps moved
                for s1, s2 in zip(c1.layers, c2.layers) for x, y in zip(vars(s1).values(), vars(s2).values())
                if isinstance(x, torch.Tensor) and x.numel())
    assert int(c1.pos) == int(c2.pos) == T + steps
    print(str(dtype)[6:], max(errs), state)
for change in (dict(use_parallel_residual=False), dict(rope_type="dynamic", rope_factor=2.0)):  # not fused: eager
    other = build(replace(cfg, **change))
    cache = new_cache(other, T)
    other(idx[:, :4], cache=cache)
    print("served", *change, fstep.serves(other, cache))
"""


def test_fused_step_equals_the_eager_step_in_tritons_interpreter():
    """fast.step.fused_step (a block in ~3 kernels: norms and both input projections in one matmul, the mixer's
    core, both output projections in one), run on the CPU by Triton's interpreter, against hyena.eager_step over
    two steps after a prompt: the logits and every cache tensor (keys and values, a modal state and tail, a
    conv layer's history) within fp32 rounding in fp32; within bf16's in bf16 (the interpreter truncates to bf16,
    and the fused step keeps the residual stream in fp32 where the eager step rounds it)."""
    out = run_interpreted(FUSED_CHECK).splitlines()
    errs = {line.split()[0]: tuple(map(float, line.split()[1:])) for line in out if not line.startswith("served")}
    assert max(errs["float32"]) <= 2e-6, errs
    assert max(errs["bfloat16"]) <= 3e-2, errs
    # what the kernels do not compute, the eager step does: blocks one after the other, RoPE that moves with pos
    assert [line for line in out if line.startswith("served")] == ["served use_parallel_residual False",
                                                                    "served rope_type rope_factor False"], out


def test_the_eager_step_serves_where_no_kernel_runs():
    """On the CPU without Triton's interpreter fused_step hands back the eager step: the same numbers."""
    m = GPTNeoX(Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64))
    cache = new_cache(m, 8)
    m(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    assert not fstep.serves(m, cache)
    assert fstep.fused_step(m, cache, 1, lambda logits: logits).__qualname__.startswith("eager_step")
