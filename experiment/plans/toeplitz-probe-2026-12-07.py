"""Issue 29 probe: Toeplitz long conv vs FFTConv, conv alone and in the mixer, against SDPA (bf16)."""
import sys, time, torch
import fast
from fast import toeplitz as T
from fast.fftconv import fftconv as F
from hyena import fftconv as P, HyenaOperator, Attention, Config
dev = "cuda"
print(torch.__version__, torch.cuda.get_device_name(), flush=True)

def tm(f, n=10):
    for _ in range(3): f()
    torch.cuda.synchronize(); s = torch.cuda.Event(True); e = torch.cuda.Event(True); s.record()
    for _ in range(n): f()
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e) / n

def err(B, L, D):
    torch.manual_seed(0)
    u = torch.randn(B, L, D, device=dev).bfloat16(); k = torch.randn(L, D, device=dev) / L ** .5
    b = torch.randn(D, device=dev); g = torch.randn(B, L, D, device=dev).bfloat16()
    def run(conv, uu, kk):
        a = [uu.clone().requires_grad_(), kk.clone().requires_grad_(), b.clone().requires_grad_()]
        y = conv(*a); return (y, *torch.autograd.grad(y, a, g.to(y.dtype)))
    ref = run(P, u.double(), k.bfloat16().double())
    for name, f in (("fft", F), ("toeplitz", T.toeplitz_conv)):
        o = run(f, u, k)
        print(f"err {name} (B,L,D)=({B},{L},{D}) y,du,dk,db rel:", " ".join("%.1e" % ((x.double() - r).norm() / r.norm()).item() for x, r in zip(o, ref)), flush=True)

def conv_bench(B, L, D, cfgs):
    u = torch.randn(B, L, D, device=dev).bfloat16().requires_grad_(); k = (torch.randn(L, D, device=dev) / L ** .5).requires_grad_()
    b = torch.randn(D, device=dev).requires_grad_(); g = torch.randn(B, L, D, device=dev).bfloat16()
    fl = B * D * L * L  # useful causal FLOPs of one product (L^2/2 MACs per channel-row)
    def fb(conv): return lambda: torch.autograd.grad(conv(u, k, b), (u, k, b), g)
    f1, f3 = tm(lambda: F(u.detach(), k.detach(), b.detach())), tm(fb(F))
    print(f"conv B={B} L={L} D={D} fft: fwd {f1:.3f} ms, fwd+bwd {f3:.3f} ms", flush=True)
    for cf in cfgs:
        t = dict(zip(("chunk", "rows", "warps", "stages"), cf)); T.TILES.update(y=t, du=t, dk=t)
        try:
            t1, t3 = tm(lambda: T.toeplitz_conv(u.detach(), k.detach(), b.detach())), tm(fb(T.toeplitz_conv))
            print(f"  toeplitz {cf}: fwd {t1:.3f} ms ({fl/t1/1e9:.0f} TFLOP/s useful), fwd+bwd {t3:.3f} ms ({3*fl/t3/1e9:.0f} TFLOP/s), x fft {t3/f3:.2f}", flush=True)
        except Exception as e:
            print("  toeplitz", cf, "failed", repr(e)[:300], flush=True)

def mixer(B, L, D, which, compiled):
    cfg = Config(hidden_size=D, num_attention_heads=8, intermediate_size=4 * D, num_hidden_layers=1, vocab_size=128, max_position_embeddings=L)
    m = HyenaOperator(D, L, order=2) if which != "sdpa" else Attention(cfg)
    fast.install(m).to(dev)
    if which == "toeplitz": m.long_conv = T.toeplitz_conv
    m = torch.compile(m) if compiled else m
    x = torch.randn(B, L, D, device=dev, requires_grad=True); g = torch.randn(B, L, D, device=dev, dtype=torch.bfloat16)
    def step():
        with torch.autocast("cuda", torch.bfloat16): y = m(x)
        y.backward(g)
    return tm(step)

def safe(f, *a):
    try: f(*a)
    except Exception as e: print("FAILED", f.__name__, a[:3], repr(e)[:400], flush=True)
safe(err, 4, 2048, 512)
safe(conv_bench, 64, 2048, 512, [(64, 32, 4, 2), (64, 16, 4, 3), (64, 32, 8, 3), (32, 64, 4, 3), (128, 16, 8, 2), (64, 8, 4, 3)])
safe(conv_bench, 16, 8192, 512, [(64, 32, 4, 2), (64, 16, 4, 3), (128, 16, 8, 2)])
T.TILES.update(y=dict(chunk=64, rows=32, warps=4, stages=2), du=dict(chunk=64, rows=32, warps=4, stages=2), dk=dict(chunk=64, rows=32, warps=4, stages=2))
for B, L in ((64, 2048), (16, 8192)):
    for comp in (False, True):
        try: r = {w: mixer(B, L, 512, w, comp) for w in ("sdpa", "fft", "toeplitz")}
        except Exception as e: print("FAILED mixer", B, L, comp, repr(e)[:400], flush=True); continue
        print(f"mixer fwd+bwd B={B} L={L} compiled={comp}: " + ", ".join(f"{w} {v:.2f} ms" for w, v in r.items()) + f"; hyena/sdpa fft {r['fft']/r['sdpa']:.2f} toeplitz {r['toeplitz']/r['sdpa']:.2f}", flush=True)
