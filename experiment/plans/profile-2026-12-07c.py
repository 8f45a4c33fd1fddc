"""Issues 29 and 30: where the time goes, kernel by kernel (torch.profiler, CUDA time), on one GPU.

    PYTHONPATH=. python experiment/plans/profile-2026-12-07c.py OUT_DIR

1. The compiled Hyena mixer fwd+bwd (fast.install: Toeplitz kernels) at L = 2048 (B 64) and 8192 (B 16), and
   the same with FFTConv: the top kernels by CUDA time, and their sum against the step's time.
2. A variant to weigh: the Toeplitz outputs as channels-first views (no transposing copy), conv alone (eager)
   and in the compiled mixer.
3. Decoding steps at a 2k context, B = 1 and 64, replayed from a CUDA graph (fast.install: the fused mix_step,
   the decoding attention): the modal student with fp32 weights under autocast (as bench.py's decode section),
   then in bf16 (as its serve section), and the teacher in bf16. The kernels a replay runs, their count and
   CUDA time against the step's wall time; and the eager step's kernel count.
Writes OUT_DIR/profile.md (tables) and prints it."""
import sys
from dataclasses import replace
from pathlib import Path

import torch

import fast
from experiment.plans.gpu_report import Report, kernels, wall
from fast.step import graphed_step
from fast.fftconv import fftconv
from hyena import Config, HyenaOperator, new_cache
from modal.student import build

out = Path(sys.argv[1])
log = Report(out / "profile.md", "profile")


D = 512
for L, B in ((2048, 64), (8192, 16)):
    for conv in ("toeplitz", "fftconv"):
        m = fast.install(HyenaOperator(D, L, order=2)).cuda()
        if conv == "fftconv":
            m.long_conv = fftconv
        mc = torch.compile(m)
        x = torch.randn(B, L, D, device="cuda", requires_grad=True)
        g = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = mc(x)
            y.backward(g)
        ms = wall(step, 20)
        rows, count, total = kernels(step)
        log(f"## compiled mixer fwd+bwd, {conv}, L={L}, B={B}: {ms:.2f} ms wall, {total:.2f} ms of kernels, "
            f"{count:g} kernels", "", *rows, "")

# A variant to weigh (not in fast/): ToeplitzConv returning its outputs as channels-first views, not transposed
# copies, leaving the layout to the next op (fused by inductor under compile).
from fast import toeplitz


class ViewsOut(toeplitz.ToeplitzConv):
    @staticmethod
    def forward(ctx, u, k, bias):
        B, L, D = u.shape
        u_t = toeplitz.channels_first(u, L, u.dtype)
        k_t = toeplitz.channels_first(k[None], L, u.dtype)[0]
        ctx.save_for_backward(u_t, k_t, bias)
        return toeplitz._y_op(u_t, k_t, bias).transpose(1, 2)  # (B, L, D) view

    @staticmethod
    def backward(ctx, g):
        u_t, k_t, bias = ctx.saved_tensors
        g_t = toeplitz.channels_first(g, u_t.shape[2], u_t.dtype)
        dk_t = toeplitz._dk_op(g_t, u_t)
        return toeplitz._du_op(g_t, k_t, bias).transpose(1, 2), dk_t.t(), dk_t[:, 0].clone()


def views_conv(u, k, bias):
    with torch.autocast("cuda", enabled=False):
        return ViewsOut.apply(u, k, bias)


for L, B in ((2048, 64), (8192, 16)):
    u = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(L, D, device="cuda", requires_grad=True)
    bias = torch.randn(D, device="cuda", requires_grad=True)
    g = torch.randn(B, L, D, device="cuda", dtype=torch.bfloat16)
    res = {}
    for name, conv in (("toeplitz", toeplitz.toeplitz_conv), ("views", views_conv)):
        res[name, "conv"] = wall(lambda: torch.autograd.grad(conv(u, k, bias), (u, k, bias), g), 20)
        m = fast.install(HyenaOperator(D, L, order=2)).cuda()
        m.long_conv = conv
        mc = torch.compile(m)
        x = torch.randn(B, L, D, device="cuda", requires_grad=True)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = mc(x)
            y.backward(g)
        res[name, "mixer"] = wall(step, 20)
    log(f"## outputs as views, L={L}, B={B}: conv fwd+bwd eager {res['toeplitz', 'conv']:.2f} -> "
        f"{res['views', 'conv']:.2f} ms; compiled mixer fwd+bwd {res['toeplitz', 'mixer']:.2f} -> "
        f"{res['views', 'mixer']:.2f} ms", "")

cfg = Config()
n = cfg.num_hidden_layers
modal_cfg = replace(cfg, mixers=["hyena"] * n, hyena_modal_state=[16] * n, max_position_embeddings=4096)
for name, model in (("modal, fp32 weights under autocast", build(modal_cfg)),
                    ("modal, bf16 weights", build(modal_cfg).to(torch.bfloat16)),
                    ("teacher, bf16 weights", build(replace(cfg, max_position_embeddings=4096)).to(torch.bfloat16))):
    model = fast.install(model.cuda().eval())
    for B in (1, 64):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            cache = new_cache(model, 4096)
            model(torch.randint(cfg.vocab_size, (B, 16), device="cuda"), cache=cache)
            tok = torch.randint(cfg.vocab_size, (B, 1), device="cuda")

            def eager():
                cache.pos.fill_(2048)  # the teacher's attention reads up to pos: a 2k context
                model(tok, cache=cache)
            rows_e, count_e, total_e = kernels(eager, top=0)
            cache.pos.fill_(2048)
            one = graphed_step(model, cache, B)

            def replay():
                cache.pos.fill_(2048)
                one(tok)
            ms = wall(replay, n=200)
            rows, count, total = kernels(replay, n=20, top=30)
        log(f"## {name}, decode step at 2k context, B={B}, CUDA graph: {1e3 * ms:.0f} us wall a step (fill_ of pos "
            f"included), {1e3 * total:.0f} us of kernels, {count:g} kernels (eager: {count_e:g} kernels, "
            f"{1e3 * total_e:.0f} us)", "", *rows, "")
    del model
