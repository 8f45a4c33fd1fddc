"""Issue 29: where the fused mixer's time goes now, kernel by kernel (torch.profiler, CUDA time), on one GPU.

    PYTHONPATH=. python experiment/plans/profile-mixer-2026-12-07f.py OUT_DIR

The compiled Hyena mixer fwd+bwd with fast.install (fast.mixer's fused gates, fast.toeplitz's kernels) at L = 2048,
B = 64, d = 512, bf16 autocast, as bench.py's mixer section times it. Writes OUT_DIR/profile-mixer.md."""
import sys
from pathlib import Path

import torch

import fast
from experiment.plans.gpu_report import Report, kernels, wall
from hyena import HyenaOperator

out = Path(sys.argv[1])
B, L, D = 64, 2048, 512
m = torch.compile(fast.install(HyenaOperator(D, L)).cuda())
x = torch.randn(B, L, D, device="cuda", requires_grad=True)
g = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16)


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
    y.backward(g)


ms = wall(step, 20)
rows, count, total = kernels(step, 5, 25)
Report(out / "profile-mixer.md", f"compiled fused mixer fwd+bwd, L={L}, B={B}, d={D}")(
    f"{ms:.2f} ms wall a call (20 calls), {total:.2f} ms of kernels, {count:g} kernels", "", *rows)
