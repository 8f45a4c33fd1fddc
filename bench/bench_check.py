"""bench.py's check section: each fast path against its plain twin on the benchmark's device (the CPU tests hold
them to fp64 there), recorded as relative errors with a tolerance. A mixin of bench.Bench: it uses the bench's
device, sizes, model builders and `case` recorder."""
from contextlib import contextmanager
from dataclasses import replace

import torch

import fast
import fast.losses
from bench.bench_report import modal_cfg
from fast.step import decode_step
from hyena import HyenaOperator, eager_step, new_cache


@contextmanager
def fp32_matmuls():
    """Matmuls in true fp32 for a while (bench.py turns TF32 on for its timings)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


class Checks:
    def check(self):
        """Each fast path against its reference on this device (CPU tests hold them to fp64): relative errors."""
        for name, tol, fn in (("fftconv fast vs reference, fp32: max over y, du, dk, dbias", 1e-5, self.check_fftconv),
                              ("student CE step, fast.install vs plain, fp32: max over loss, grads", 1e-4,
                               self.check_switch),
                              ("Hyena mixer compiled vs eager, bf16 autocast: max over y, dx", 2e-2, self.check_mixer),
                              ("Hyena mixer fast.install (fused) vs plain, bf16 autocast: max over y, dx, grads", 2e-2,
                               self.check_fused_mixer),
                              ("training step compiled vs eager, bf16 autocast: max over loss, grads", 2e-2,
                               self.check_step),
                              ("KD+CE chunk compiled vs eager, bf16 logits: max over loss, grad", 1e-2, self.check_chunk),
                              ("Hyena decode: Triton kernel vs PyTorch formula, bf16 cache", 1e-3, self.check_kernel),
                              ("modal prefill state, bf16 z: Triton scan's error / modal.fit fp32's (both vs fp64)",
                               2.0, self.check_scan),
                              ("student decode steps vs full forward, fp32: logits", 5e-3, lambda: self.check_decode(0)),
                              ("teacher decode steps vs full forward, fp32: logits", 5e-3, lambda: self.check_decode(1)),
                              ("modal student decode steps (fused step) vs full forward, fp32: logits", 5e-3,
                               lambda: self.check_decode(2)),
                              *((f"{name} fused step's CUDA graph vs eager steps, bf16: logits", 1e-2,
                                 lambda which=which: self.check_decode(which, graph=True))
                                for which, name in ((0, "student"), (1, "teacher"), (2, "modal student"))),
                              *((f"{name} greedy generate, fused CUDA graph vs eager step, fp32, 256 tokens: share differing",
                                 0.0, lambda which=which: self.check_greedy(which))
                                for which, name in ((2, "modal student"), (1, "teacher")))):
            if ("graph" in name or "Triton" in name or "training step" in name) and not self.cuda:
                continue
            self.case("check", dict(check=name), lambda: (lambda e: {"rel_err": e, "tol": tol,
                                                                     "ok": "PASS" if e <= tol else "FAIL"})(fn()))

    @staticmethod
    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    def check_fftconv(self):
        from fast.fftconv import fftconv
        from hyena import fftconv as fftconv_reference
        B, L, D = 2, self.s.ls[2], self.cfg.hidden_size
        args = [torch.randn(B, L, D), torch.randn(L, D) / L ** 0.5, torch.randn(D)]
        g, out = torch.randn(B, L, D, device=self.dev), []
        for conv in (fftconv, fftconv_reference):
            a = [t.to(self.dev).requires_grad_() for t in args]
            y = conv(*a)
            out.append((y, *torch.autograd.grad(y, a, g)))
        return max(self.rel(x, r) for x, r in zip(*out))

    def check_switch(self):
        """A student's CE loss and every gradient with fast/'s twins (fast.install: FFTConv; the fused chunked
        fast.losses.lm_loss) against the plain model (hyena.fftconv; train.lm_loss, F.cross_entropy)."""
        from train import lm_loss
        L = self.s.ls[0]
        model = self.student(self.build(replace(self.cfg, max_position_embeddings=L)), l_max=L)
        x = self.tokens(2, L + 1)
        out = []
        with fp32_matmuls():  # TF32 would round the fused loss's chunked matmuls and the plain head's differently
            for on, loss_of in ((True, fast.losses.lm_loss), (False, lm_loss)):
                fast.install(model, on)
                model.zero_grad(set_to_none=True)
                loss = loss_of(model, x[:, :-1], x[:, 1:])
                loss.backward()
                out.append([loss] + [p.grad for p in model.parameters() if p.requires_grad])
        return max(self.rel(a, b) for a, b in zip(out[0], out[1]))

    def check_mixer(self):
        B, L, D = 2, self.s.ls[2], self.cfg.hidden_size
        op = fast.install(HyenaOperator(D, L), self.cuda).to(self.dev)
        x, g, out = torch.randn(B, L, D, device=self.dev), torch.randn(B, L, D, device=self.dev), []
        for m in (op, torch.compile(op)):
            xi = x.clone().requires_grad_()
            with self.autocast():
                y = m(xi)
            y.backward(g)
            out.append((y, xi.grad))
        return max(self.rel(a, b) for a, b in zip(out[1], out[0]))

    def check_fused_mixer(self):
        """The mixer with fast.install (fast.mixer's fused gates and Toeplitz kernels on a GPU) against the plain one
        (hyena.mix, FFTConv), both in bf16 autocast: y, dx and every parameter's gradient."""
        B, L, D = 2, self.s.ls[0], self.cfg.hidden_size
        op = HyenaOperator(D, L).to(self.dev)
        x, g, out = torch.randn(B, L, D, device=self.dev), torch.randn(B, L, D, device=self.dev), []
        for on in (True, False):
            fast.install(op, on and self.cuda)
            op.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            with self.autocast():
                y = op(xi)
            y.backward(g)
            out.append([y, xi.grad] + [p.grad for p in op.parameters()])
        return max(self.rel(a, b) for a, b in zip(out[0], out[1]))

    def check_step(self):
        """A whole student's CE objective under torch.compile (train.py --compile) against eager: the loss and
        every parameter's gradient."""
        from train import CrossEntropy, lm_loss
        L = self.s.ls[0]
        model = self.student(self.build(replace(self.cfg, max_position_embeddings=L)), l_max=L)
        x = self.tokens(2, L + 1)
        out, loss_of = [], fast.losses.lm_loss if self.cuda else lm_loss  # what train.py's --fast auto runs
        for fn in (CrossEntropy(model, loss_of), torch.compile(CrossEntropy(model, loss_of))):
            model.zero_grad(set_to_none=True)
            with self.autocast():
                loss, _ = fn(x[:, :-1], x[:, 1:])
            loss.backward()
            out.append([loss] + [p.grad for p in model.parameters() if p.requires_grad])
        return max(self.rel(a, b) for a, b in zip(out[1], out[0]))

    def check_chunk(self):
        from fast.losses import chunk_fn, chunk_loss_and_grad
        c, V = 2048, self.cfg.vocab_size
        zs, zt = (3 * torch.randn(c, V, device=self.dev, dtype=torch.bfloat16) for _ in "st")
        tgt = torch.randint(V, (c,), device=self.dev)
        fused, ref = chunk_fn(self.dev)(zs, tgt, 0.5, zt, 2.0), chunk_loss_and_grad(zs, tgt, 0.5, zt, 2.0)
        return max(self.rel(a, b) for a, b in zip(fused, ref))

    def check_kernel(self, B=4, T=5000):
        from fast import decode
        D, bf16 = self.cfg.hidden_size, torch.bfloat16
        z, k = torch.randn(B, D, T, device=self.dev, dtype=bf16), torch.randn(T, D, device=self.dev, dtype=bf16)
        k_pad = torch.cat([k.flip(0).T, torch.zeros_like(k.T[:, 1:])], 1).contiguous()  # (D, 2T-1) cache layout
        errs = []
        for pos in (0, 777, T - 1):
            ref = (z[..., :pos + 1].float() * k_pad[:, T - 1 - pos:T].float()).sum(-1)  # sum_s z[s] k[pos-s]
            errs.append(self.rel(decode.long_conv_step(z, k_pad, torch.tensor(pos, device=self.dev)), ref))
        return max(errs)

    def check_scan(self, B=4, L=20000, d=16):
        import math
        from fast import decode
        from modal import fit
        C = self.cfg.hidden_size
        z = torch.randn(B, L, C, device=self.dev, dtype=torch.bfloat16)
        w = torch.empty(C, d, device=self.dev).uniform_(math.log(1e-4), math.log(0.5))
        th = torch.rand(C, d, device=self.dev) * math.pi
        ref = torch.view_as_real(fit.prefill_state(z.double(), w.double(), th.double()))  # (B, C, d, 2)
        fast_err = self.rel(torch.view_as_real(decode.prefill_state(z, w, th)), ref)
        with fp32_matmuls():  # the plain twin's bmm in true fp32
            plain = fit.prefill_state(z, w, th)
        return fast_err / self.rel(torch.view_as_real(plain), ref)  # fp32's phases k theta round both

    @torch.no_grad()
    def check_greedy(self, which, ctx=256, steps=256, B=2):
        """generate(temperature=0) with fast.install's CUDA-graph step against its eager step (fast's kernels in
        both), in fp32: the share of the new tokens that differ (0 when the graph replays the same computation)."""
        cfg = replace(self.cfg, max_position_embeddings=ctx + steps)
        m = self.build(cfg if which == 1 else modal_cfg(cfg))
        prompt, runs = self.tokens(B, ctx), []
        for make in (fast.step.cuda_graph_step, eager_step):  # fast's kernels in both: the graph is the difference
            m.make_step = make
            runs.append(m.generate(prompt, steps, temperature=0)[:, ctx:])  # (B, steps)
        return (runs[0] != runs[1]).float().mean().item()

    @torch.no_grad()
    def check_decode(self, which, graph=False, ctx=256, steps=16, B=2):
        cfg = replace(self.cfg, max_position_embeddings=ctx + steps)
        teacher = self.build(cfg)
        m = self.build(modal_cfg(cfg)) if which == 2 else teacher if which == 1 else self.student(teacher, l_max=ctx + steps)
        idx = self.tokens(B, ctx + steps)
        runs = []
        for mode in ("graph", "eager") if graph else ("eager",):
            cache = new_cache(m, ctx + steps)
            with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=graph):
                logits = [m(idx[:, :ctx], cache=cache)[0]]
                one = decode_step(m, cache, B, graph=mode == "graph")
                logits += [one(idx[:, i:i + 1])[:, None].clone() for i in range(ctx, ctx + steps - 1)]
            runs.append(torch.cat(logits, 1))  # (B, steps, V)
        ref = runs[1] if graph else m(idx)[0][:, ctx - 1:-1]  # the full forward's logits at the same positions
        return self.rel(runs[0], ref)
