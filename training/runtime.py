"""The process a training run lives in: torchrun's ranks and process group (`setup_distributed`), glibc's
allocator kept from returning freed memory (`keep_freed_memory`), Ctrl-C and SIGTERM turned into a checkpoint
(`ctrl_c`), and the objective compiled where it can be, else run eagerly (`compile_or_eager`). train.py's loop
uses all four.
"""
import ctypes
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist

import data


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def master(self):
        return self.rank == 0

    def close(self):
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def setup_distributed(device="auto"):
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK (a plain run is rank 0 of 1); joins the process group once."""
    rank, world, local = (int(os.environ.get(k, "1" if k == "WORLD_SIZE" else "0"))
                          for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device in ("auto", "cuda"):
        device = f"cuda:{local}" if device == "cuda" or torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this PyTorch {torch.__version__} sees no CUDA GPU (a CPU build, or no "
                         "GPU visible); use --device cpu, or install a CUDA build of PyTorch")
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if world > 1 and not torch_dist.is_initialized():
        # NVLink SHARP (multicast) fails to initialise on hosts whose fabric manager does not enable it (e.g.
        # virtualised nodes); plain NVLink rings serve gradient all-reduce as well. Harmless elsewhere.
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        cuda = device.startswith("cuda")
        torch_dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None)
    return Dist(rank, world, local, device)


def keep_freed_memory():
    """Have glibc keep freed memory for reuse instead of handing it back to the OS. By default it returns the
    top of its heap once 128 kB+ is free there and serves blocks of 128 kB+ by mmap (the limit grows with what
    is freed): a CPU training step frees its activations and gradients, and the next step page-faults all of
    them in again, costing as much system time as the step's math. Fixed limits stop that: blocks under 32 MB
    (glibc's largest heap block; fast/losses.py keeps its chunks below it) come from the heap, and the heap is never
    trimmed. A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20) and mallopt(M_TRIM_THRESHOLD, 1 << 30))


SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}  # what stops a run with a checkpoint (ctrl_c)


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal: cli.run exits with its status, 128 + the signal's number as shells report a
    process killed by it (130 for Ctrl-C, 143 for SIGTERM), so schedulers and scripts see why it ended."""
    def __init__(self, message, signum=signal.SIGINT):
        super().__init__(message)
        self.status = 128 + signum


def stopped(signum, step, out):
    """The Stopped train() raises once the step a signal interrupted is finished and checkpointed."""
    return Stopped(f"stopped by {SIGNALS[signum]} after step {step}, saved in {out / 'ckpt'}; continue the run "
                   "with the same command plus --resume", signum)


@contextmanager
def ctrl_c(out, active=True):
    """Ctrl-C (SIGINT) or SIGTERM (kill, schedulers, docker stop) while training: the first one lets the step
    finish, then train() saves a checkpoint and raises `stopped` (cli.run: exit 130 or 143); a second one stops
    at once. Yields a list that holds the signal's number once asked to stop. Inactive under DDP (each rank would
    stop at another step and wait for the others forever) and off the main thread (where Python delivers no
    signals)."""
    stop = []
    if not active or threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def again(signum, frame):
        raise Stopped(f"stopped at once by a second {SIGNALS[signum]}; the last checkpoint in {out}, if any, "
                      "continues with the same command plus --resume", signum)

    def first(signum, frame):
        stop.append(signum)
        for s in SIGNALS:
            signal.signal(s, again)
        print(f"\n{SIGNALS[signum]}: stopping after this step, with a checkpoint ({SIGNALS[signum]} again stops "
              "at once)", file=sys.stderr)

    previous = {s: signal.signal(s, first) for s in SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def compile_or_eager(objective, cfg, cuda, tokens, device, amp):
    """torch.compile(objective) when cfg.compile says so (auto: on CUDA), tried at once on one batch (forward
    and backward, gradients then cleared, the training rng untouched): if compiling fails there (no working
    Triton or inductor, an op it cannot trace), the run goes on eagerly with a warning: same numbers, slower."""
    if cfg.compile == "off" or (cfg.compile == "auto" and not cuda):
        return objective
    compiled = torch.compile(objective)
    x, y = data.random_batch(tokens, cfg.batch_size, cfg.block_size, np.random.default_rng(0), device)
    try:
        with amp:
            loss, _ = compiled(x, y)
        loss.backward()
    except Exception as e:  # noqa: BLE001 (any compiler failure: eager computes the same function)
        if isinstance(e, torch.OutOfMemoryError):
            raise
        print(f"warning: torch.compile failed ({type(e).__name__}: {str(e)[:300]}); training eagerly "
              "(pass --compile off to skip the attempt)", file=sys.stderr)
        compiled = objective
    objective.zero_grad(set_to_none=True)
    return compiled
