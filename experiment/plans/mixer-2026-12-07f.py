"""Issue 29 on one GPU: fast/mixer.py's fused gates around the Toeplitz convolution.

    PYTHONPATH=. python experiment/plans/mixer-2026-12-07f.py OUT_DIR [--tiles-only]

1. Equality on the GPU: the Hyena mixer (d = 512, L = 2048, bf16 autocast) with fast.install (the fused mixer) and
   plain (hyena.mix, FFTConv in fp32), each against the plain mixer in fp32 without autocast: y, dx and every
   parameter's gradient (norm-relative). The fused mixer should be as far from fp32 as the plain one in bf16.
2. The gate kernels' tiles: each kernel alone at L = 2048 (B 64) and 8192 (B 16), its time and bandwidth (bytes it
   must move / time) for GATE_TILES and BACK_TILES candidates; the fastest are kept in OUT_DIR/tiles.json.
3. With those tiles, the compiled mixer fwd+bwd (fused, and hyena.mix with the Toeplitz long_conv as before)
   against compiled SDPA attention at both lengths, and the fused one's top kernels (torch.profiler).
--tiles-only stops after 2 (bench.py's mixer section then times the mixers). Writes OUT_DIR/mixer.md and prints it."""
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import fast
import hyena
from cli import write_atomic
from experiment.plans.gpu_report import Report, wall
from fast import mixer, toeplitz
from hyena import Attention, Config, HyenaOperator

out = Path(sys.argv[1])
log = Report(out / "mixer.md", "fused mixer")
D = 512


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# 1. equality
torch.manual_seed(0)
B, L = 4, 2048
ref_op = HyenaOperator(D, L).cuda()
x, g = torch.randn(B, L, D, device="cuda"), torch.randn(B, L, D, device="cuda")


def grads(op, autocast):
    xi = x.clone().requires_grad_()
    op.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = op(xi)
    y.backward(g.to(y.dtype))
    return [y, xi.grad] + [p.grad for p in op.parameters()]


ref = grads(ref_op, False)
log("## 1. against the plain mixer in fp32 (norm-relative; max over y, dx, parameter gradients)", "")
for name, on in (("plain, bf16 autocast (hyena.mix, FFTConv)", False), ("fast.install, bf16 autocast (fused)", True)):
    fast.install(ref_op, on)
    errs = [rel(a, b) for a, b in zip(grads(ref_op, True), ref)]
    log(f"- {name}: max {max(errs):.2e}; y {errs[0]:.2e}, dx {errs[1]:.2e}")
fast.install(ref_op, False)
log("")

# 2. tiles
log("## 2. gate kernels alone (ms; GB/s of the bytes each must move)", "",
    "| L | B | kernel | tiles | ms | GB/s |", "|---:|---:|---|---|---:|---:|")
GATES = [dict(BL=64, BD=64, warps=4), dict(BL=32, BD=64, warps=4), dict(BL=64, BD=32, warps=4),
         dict(BL=128, BD=32, warps=4), dict(BL=32, BD=128, warps=4), dict(BL=64, BD=64, warps=8),
         dict(BL=128, BD=64, warps=8)]
BACKS = [dict(BL=32, BD=64, warps=4), dict(BL=16, BD=64, warps=4), dict(BL=32, BD=32, warps=4),
         dict(BL=64, BD=32, warps=4), dict(BL=32, BD=64, warps=8), dict(BL=64, BD=64, warps=8),
         dict(BL=16, BD=128, warps=4)]
best = {}
for L, B in ((2048, 64), (8192, 16)):
    p = torch.randn(B, L, 3 * D, device="cuda", dtype=torch.bfloat16)
    w, wb = torch.randn(3 * D, 3, device="cuda", dtype=torch.bfloat16), torch.randn(3 * D, device="cuda",
                                                                                     dtype=torch.bfloat16)
    go = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16)
    y_t, dz_t = (torch.randn(B, D, L, device="cuda", dtype=torch.bfloat16) for _ in "yz")
    n = B * L * D * 2  # bytes of one (B, L, D) bf16 tensor
    kernels = {"gate_in": (lambda: mixer._gate_in_op(p, w, wb), 3 * n),
               "gate_out": (lambda: mixer._gate_out_op(y_t, p, w, wb), 3 * n),
               "gate_grad": (lambda: mixer._gate_grad_op(go, p, w, wb), 3 * n),
               "gate_back": (lambda: mixer._gate_back_op(go, y_t, dz_t, p, w, wb), 9 * n)}
    for kname, (fn, nbytes) in kernels.items():
        table = mixer.BACK_TILES if kname == "gate_back" else mixer.GATE_TILES
        kept = dict(table)
        for tiles in (BACKS if kname == "gate_back" else GATES):
            table.update(tiles)
            try:
                ms = wall(fn, n=50)
                log(f"| {L} | {B} | {kname} | {tiles} | {ms:.3f} | {nbytes / ms / 1e6:,.0f} |")
                best.setdefault((kname, json.dumps(tiles)), []).append(ms)
            except Exception as e:  # a tile this GPU refuses: say so, go on
                log(f"| {L} | {B} | {kname} | {tiles} | error: {type(e).__name__}: {str(e)[:80]} | |")
        table.clear()
        table.update(kept)
chosen = {}
for kname in ("gate_in", "gate_out", "gate_grad", "gate_back"):
    rows = {t: sum(ms) for (k, t), ms in best.items() if k == kname and len(ms) == 2}
    chosen[kname] = json.loads(min(rows, key=rows.get))
# one table for the three gate kernels: the candidate with the least summed time over them and both lengths
gate_sum = {t: sum(sum(ms) for (k, tt), ms in best.items() if tt == t and k != "gate_back")
            for (_, t) in best if _ != "gate_back"}
mixer.GATE_TILES.update(json.loads(min(gate_sum, key=gate_sum.get)))
mixer.BACK_TILES.update(chosen["gate_back"])
write_atomic(out / "tiles.json", json.dumps({"GATE_TILES": mixer.GATE_TILES, "BACK_TILES": mixer.BACK_TILES}))
log("", f"chosen: GATE_TILES {mixer.GATE_TILES}, BACK_TILES {mixer.BACK_TILES}", "")

# 3. compiled mixers against SDPA, and the fused one's kernels
if "--tiles-only" in sys.argv:
    sys.exit()
log("## 3. compiled fwd+bwd, bf16 autocast (ms)", "", "| L | B | fused | hyena.mix + Toeplitz | SDPA | fused / SDPA |",
    "|---:|---:|---:|---:|---:|---:|")
profiles = []
for L, B in ((2048, 64), (8192, 16)):
    x = torch.randn(B, L, D, device="cuda", requires_grad=True)
    g = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16)
    ms = {}
    for name in ("fused", "plain mix", "sdpa"):
        m = Attention(Config(max_position_embeddings=L)) if name == "sdpa" else HyenaOperator(D, L)
        m = fast.install(m).cuda()
        if name == "plain mix":
            m.mix = hyena.mix  # the gates by inductor, the convolution by fast.toeplitz.long_conv
        mc = torch.compile(m)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = mc(x)
            y.backward(g)
        ms[name] = wall(step, 20)
        if name == "fused":
            step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            ev = sorted((e for e in prof.key_averages() if e.device_type.name == "CUDA"),
                        key=lambda e: -e.device_time_total)
            total = sum(e.device_time_total for e in ev) / 5e3
            top = [f"| {e.key[:80]} | {e.count / 5:g} | {e.device_time_total / 5e3:.3f} |" for e in ev[:15]]
    log(f"| {L} | {B} | {ms['fused']:.2f} | {ms['plain mix']:.2f} | {ms['sdpa']:.2f} | "
        f"{ms['fused'] / ms['sdpa']:.2f} |")
    profiles += [f"### fused, L={L}, B={B}: {total:.2f} ms of kernels", "", "| kernel | calls | ms |", "|---|---:|---:|",
                 *top, ""]
log("", *profiles)
