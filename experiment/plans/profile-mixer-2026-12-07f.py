"""Issue 29: where the fused mixer's time goes now, kernel by kernel (torch.profiler, CUDA time), on one GPU.

    PYTHONPATH=. python experiment/plans/profile-mixer-2026-12-07f.py OUT_DIR

The compiled Hyena mixer fwd+bwd with fast.install (fast.mixer's fused gates, fast.toeplitz's kernels) at L = 2048,
B = 64, d = 512, bf16 autocast, as bench.py's mixer section times it. Writes OUT_DIR/profile-mixer.md."""
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import fast
from cli import write_atomic
from hyena import HyenaOperator

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
B, L, D = 64, 2048, 512
m = torch.compile(fast.install(HyenaOperator(D, L)).cuda())
x = torch.randn(B, L, D, device="cuda", requires_grad=True)
g = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16)


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
    y.backward(g)


for _ in range(3):
    step()
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(20):
    step()
torch.cuda.synchronize()
ms = 1e3 * (time.perf_counter() - t0) / 20
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
ev = sorted((e for e in prof.key_averages() if e.device_type.name == "CUDA"), key=lambda e: -e.device_time_total)
total = sum(e.device_time_total for e in ev) / 5e3
rows = [f"# compiled fused mixer fwd+bwd, L={L}, B={B}, d={D}: {torch.cuda.get_device_name()}", "",
        f"{ms:.2f} ms wall a call (20 calls), {total:.2f} ms of kernels, {sum(e.count for e in ev) / 5:g} kernels",
        "", "| kernel | calls | ms | share |", "|---|---:|---:|---:|"]
rows += [f"| {e.key[:90]} | {e.count / 5:g} | {e.device_time_total / 5e3:.3f} | {e.device_time_total / 5e3 / total:.1%} |"
         for e in ev[:25]]
write_atomic(out / "profile-mixer.md", "\n".join(rows) + "\n")
print("\n".join(rows))
