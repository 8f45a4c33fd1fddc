"""The training losses on a model's head, fused with their gradient so full-vocabulary logits never exist whole.

`head_loss` computes what GPTNeoX.forward's plain F.cross_entropy computes (hyena.py) and, given a teacher, the
end-to-end distillation loss of distill.kd_loss (KL(teacher || student) at a temperature, plus optional CE);
tests/test_losses.py holds both pairs equal, values and gradients. A training script that wants them passes
`lm_loss` (for train.lm_loss) or `kd_loss` (for distill.kd_loss) to its objective: the model's forward itself
always computes its logits.
"""
import functools
import warnings

import torch
import torch.nn.functional as F


def chunk_loss_and_grad(zs, tgt, ce_weight, zt, temperature):
    """One chunk's summed loss and its gradient dLoss/dzs from the student's logits zs (c, V) (and the teacher's
    zt): ce_weight (softmax(zs) - onehot) [+ tau (p_s - p_t)], in zs's dtype. Only elementwise work and row
    reductions, so on CUDA it runs compiled (`chunk_fn`): a fused softmax in two passes over the bf16 logits
    instead of about fifteen fp32 passes eagerly.
    Plain twin: distill.kd_loss (one chunk of it, its gradient by autograd); held equal by
    tests/test_losses.py::test_fused_chunked_kd_loss_equals_plain_kd_loss."""
    up = torch.promote_types(zs.dtype, torch.float32)  # fp32 softmaxes for bf16 logits; fp64 stays fp64
    z = zs.to(up)
    total, grad = z.new_zeros(()), torch.zeros_like(z)
    if ce_weight:
        log_p = F.log_softmax(z, dim=-1)  # (c, V)
        keep = (tgt != -1)[:, None].to(z.dtype)  # (c, 1)
        total = total + ce_weight * F.nll_loss(log_p, tgt, ignore_index=-1, reduction="sum")
        p = log_p.exp().scatter_add_(1, tgt.clamp(min=0)[:, None], -keep)  # softmax - onehot, no (c, V) onehot
        grad = grad + ce_weight * p * keep
    if zt is not None:
        log_pt = F.log_softmax(zt.to(up) / temperature, dim=-1)  # (c, V)
        log_ps = F.log_softmax(z / temperature, dim=-1)
        pt = log_pt.exp()
        total = total + (pt * (log_pt - log_ps)).sum() * temperature ** 2
        grad = grad + temperature * (log_ps.exp() - pt)
    return total, grad.to(zs.dtype)


@functools.cache
def _compiled_chunk_fn():
    """torch.compile(chunk_loss_and_grad), falling back to it eagerly (with a warning) if compiling fails."""
    compiled, state = torch.compile(chunk_loss_and_grad), {}

    def fn(*args):
        if state.get("failed"):
            return chunk_loss_and_grad(*args)
        try:
            out = compiled(*args)
        except Exception as e:  # noqa: BLE001 (no working inductor/Triton here: the loss must still run)
            if state.get("worked"):
                raise
            warnings.warn(f"torch.compile of the loss chunk failed ({type(e).__name__}: {str(e)[:200]}); "
                          "running it eagerly (slower, same numbers)")
            state["failed"] = True
            return chunk_loss_and_grad(*args)
        state["worked"] = True
        return out
    return fn


def chunk_fn(device):
    """chunk_loss_and_grad, compiled on CUDA (the same function run eagerly on the CPU; the benchmark's check
    section holds the two to agreement on the GPU, tests/test_losses.py the fallback to eager)."""
    return _compiled_chunk_fn() if device.type == "cuda" else chunk_loss_and_grad


class FusedHeadLoss(torch.autograd.Function):
    """Sum over rows of ce_weight * CE(zs, targets) [+ tau^2 KL(softmax(zt/tau) || softmax(zs/tau))], where
    zs = xs @ ws.T are the logits (zt = xt @ wt.T a teacher's, for distillation).

    The unembedding, softmaxes and loss run `chunk` rows at a time, and each chunk's gradient is formed on the
    spot (chunk_loss_and_grad) and pushed through the matmul: no (rows, V) logits ever exist whole (13 GB in
    fp32 at 64k tokens), and nothing is recomputed backward.
    Plain twins: hyena.GPTNeoX.forward (its F.cross_entropy), distill.kd_loss; held equal by
    tests/test_losses.py::test_fused_training_loss_equals_the_plain_cross_entropy_and_so_do_gradients and
    tests/test_losses.py::test_fused_chunked_kd_loss_equals_plain_kd_loss.
    """

    @staticmethod
    def forward(ctx, xs, ws, targets, ce_weight, xt, wt, temperature, chunk, need_grad):
        grad_x = torch.zeros_like(xs) if need_grad else None  # (n, D)
        grad_w = torch.zeros_like(ws, dtype=torch.float32) if need_grad and ws.requires_grad else None  # (V, D)
        total = torch.zeros((), dtype=torch.float32, device=xs.device)
        fn = chunk_fn(xs.device)
        for i in range(0, xs.shape[0], chunk):
            x = xs[i:i + chunk]  # (c, D)
            zt = xt[i:i + chunk] @ wt.T if xt is not None else None  # (c, V)
            loss, grad_z = fn(x @ ws.T, targets[i:i + chunk], ce_weight, zt, temperature)  # (), (c, V)
            total += loss
            if grad_x is not None:
                grad_x[i:i + chunk] = (grad_z @ ws.to(grad_z.dtype)).to(xs.dtype)
            if grad_w is not None:
                grad_w += grad_z.T @ x.to(grad_z.dtype)
        ctx.save_for_backward(grad_x, grad_w)
        return total

    @staticmethod
    def backward(ctx, g):
        grad_x, grad_w = ctx.saved_tensors
        return (grad_x * g if grad_x is not None else None, grad_w * g if grad_w is not None else None,
                None, None, None, None, None, None, None)


CPU_CHUNK_BYTES = 24 << 20  # under 32 MB: glibc serves larger blocks by mmap, never from its heap


def default_chunk(device, vocab_size, itemsize=4):
    """Rows per loss chunk: 8192 on a GPU. On the CPU each (rows, V) chunk tensor stays under CPU_CHUNK_BYTES:
    a whole step's logits (200 MB at V = 50k, 1024 tokens) would be mmap-ed, page-faulted in and unmapped again
    on every step, and the kernel's time would then equal the math's (training/runtime.keep_freed_memory keeps the
    rest)."""
    return 8192 if device.type == "cuda" else max(1, CPU_CHUNK_BYTES // (max(itemsize, 4) * vocab_size))


@torch.compiler.disable  # traced inside a compiled CUDA step, FusedHeadLoss returned zero gradients
def head_loss(model, h, targets, ce_weight=1.0, teacher=None, h_teacher=None, temperature=1.0, chunk=None):
    """ce_weight * CE [+ tau^2 KL(teacher || model)], from final hidden states h
    (B, L, D) (and the teacher's h_teacher) before the final LayerNorm; targets (B, L), -1 = not scored.
    Averaged over scored tokens for CE alone, over all tokens when distilling (the KL covers every position).
    chunk: rows per chunk (default_chunk when None).
    Plain twins: hyena.GPTNeoX.forward (its F.cross_entropy), distill.kd_loss; held equal by
    tests/test_losses.py::test_fused_training_loss_equals_the_plain_cross_entropy_and_so_do_gradients and
    tests/test_losses.py::test_fused_chunked_kd_loss_equals_plain_kd_loss."""
    xs = model.gpt_neox.final_layer_norm(h).flatten(0, 1)  # (n, D)
    xt = wt = None
    if teacher is not None:
        with torch.no_grad():
            xt, wt = teacher.gpt_neox.final_layer_norm(h_teacher).flatten(0, 1), teacher.embed_out.weight
    ws, tgt = model.embed_out.weight, targets.flatten()
    need_grad = torch.is_grad_enabled() and (xs.requires_grad or ws.requires_grad)
    chunk = chunk or default_chunk(xs.device, ws.shape[0], xs.element_size())
    total = FusedHeadLoss.apply(xs, ws, tgt, ce_weight, xt, wt, temperature, chunk, need_grad)
    n = xs.shape[0] if teacher is not None else (tgt != -1).sum().clamp_min(1)
    return total / n


def lm_loss(model, x, y):
    """Next-token cross-entropy of `model` on inputs x (B, L) and targets y (B, L), -1 = not scored: the model to
    its final hidden states, then head_loss, chunked (no (B, L, V) logits).
    Plain twin: train.lm_loss; held equal by
    tests/test_losses.py::test_fused_training_loss_equals_the_plain_cross_entropy_and_so_do_gradients."""
    return head_loss(model, model.hidden_states(x)[-1], y)


def kd_loss(hs, ht, targets, student, teacher, temperature=1.0, ce_weight=0.0, chunk=None):
    """distill.kd_loss (same arguments), by head_loss: `chunk` rows at a time, fused with its gradient.
    Plain twin: distill.kd_loss; held equal by tests/test_losses.py::test_fused_chunked_kd_loss_equals_plain_kd_loss."""
    return head_loss(student, hs, targets, ce_weight, teacher, ht, temperature, chunk)
