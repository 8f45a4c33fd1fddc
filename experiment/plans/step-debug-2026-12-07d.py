import copy, sys, traceback
from dataclasses import replace
import torch, torch.nn as nn
import fast, hyena
from fast import step as fstep, attention
from hyena import Config, eager_step, new_cache, make_student, AttentionState
from modal.student import build
torch.manual_seed(0)
cfg = Config(max_position_embeddings=512)
n = cfg.num_hidden_layers
def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()
def serving(m):
    for mod in m.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding, nn.LayerNorm)): mod.to(torch.bfloat16)
    return m
teacher = build(cfg)
models = {"modal fp32": (build(replace(cfg, mixers=["hyena"] * n, hyena_modal_state=[16] * n)), False),
          "teacher bf16w": (serving(copy.deepcopy(teacher)), True),
          "teacher fp32 amp": (copy.deepcopy(teacher), True),
          "teacher fp32": (copy.deepcopy(teacher), False),
          "conv fp32 amp": (make_student(teacher, l_max=512), True)}
B, ctx = 2, 256
idx = torch.randint(cfg.vocab_size, (B, ctx + 40), device="cuda")
for name, (m, amp) in models.items():
    try:
        m = fast.install(m.cuda().eval())
        caches = [new_cache(m, ctx + 40) for _ in range(3)]
        outs = [[], [], []]
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            for c in caches: m(idx[:, :ctx], cache=c)
            steps = [eager_step(m, caches[0], B, lambda l: l), fstep.fused_step(m, caches[1], B, lambda l: l),
                     fstep.graphed_step(m, caches[2], B)]
            for t in range(ctx, ctx + 30):
                for k in range(3): outs[k].append(steps[k](idx[:, t:t + 1]).float().clone())
        e = [[rel(outs[k][t], outs[0][t]) for t in range(30)] for k in (1, 2)]
        print(name, "fused-nograph vs eager per step:", " ".join(f"{v:.2g}" for v in e[0][:12]), "... max", max(e[0]))
        print(name, "fused-graph   vs eager per step:", " ".join(f"{v:.2g}" for v in e[1][:12]), "... max", max(e[1]))
    except Exception:
        traceback.print_exc()
# attention alone at pos 256, fp32 and bf16
for dt in (torch.float32, torch.bfloat16):
    H, hd, T = 8, 64, 300
    att = hyena.Attention(cfg).cuda()
    k0 = torch.randn(B, H, T, hd, device="cuda", dtype=dt); v0 = torch.randn_like(k0)
    qkv = torch.randn(B, H, 3 * hd, device="cuda", dtype=dt)
    pos = torch.tensor(256, device="cuda")
    s1, s2 = AttentionState(k0.clone(), v0.clone()), AttentionState(k0.clone(), v0.clone())
    y1 = attention.attend(s1, qkv[..., :hd], qkv[..., hd:2*hd], qkv[..., 2*hd:], pos, att.inv_freq)
    # plain: RoPE as hyena.Attention, then the plain cached attention
    q, k, v = (qkv[..., i*hd:(i+1)*hd][:, :, None] for i in range(3))
    freqs = torch.outer(torch.tensor([256.0], device="cuda"), att.inv_freq); emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dt), emb.sin().to(dt); r = emb.shape[-1]
    q = torch.cat((q[..., :r] * cos + hyena.rotate_half(q[..., :r]) * sin, q[..., r:]), -1)
    k = torch.cat((k[..., :r] * cos + hyena.rotate_half(k[..., :r]) * sin, k[..., r:]), -1)
    y2 = hyena.cached_attention(s2, q, k, v, pos)[:, :, 0]
    print("attend vs plain", dt, rel(y1, y2), "cache k", rel(s1.k, s2.k))
