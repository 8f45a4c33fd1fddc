"""experiment.py's steps: each a command whose output is appended to its log and shown on the console (`run`,
`finish`), one job per GPU (`run_parallel`), skipped once its output exists (`todo`); the wall time they add up to,
and the tokens and GPU-minutes a run folder's training stages spent (`spent`).
"""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from cli import write_atomic

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]  # the scripts it launches; data and run paths stay relative to the cwd


def relay(pipe, log, prefix):
    """Copy a step's output to its log and to the console, each console line prefixed with the step's name."""
    with log:
        for line in pipe:
            log.write(line)
            log.flush()
            sys.stderr.write(prefix + line)
            sys.stderr.flush()


def run(cmd, log, env=None):
    """Start one step, its output appended to log and shown on the console; finish(proc) waits for it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(map(str, cmd))}", file=sys.stderr, flush=True)
    f = open(log, "a")
    f.write(f"$ {' '.join(map(str, cmd))}\n")
    f.flush()
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}  # progress reaches the console as it is printed
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True, errors="replace")
    proc.relay = threading.Thread(target=relay, args=(proc.stdout, f, f"[{log.stem}] "), daemon=True)
    proc.relay.start()
    return proc


def finish(proc):
    """Wait for a step and for the last of its output; returns its exit status."""
    proc.wait()
    proc.relay.join()
    return proc.returncode


def run_parallel(jobs, gpus, logs):
    """jobs: {name: [cmd, ...]} run one job per GPU (commands of a job in order), waves when jobs > GPUs."""
    pending, running = list(jobs.items()), {}
    while pending or running:
        free = [g for g in range(max(gpus, 1)) if g not in running]
        while pending and free:
            name, cmds = pending.pop(0)
            g = free.pop(0)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(g)} if gpus else None
            running[g] = [name, cmds, env, run(cmds[0], logs / f"{name}.log", env)]
        time.sleep(1)
        for g, job in list(running.items()):
            name, cmds, env, proc = job
            if proc.poll() is None:
                continue
            if finish(proc):
                raise SystemExit(f"experiment.py: step {name!r} failed (exit {proc.returncode}); see {logs / name}.log")
            cmds.pop(0)
            if cmds:
                job[3] = run(cmds[0], logs / f"{name}.log", env)
            else:
                del running[g]


def add_wall_time(runs, phase, seconds):
    """Add a phase's wall time to runs/wall_time.json: a rerun that skips or resumes steps adds only the time
    it spends, so the experiment's recorded wall time stays the sum of the work actually done."""
    path = Path(runs) / "wall_time.json"
    times = json.loads(path.read_text()) if path.exists() else {}
    times[phase] = times.get(phase, 0.0) + seconds
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(times, indent=1) + "\n")
    return sum(times.values())


def todo(cmd, out):
    """cmd unless out already exists (a finished step); --resume when the step left checkpoints behind."""
    if Path(out).exists():
        return []
    run_dir = Path(cmd[cmd.index("--out-dir") + 1]) if "--out-dir" in cmd else None
    started = run_dir is not None and any(p.parent.name in ("ckpt", "ckpt.old")  # not a torn ckpt.tmp
                                          for p in run_dir.glob("**/train_state.pt"))
    return [cmd + ["--resume"] if started else cmd]


def stages(run):
    """A run folder's training stages in order: the folder itself (finetune) or its stage sub-folders (distill)."""
    run = Path(run)

    def trained(d):  # a stage's folder: its log, or (a copy of the results without the logs) its summary
        return (d / "log.jsonl").exists() or (d / "summary.json").exists()
    if trained(run):
        return [run]
    return sorted((d for d in run.glob("*") if trained(d)),
                  key=lambda d: (d.name == "e2e", d.name))  # alignment stages first, end-to-end last


def spent(runs, folders):
    """Tokens and GPU-minutes the training stages of these folders used (GPU-minutes: minutes x world size)."""
    tokens = minutes = 0.0
    for folder in folders:
        for st in stages(runs / folder):
            s = json.loads((st / "summary.json").read_text()) if (st / "summary.json").exists() else {}
            tokens += s.get("tokens", 0)
            minutes += s.get("minutes", 0) * s.get("world", 1)
    return tokens, minutes
