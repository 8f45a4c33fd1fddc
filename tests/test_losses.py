"""fast/losses.py, the head's loss fused with its gradient, equals its plain twins: train.lm_loss (GPTNeoX.forward's
F.cross_entropy) and distill.kd_loss; its compiled chunk falls back to eager; its CPU chunks keep a training step's
memory on the heap. The fast paths run here because the tests ask for them: fast.install, fast.losses' functions."""
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import distill
import fast
import fast.losses
import train
from hyena import Config, GPTNeoX, make_student
from test_hyena import TINY, randomized  # the core tests' tiny config and all-random model

KD_TINY = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, vocab_size=64,
               max_position_embeddings=32)


def test_fused_training_loss_equals_the_plain_cross_entropy_and_so_do_gradients():
    """fast.losses.lm_loss never builds the logits (chunked, gradient fused: fast.losses.head_loss) yet is
    train.lm_loss, the model's own F.cross_entropy (hyena.GPTNeoX.forward), to rounding; with fast/'s twins
    installed the model's forward still returns its logits."""
    model = fast.install(make_student(randomized(Config(**TINY)), layers=[1]))
    idx, y = torch.randint(0, 211, (2, 30)), torch.randint(0, 211, (2, 30))
    y[1, :5] = -1  # not scored
    loss = fast.losses.lm_loss(model, idx, y)
    g_fused = torch.autograd.grad(loss, list(model.parameters()))
    logits, ref = model(idx, y)  # the fast convolution, the plain loss: the forward's contract holds
    assert logits.shape == (2, 30, 211) and torch.equal(ref, train.lm_loss(model, idx, y))
    fast.install(model, False)
    ref = train.lm_loss(model, idx, y)
    assert torch.equal(ref, F.cross_entropy(model(idx)[0].flatten(0, 1), y.flatten(), ignore_index=-1))
    g_ref = torch.autograd.grad(ref, list(model.parameters()))
    assert torch.allclose(loss, ref, rtol=1e-5)
    for a, b in zip(g_fused, g_ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature, ce_weight", [(1.0, 0.0), (2.0, 0.5)])
def test_fused_chunked_kd_loss_equals_plain_kd_loss(temperature, ce_weight):
    """fast.losses.kd_loss (fast.losses.head_loss, chunked) and distill.kd_loss (full logits) agree with the
    definition written out here: value and every gradient (hidden states, final LayerNorm, unembedding)."""
    torch.manual_seed(0)
    teacher = GPTNeoX(Config(**KD_TINY))
    student = make_student(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hs = torch.randn(3, 7, 32, requires_grad=True)
    ht, y = torch.randn(3, 7, 32), torch.randint(0, 64, (3, 7))
    y[0, :3] = -1  # ignored positions
    params = [hs, student.embed_out.weight, student.gpt_neox.final_layer_norm.weight]

    fused = fast.losses.kd_loss(hs, ht, y, student, teacher, temperature, ce_weight, chunk=5)
    g_fused = torch.autograd.grad(fused, params)
    zt, zs = teacher.head(ht) / temperature, student.head(hs) / temperature
    kl = F.kl_div(F.log_softmax(zs, -1), F.log_softmax(zt, -1), log_target=True, reduction="none").sum(-1)
    ce = F.cross_entropy((zs * temperature).flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
    plain = (temperature ** 2 * kl.sum() + ce_weight * ce) / y.numel()
    g_plain = torch.autograd.grad(plain, params)
    assert torch.allclose(fused, plain, rtol=1e-5)
    for a, b in zip(g_fused, g_plain):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    unfused = distill.kd_loss(hs, ht, y, student, teacher, temperature, ce_weight)
    assert torch.allclose(unfused, plain, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(unfused, params), g_plain):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)



def test_loss_chunk_falls_back_to_eager_when_compiling_fails(monkeypatch):
    """On CUDA the loss chunk runs compiled; where inductor cannot work, it warns once and runs eagerly."""
    from fast import losses

    def broken_compile(fn):
        def run(*args):
            raise RuntimeError("no working C compiler")
        return run
    monkeypatch.setattr(losses.torch, "compile", broken_compile)
    losses._compiled_chunk_fn.cache_clear()
    try:
        fn = losses._compiled_chunk_fn()
        zs, zt, tgt = torch.randn(4, 11), torch.randn(4, 11), torch.randint(11, (4,))
        with pytest.warns(UserWarning, match="running it eagerly"):
            loss, grad = fn(zs, tgt, 1.0, zt, 2.0)
        ref = losses.chunk_loss_and_grad(zs, tgt, 1.0, zt, 2.0)
        assert torch.equal(loss, ref[0]) and torch.equal(grad, ref[1])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # stays eager, without warning again
            assert torch.equal(fn(zs, tgt, 1.0, zt, 2.0)[1], ref[1])
    finally:
        losses._compiled_chunk_fn.cache_clear()



@pytest.mark.skipif(sys.platform != "linux", reason="mallopt and mallinfo are glibc's")
def test_cpu_loss_steps_keep_their_memory_on_the_heap_so_none_is_page_faulted_in_again():
    """A CPU step of KD on a 50k vocabulary (512 tokens: 100 MB of logits, in chunks) reuses the memory the last
    step freed: training/runtime.keep_freed_memory stops glibc trimming its heap and mmap-ing blocks under 32 MB, and
    fast.losses' CPU chunks stay under that. Otherwise every step maps, page-faults in and unmaps its memory again
    (about 0.5 GB a step here without keep_freed_memory, 2 GB with whole-logit chunks).
    Checked on glibc's own books (mallinfo), not by counting page faults, which other threads and machine load
    move by tens of MB: after a warm-up step, while each chunk's (rows, V) tensors are alive and after each step, no
    block of the step is mmap-ed (mmap-ed bytes stay at their level before the steps) and the heap never shrinks.
    In a fresh process, as a training run is (the test process's allocator holds whatever earlier tests left)."""
    code = """if True:
        import ctypes, json, torch
        from training import runtime
        from fast import losses
        libc = ctypes.CDLL("libc.so.6")
        info = getattr(libc, "mallinfo2", None)  # glibc >= 2.33; mallinfo's int fields serve below 2 GB
        word = ctypes.c_size_t if info else ctypes.c_int
        class MallInfo(ctypes.Structure):
            _fields_ = [(n, word) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                            "uordblks", "fordblks", "keepcost")]
        info = info or libc.mallinfo
        info.restype = MallInfo
        books = []  # (heap bytes taken from the system, bytes in mmap-ed blocks), in time order
        assert runtime.keep_freed_memory()
        g = torch.Generator().manual_seed(0)
        xs = torch.randn(512, 16, generator=g, requires_grad=True)
        ws = (0.1 * torch.randn(50304, 16, generator=g)).requires_grad_()
        xt, wt = torch.randn(512, 16, generator=g), 0.1 * torch.randn(50304, 16, generator=g)
        tgt, chunk = torch.zeros(512).long(), losses.default_chunk(xs.device, ws.shape[0])
        plain = losses.chunk_loss_and_grad
        def probed(*args):  # the chunk's logits, the teacher's and their gradient, (rows, V) each, are alive here
            out = plain(*args)
            books.append((info().arena, info().hblkhd))
            return out
        losses.chunk_loss_and_grad = probed  # what chunk_fn serves on the CPU
        step = lambda: losses.FusedHeadLoss.apply(xs, ws, tgt, 0.5, xt, wt, 2.0, chunk, True).backward()
        step()  # the heap grows to what a step needs
        books[:] = [(info().arena, info().hblkhd)]
        for _ in range(2):
            step()
            books.append((info().arena, info().hblkhd))
        print(json.dumps(books))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    heap, mapped = zip(*json.loads(out.stdout.split("\n")[-2]))
    assert len(heap) >= 1 + 2 * 2, "the probe never ran: chunk_fn no longer serves losses.chunk_loss_and_grad on the CPU"
    assert max(mapped) == mapped[0], f"{(max(mapped) - mapped[0]) / 1e6:.0f} MB of a step's blocks were mmap-ed"
    shrunk = [(a - b) / 1e6 for a, b in zip(heap, heap[1:]) if b < a]
    assert not shrunk, f"the heap was trimmed (MB): {shrunk}"
