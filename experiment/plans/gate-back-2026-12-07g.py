"""Issue 29 on one GPU: fast.mixer's backward gate kernel (dcb2492: the gates' gradients recomputed at K = 3 shifts,
1.37 ms at 2k on an H100) against two unmeasured candidates, each a patch to fast/mixer.py and its
tests/test_mixer.py beside this file at commit c997182 (both passed in Triton's interpreter). Ran once, on one
H100 (results/gpu-logs-2026-12-07h/gate-back.md): "split" won and is fast/mixer.py since 404516a.
"dot" computes the gates' gradients once a position and shifts them within a tile by 0/1 products on tensor cores;
"split" writes them out from one kernel and applies the short convolution's transpose in another.

    for v in dot split; do git apply experiment/plans/gate-back-$v-2026-12-07g.patch   # here, before the call
        cp fast/mixer.py .carry/cand/mixer_$v.py; git checkout -- fast/mixer.py tests/test_mixer.py; done
    PYTHONPATH=. python experiment/plans/gate-back-2026-12-07g.py OUT_DIR dot=.carry/cand/mixer_dot.py \
        split=.carry/cand/mixer_split.py     # there, carrying .carry/cand; then cp "$(cat OUT_DIR/winner.txt)"
                                             # fast/mixer.py and bench with experiment/plans/with-tiles-2026-12-07g.py

Each LABEL=MIXER_PY is loaded beside fast.mixer (labelled "product") with its ops renamed.
1. Equality at L = 2048, B = 8, d = 512, bf16 operands: dp, dw, dwb against autograd of the plain short convolution
   and gates in fp32 on the same operands (norm-relative), for each; one beyond 2e-2 (or failing) is not timed.
2. Time alone at L = 2048 (B 64) and 8192 (B 16) for each of 12 BACK_TILES candidates, GB/s of the bytes it
   must move. The fastest (module, tiles), summed over both lengths, goes to
   OUT_DIR/back_tiles.json and the path of its module to OUT_DIR/winner.txt; adopting a candidate here is
   `git apply experiment/plans/gate-back-NAME-2026-12-07g.patch`.
Writes OUT_DIR/gate-back.md and prints it."""
import importlib.util
import json
import sys
from pathlib import Path

import torch

import hyena
from cli import write_atomic
from experiment.plans.gpu_report import Report, wall
from fast import mixer

out = Path(sys.argv[1])
log = Report(out / "gate-back.md", "gate_back")
D = 512


modules = {"product": mixer}
for arg in sys.argv[2:]:
    label, src_path = arg.split("=", 1)
    path = Path(f"/root/{label}_mixer.py")  # triton.jit reads a kernel's source from its file
    write_atomic(path, Path(src_path).read_text().replace('"fast::', f'"{label}_fast::'))
    spec = importlib.util.spec_from_file_location(f"{label}_mixer", path)
    modules[label] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(modules[label])
    modules[label].source = src_path
mixer.source = "fast/mixer.py"


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
for name, mod in list(modules.items()):
    try:
        errs = [((g.double() - r.double()).norm() / r.double().norm()).item()
                for g, r in zip(mod._gate_back_op(go, y_t, dz_t, p, w, wb), ref)]
        log(f"- {name}: " + ", ".join(f"{e:.2e}" for e in errs))
        if not max(errs) <= 2e-2:  # bench check's bf16 tolerance: a wrong kernel is not timed
            raise ValueError(f"error {max(errs):.2e} beyond 2e-2")
    except Exception as e:  # a kernel that fails here is left out of the timing
        log(f"- {name}: left out: {type(e).__name__}: {str(e)[:200]}")
        del modules[name]
log("")

# 2. tiles
log("## 2. alone (ms; GB/s of the 9 (B, L, D) bf16 tensors it must move)", "",
    "| L | B | kernel | tiles | ms | GB/s |", "|---:|---:|---|---|---:|---:|")
CANDIDATES = [dict(BL=BL, BD=BD, warps=wp) for BL, BD, wp in ((16, 16, 4), (16, 32, 4), (16, 64, 4), (32, 16, 4),
             (32, 32, 4), (32, 64, 4), (64, 16, 4), (64, 32, 4), (16, 32, 2), (32, 32, 8), (32, 64, 8), (16, 128, 4))]
times = {}
for L, B in ((2048, 64), (8192, 16)):
    go, y_t, dz_t, p, w, wb = operands(B, L)
    nbytes = 9 * B * L * D * 2
    for name, mod in modules.items():
        kept = dict(mod.BACK_TILES)
        for tiles in CANDIDATES:
            mod.BACK_TILES.update(tiles)
            try:
                ms = wall(lambda: mod._gate_back_op(go, y_t, dz_t, p, w, wb), 50)
                log(f"| {L} | {B} | {name} | {tiles} | {ms:.3f} | {nbytes / ms / 1e6:,.0f} |")
                times.setdefault((name, json.dumps(tiles)), []).append(ms)
            except Exception as e:  # a tile this GPU refuses: say so, go on
                log(f"| {L} | {B} | {name} | {tiles} | error: {type(e).__name__}: {str(e)[:80]} | |")
        mod.BACK_TILES.clear()
        mod.BACK_TILES.update(kept)
name, tiles = min((k for k, ms in times.items() if len(ms) == 2), key=lambda k: sum(times[k]))
write_atomic(out / "back_tiles.json", json.dumps({"BACK_TILES": json.loads(tiles)}))
write_atomic(out / "winner.txt", modules[name].source + "\n")
log("", f"chosen: {name} ({modules[name].source}), BACK_TILES {tiles}")
