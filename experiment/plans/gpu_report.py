"""What the GPU plan scripts beside this file share: a markdown report rewritten whole after each row (a call cut
short keeps what it measured), a step's wall time, and its kernels by CUDA time (torch.profiler)."""
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from cli import write_atomic


class Report:
    """report(*rows): the rows appended to `path`, headed "# {title}: the GPU, torch's version", and printed."""

    def __init__(self, path, title):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lines = [f"# {title}: {torch.cuda.get_device_name()}, torch {torch.__version__}", ""]

    def __call__(self, *rows):
        self.lines.extend(rows)
        print(*rows, sep="\n", flush=True)
        write_atomic(self.path, "\n".join(self.lines) + "\n")


def wall(step, n, warmup=3):
    """ms a call of step() over n calls, after `warmup` calls, the GPU synchronized around them."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / n


def kernels(step, n=5, top=25):
    """(table rows of the top kernels by CUDA time per call, kernel launches per call, CUDA ms per call)"""
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in ev) / n / 1e3
    count = sum(e.count for e in ev) / n
    ev.sort(key=lambda e: -e.device_time_total)
    rows = ["| kernel | calls/step | ms/step | share |", "|---|---:|---:|---:|"]
    rows += [f"| {e.key[:90]} | {e.count / n:g} | {e.device_time_total / n / 1e3:.3f} | "
             f"{e.device_time_total / n / 1e3 / total:.1%} |" for e in ev[:top]]
    return rows, count, total
