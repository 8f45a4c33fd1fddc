"""The whole decoding step in few kernels (fast/step.py) against the eager step it replaces."""
import pytest
import torch

from fast import step as fstep
from hyena import Config, GPTNeoX, new_cache
from triton_interpreter import output, register

FUSED_CHECK = """
import copy
from dataclasses import replace
import torch
from conftest import NoHostReads  # (the repository root's)
import fast
from fast import step as fstep
from hyena import Config, eager_step, new_cache
from modal.student import build
torch.manual_seed(0)
# one layer of each kind a step takes: attention (RoPE on 4 of 16 dims), a modal Hyena layer (fast.decode.mix_step),
# a convolutional one (its history); the vocabulary not a multiple of the head's column block
cfg = Config(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
             max_position_embeddings=64, mixers=["attention", "hyena", "hyena"], hyena_modal_state=[0, 4, 0])
plain = build(cfg)
with torch.no_grad():  # norms and biases away from their init (1, 0), so a swapped one shows
    for name, p in plain.named_parameters():
        if "layernorm" in name or "layer_norm" in name or (name.endswith(".bias") and "filter_fn" not in name):
            p.add_(torch.randn_like(p) * 0.1)
installed = fast.install(copy.deepcopy(plain))
tiles, fstep.SMALL_BATCH_TILES = fstep.SMALL_BATCH_TILES, fstep.Tiles(16, 64, 32, 2, 128, 128)  # fewer programs (the interpreter runs each in
# turn); still a K chunk across the [mixer | MLP] boundary and past D, a C split across it, masked vocabulary


def tensors(cache):  # every tensor a cache holds, its lists (a conv layer's history) opened
    return [t for s in cache.layers for v in vars(s).values() for t in (v if isinstance(v, list) else [v])
            if isinstance(t, torch.Tensor) and t.numel()]


B, T, steps = 2, 9, 2
idx = torch.randint(0, 96, (B, T + steps))
for dtype in (torch.float32, torch.bfloat16):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        runs = []
        # the plain eager step against the fused step: in fp32 of the installed model (its own prefill: fast's
        # kernels in the core, the history kernel too), in bf16 of the plain model (the plain history
        # convolution's transposed output; fast's kernels in bf16 have their own checks)
        fused_model = installed if dtype == torch.float32 else plain
        for model, make in ((plain, eager_step), (fused_model, fstep.fused_step)):
            cache = new_cache(model, T + steps)
            model(idx[:, :T], cache=cache)
            assert make is eager_step or fstep.serves(model, cache)
            one = make(model, cache, B, lambda l: l)
            assert make is eager_step or not one.__qualname__.startswith("eager_step"), "handed to the eager step"
            with NoHostReads():
                logits = [one(idx[:, t:t + 1]) for t in range(T, T + steps)]
            assert int(cache.pos) == T + steps
            runs.append((logits, tensors(cache)))
    (ref, ref_state), *fused = runs
    real = lambda t: torch.view_as_real(t) if t.is_complex() else t.float()
    rel = lambda x, r: ((real(x) - real(r)).norm() / real(r).norm()).item()
    assert all(a.dtype == b.dtype for logits, _ in fused for a, b in zip(logits, ref))
    print(str(dtype)[6:], max(rel(a, b) for logits, _ in fused for a, b in zip(logits, ref)),
          max(rel(x, r) for _, state in fused for x, r in zip(state, ref_state)))
for change in (dict(use_parallel_residual=False), dict(rope_type="dynamic", rope_factor=2.0)):  # not fused: eager
    other = build(replace(cfg, **change))
    cache = new_cache(other, T)
    other(idx[:, :4], cache=cache)
    print("served", *change, fstep.serves(other, cache))
fstep.SMALL_BATCH_TILES = tiles
"""
register("fused step", FUSED_CHECK)


def test_fused_step_equals_the_eager_step_in_tritons_interpreter():
    """fast.step.fused_step (a block in ~3 kernels: norms and both input projections in one matmul, the mixer's
    core, both output projections in one), run on the CPU by Triton's interpreter, against the plain model's
    hyena.eager_step over two steps after a prompt, in fp32 for an installed model (fast's kernels inside the
    core), in bf16 for a plain one: the logits and every cache tensor (keys and values, a modal state and tail, a conv
    layer's history) within fp32 rounding in fp32; within bf16's in bf16 (the interpreter truncates to bf16,
    and the fused step keeps the residual stream in fp32 where the eager step rounds it). No step reads the
    device back (what a CUDA graph could not capture)."""
    out = output("fused step").splitlines()
    errs = {line.split()[0]: tuple(map(float, line.split()[1:])) for line in out if not line.startswith("served")}
    assert max(errs["float32"]) <= 2e-6, errs
    assert max(errs["bfloat16"]) <= 2e-2, errs  # (measured 7e-3)
    # what the kernels do not compute, the eager step does: blocks one after the other, RoPE that moves with pos
    assert [line for line in out if line.startswith("served")] == ["served use_parallel_residual False",
                                                                    "served rope_type rope_factor False"], out


def test_the_eager_step_serves_where_no_kernel_runs():
    """On the CPU without Triton's interpreter fused_step hands back the eager step: the same numbers. A batch
    other than the cache's is refused by name (the kernels would read past its rows)."""
    m = GPTNeoX(Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64))
    cache = new_cache(m, 8)
    m(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    assert not fstep.serves(m, cache)
    assert fstep.fused_step(m, cache, 1, lambda logits: logits).__qualname__.startswith("eager_step")
    with pytest.raises(ValueError, match="batch 3, but the cache holds \\[1\\] sequences"):
        fstep.fused_step(m, cache, 3, lambda logits: logits)  # a batch the prefill did not run with
