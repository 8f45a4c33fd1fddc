"""bench.py's conv section: Hyena's long convolution alone (issue 29), FFTConv (fast.fftconv) against the
block-Toeplitz kernels (fast.toeplitz), forward (no_grad) and forward+backward (du, dk, dbias), at the mixer
section's lengths up to CONV_MAX_L with B*L = mixer_tokens and D = hidden_size: bf16 activations, an fp32 filter and
bias (what the mixer hands its long_conv). Each row has its achieved "useful" TFLOP/s (B D L^2 FLOPs a product,
the causal half of L^2 multiply-adds per channel and batch row, times 2; the forward is one product, the backward
two more) and their share of the GPU's dense bf16 peak (PEAK_TFLOPS, by device name; empty for others), and the
Toeplitz rows their largest relative error against FFTConv on the same inputs (y; y, du, dk, dbias).

With --conv-tiles the section first times each product of the kernels alone (y, du, dk) at every
fast.toeplitz.TILE_SWEEP configuration, at the sweep lengths (the mixer's first and third: 2048 and 8192), prints
the fastest correct one per product and length, and times its rows with the fastest at the first length (TILES
for the file: env.conv_tiles). Where the kernels do not serve (no CUDA, no Triton) the Toeplitz rows record why
instead. A mixin of bench.Bench: it uses the bench's device, sizes, timer, `case` recorder and `rel` error."""
import torch

CONV_MAX_L = 8192  # the longest length timed: the Toeplitz kernel's range (fast.toeplitz.TOEPLITZ_MAX_L's ceiling)
PEAK_TFLOPS = {"H100 80GB HBM3": 989, "H100 SXM": 989, "H200": 989}  # dense bf16 tensor cores, by device name
UNSERVED = "the Toeplitz kernels need Triton and CUDA (fast.toeplitz.available)"
SWEEP_TOL = 1e-2  # a sweep configuration counts only within this relative error of FFTConv (bf16 outputs: ~2e-3)


class ConvCases:
    def conv(self):
        from fast import toeplitz
        if self.conv_tiles:
            self.conv_sweep(toeplitz)
        for L in (L for L in self.s.ls if L <= CONV_MAX_L):
            B, D = max(1, self.s.mixer_tokens // L), self.cfg.hidden_size
            for op in ("fftconv", "toeplitz"):
                for run in ("fwd", "fwd+bwd"):
                    self.case("conv", dict(op=op, run=run, L=L, B=B, D=D),
                              lambda: self.conv_case(toeplitz, op, run, B, L, D))

    def conv_inputs(self, B, L, D):
        """u (B, L, D) bf16, k (L, D) and bias (D,) fp32, g = dLoss/dy (B, L, D) bf16: random, never zeros."""
        return (torch.randn(B, L, D, device=self.dev, dtype=torch.bfloat16),
                torch.randn(L, D, device=self.dev) / L ** 0.5, torch.randn(D, device=self.dev),
                torch.randn(B, L, D, device=self.dev, dtype=torch.bfloat16))

    def useful(self, res, flops):
        """res with the achieved useful TFLOP/s and their share of the device's dense bf16 peak (None if unknown)."""
        peak = next((v for name, v in PEAK_TFLOPS.items() if name in self.res["env"]["device"]), None)
        tflops = flops / res["ms"] / 1e9
        return {**res, "tflops": tflops, "peak_share": tflops / peak if peak else None}

    def conv_case(self, toeplitz, op, run, B, L, D):
        from fast.fftconv import fftconv
        u, k, bias, g = self.conv_inputs(B, L, D)
        if op == "toeplitz" and not toeplitz.available(u):
            return {"skipped": UNSERVED}
        conv = toeplitz.toeplitz_conv if op == "toeplitz" else fftconv
        args = [u.requires_grad_(run != "fwd"), k.requires_grad_(run != "fwd"), bias.requires_grad_(run != "fwd")]

        def outputs(f):  # y, or y and its gradients
            if run == "fwd":
                with torch.no_grad():
                    return (f(*args),)
            y = f(*args)
            return (y, *torch.autograd.grad(y, args, g))
        res = self.useful(self.timed(lambda: outputs(conv), B * L), B * D * L * L * (1 if run == "fwd" else 3))
        if op == "toeplitz":
            res["rel_err"] = max(self.rel(x, r) for x, r in zip(outputs(conv), outputs(fftconv)))
        return res

    def conv_sweep(self, toeplitz):
        """Each product alone at every TILE_SWEEP configuration; TILES[product] set to the fastest correct one at the
        first sweep length."""
        from fast.fftconv import channels_first, fftconv
        best = {}
        for L in (self.s.ls[0], self.s.ls[2]):
            B, D = max(1, self.s.mixer_tokens // L), self.cfg.hidden_size
            u, k, bias, g = self.conv_inputs(B, L, D)
            args = [u.requires_grad_(), k.bfloat16().float().requires_grad_(), bias.requires_grad_()]  # k as rounded
            y = fftconv(*args)
            ref = dict(zip(("y", "du", "dk"), (y.detach(), *torch.autograd.grad(y, args[:2], g))))  # (B, L, D), (L, D)
            u_t, g_t, k_t = (channels_first(t, L, torch.bfloat16) for t in (u.detach(), g, k[None]))
            if not toeplitz.available(u_t):  # one row says why, not one per configuration
                self.case("conv", dict(op="toeplitz", run="sweep", L=L, B=B, D=D), lambda: {"skipped": UNSERVED})
                continue
            for product, configs in toeplitz.TILE_SWEEP.items():
                for tiles in configs:
                    row = dict(op=f"toeplitz {product}", run="sweep", L=L, B=B, D=D,
                               tiles=" ".join(f"{key}={v}" for key, v in tiles.items()))
                    self.case("conv", row, lambda: self.sweep_case(toeplitz, product, tiles, u_t, g_t, k_t[0], bias,
                                                                   ref[product]))
                    if row.get("rel_err") is not None and row["rel_err"] <= SWEEP_TOL and \
                            row["ms"] < best.get((product, L), (float("inf"),))[0]:
                        best[product, L] = (row["ms"], tiles)
        for (product, L), (ms, tiles) in best.items():
            print(f"conv sweep: fastest {product} at L={L}: {tiles} ({ms:.3f} ms)", flush=True)
        first = {product: dict(tiles) for (product, L), (ms, tiles) in best.items() if L == self.s.ls[0]}
        toeplitz.TILES.update(first)
        self.res["env"]["conv_tiles"] = {product: dict(tiles) for product, tiles in toeplitz.TILES.items()}
        if first:
            print(f"conv sweep: TILES = {toeplitz.TILES}", flush=True)

    def sweep_case(self, toeplitz, product, tiles, u_t, g_t, k_t, bias, ref):
        """One product of the kernels alone (channels-first operands), its time and its error against FFTConv's."""
        B, D, L = u_t.shape
        out = torch.empty_like(u_t)
        step = {"y": lambda: toeplitz.toeplitz_products(u_t, k_t, bias, out, True, tiles),
                "du": lambda: toeplitz.toeplitz_products(g_t, k_t, bias, out, False, tiles),
                "dk": lambda: toeplitz.batch_correlation(g_t, u_t, tiles)}[product]
        got = step()
        err = self.rel(got.transpose(-1, -2), ref)  # (B, L, D) or (L, D), as FFTConv's
        return {**self.useful(self.timed(step, B * L), B * D * L * L), "rel_err": err}
