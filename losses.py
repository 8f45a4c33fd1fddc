"""The training losses on a model's head, fused with their gradient so full-vocabulary logits never exist whole.

`head_loss` is the cross-entropy GPTNeoX.forward trains with and, given a teacher, the end-to-end distillation
loss of distill.py (KL(teacher || student) at a temperature, plus optional CE).
"""
import torch
import torch.nn.functional as F


class FusedHeadLoss(torch.autograd.Function):
    """Sum over rows of ce_weight * CE(zs, targets) [+ tau^2 KL(softmax(zt/tau) || softmax(zs/tau))], where
    zs = xs @ ws.T are the logits (zt = xt @ wt.T a teacher's, for distillation).

    The unembedding, softmaxes and loss run `chunk` rows at a time, and each chunk's gradient is formed on the
    spot (dL/dzs = ce_weight (softmax(zs) - onehot) [+ tau (p_s - p_t)]) and pushed through the matmul: no
    (rows, V) logits ever exist whole (13 GB in fp32 at 64k tokens), and nothing is recomputed backward.
    """

    @staticmethod
    def forward(ctx, xs, ws, targets, ce_weight, xt, wt, temperature, chunk, need_grad):
        grad_x = torch.zeros_like(xs) if need_grad else None  # (n, D)
        grad_w = torch.zeros_like(ws, dtype=torch.float32) if need_grad and ws.requires_grad else None  # (V, D)
        total = torch.zeros((), dtype=torch.float32, device=xs.device)
        for i in range(0, xs.shape[0], chunk):
            x, tgt = xs[i:i + chunk], targets[i:i + chunk]  # (c, D), (c,)
            zs = (x @ ws.T).float()  # (c, V)
            grad_z = torch.zeros_like(zs)
            if ce_weight:
                log_p = F.log_softmax(zs, dim=-1)
                keep = (tgt != -1)[:, None].to(zs.dtype)  # (c, 1)
                total += ce_weight * F.nll_loss(log_p, tgt, ignore_index=-1, reduction="sum")
                p = log_p.exp_().scatter_add_(1, tgt.clamp(min=0)[:, None], -keep)  # softmax - onehot
                grad_z += ce_weight * p * keep
            if xt is not None:
                log_pt = F.log_softmax((xt[i:i + chunk] @ wt.T).float() / temperature, dim=-1)  # (c, V)
                log_ps = F.log_softmax(zs / temperature, dim=-1)
                pt = log_pt.exp()
                total += (pt * (log_pt - log_ps)).sum() * temperature ** 2
                grad_z += temperature * (log_ps.exp() - pt)
            if grad_x is not None:
                grad_x[i:i + chunk] = (grad_z.to(ws.dtype) @ ws).to(xs.dtype)
            if grad_w is not None:
                grad_w += grad_z.T @ x.float()
        ctx.save_for_backward(grad_x, grad_w)
        return total

    @staticmethod
    def backward(ctx, g):
        grad_x, grad_w = ctx.saved_tensors
        return (grad_x * g if grad_x is not None else None, grad_w * g if grad_w is not None else None,
                None, None, None, None, None, None, None)


def head_loss(model, h, targets, ce_weight=1.0, teacher=None, h_teacher=None, temperature=1.0, chunk=8192):
    """ce_weight * CE [+ tau^2 KL(teacher || model)], from final hidden states h
    (B, L, D) (and the teacher's h_teacher) before the final LayerNorm; targets (B, L), -1 = not scored.
    Averaged over scored tokens for CE alone, over all tokens when distilling (the KL covers every position)."""
    xs = model.gpt_neox.final_layer_norm(h).flatten(0, 1)  # (n, D)
    xt = wt = None
    if teacher is not None:
        with torch.no_grad():
            xt, wt = teacher.gpt_neox.final_layer_norm(h_teacher).flatten(0, 1), teacher.embed_out.weight
    ws, tgt = model.embed_out.weight, targets.flatten()
    need_grad = torch.is_grad_enabled() and (xs.requires_grad or ws.requires_grad)
    total = FusedHeadLoss.apply(xs, ws, tgt, ce_weight, xt, wt, temperature, chunk, need_grad)
    n = xs.shape[0] if teacher is not None else (tgt != -1).sum().clamp_min(1)
    return total / n
