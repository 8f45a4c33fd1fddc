"""Issue 29 on one GPU: fast.mixer's _gate_back computing the gates' gradients once a position (shifted on tensor
cores) against the kernel it replaces (dcb2492: recomputed at K = 3 shifts), and its tiles.

    PYTHONPATH=. python experiment/plans/gate-back-2026-12-07g.py OUT_DIR [OLD_MIXER_PY]

1. Equality at L = 2048, B = 8, d = 512, bf16 operands: dp, dw, dwb against autograd of the plain short convolution
   and gates in fp32 on the same operands (norm-relative), for the new kernel and the old one (OLD_MIXER_PY, the
   old fast/mixer.py, its ops renamed so both load).
2. Time alone at L = 2048 (B 64) and 8192 (B 16) for BACK_TILES candidates (the old kernel at its tiles), GB/s of
   the bytes it must move. The fastest summed over both lengths goes to OUT_DIR/back_tiles.json.
Writes OUT_DIR/gate-back.md and prints it."""
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

import hyena
from cli import write_atomic
from fast import mixer

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
lines = [f"# gate_back: {torch.cuda.get_device_name()}, torch {torch.__version__}", ""]
D = 512


def log(*rows):
    lines.extend(rows)
    print(*rows, sep="\n", flush=True)
    write_atomic(out / "gate-back.md", "\n".join(lines) + "\n")


def wall(step, n=50):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / n


old = None
if len(sys.argv) > 2 and Path(sys.argv[2]).exists():
    src = Path(sys.argv[2]).read_text().replace('"fast::', '"old_fast::')
    path = Path("/root/old_mixer.py")  # triton.jit reads a kernel's source from its file
    write_atomic(path, src)
    spec = importlib.util.spec_from_file_location("old_mixer", path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)


def operands(B, L):
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    return (torch.randn(B, L, D, **bf), torch.randn(B, D, L, **bf), torch.randn(B, D, L, **bf),
            torch.randn(B, L, 3 * D, **bf), torch.randn(3 * D, 3, **bf), torch.randn(3 * D, **bf))


# 1. equality
go, y_t, dz_t, p, w, wb = operands(8, 2048)
a = [t.float().requires_grad_() for t in (p, w, wb)]
x0, x1, v = hyena.short_conv(a[0], a[1][:, None], a[2]).split(D, dim=-1)
f = (go.float() * y_t.float().transpose(1, 2) * x0).sum() + (dz_t.float().transpose(1, 2) * x1 * v).sum()
ref = torch.autograd.grad(f, a)
log("## 1. against autograd in fp32 on the same bf16 operands (norm-relative: dp, dw, dwb)", "")
for name, mod in (("new", mixer), ("old", old)):
    if mod is not None:
        got = mod._gate_back_op(go, y_t, dz_t, p, w, wb)
        log(f"- {name}: " + ", ".join(f"{((g.double() - r.double()).norm() / r.double().norm()).item():.2e}"
                                     for g, r in zip(got, ref)))
log("")

# 2. tiles
log("## 2. alone (ms; GB/s of the 9 (B, L, D) bf16 tensors it must move)", "",
    "| L | B | kernel | tiles | ms | GB/s |", "|---:|---:|---|---|---:|---:|")
CANDIDATES = [dict(BL=BL, BD=BD, warps=wp) for BL in (16, 32, 64) for BD in (16, 32, 64, 128) for wp in (4, 8)
              if BL * BD <= 4096 and not (wp == 8 and BL * BD < 1024)]
times = {}
for L, B in ((2048, 64), (8192, 16)):
    go, y_t, dz_t, p, w, wb = operands(B, L)
    nbytes = 9 * B * L * D * 2
    if old is not None:
        ms = wall(lambda: old._gate_back_op(go, y_t, dz_t, p, w, wb))
        log(f"| {L} | {B} | old | {old.BACK_TILES} | {ms:.3f} | {nbytes / ms / 1e6:,.0f} |")
    kept = dict(mixer.BACK_TILES)
    for tiles in CANDIDATES:
        mixer.BACK_TILES.update(tiles)
        try:
            ms = wall(lambda: mixer._gate_back_op(go, y_t, dz_t, p, w, wb))
            log(f"| {L} | {B} | new | {tiles} | {ms:.3f} | {nbytes / ms / 1e6:,.0f} |")
            times.setdefault(json.dumps(tiles), []).append(ms)
        except Exception as e:  # a tile this GPU refuses: say so, go on
            log(f"| {L} | {B} | new | {tiles} | error: {type(e).__name__}: {str(e)[:80]} | |")
    mixer.BACK_TILES.clear()
    mixer.BACK_TILES.update(kept)
best = json.loads(min((t for t, ms in times.items() if len(ms) == 2), key=lambda t: sum(times[t])))
write_atomic(out / "back_tiles.json", json.dumps({"BACK_TILES": best}))
log("", f"chosen: BACK_TILES {best}")
