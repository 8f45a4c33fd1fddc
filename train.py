"""The one training loop, shared by finetune.py (cross-entropy) and distill.py (teacher -> student).

An objective is an nn.Module with `forward(x, y) -> (loss, metrics)` and the model being trained as `.model`;
train() does the rest: AdamW with warmup + cosine (or warmup-stable-decay, with --branches) over a token/time
budget, gradient accumulation and clipping, bf16 autocast, DDP under torchrun, validation, a JSONL log, atomic
checkpoints and exact resume (training/checkpoint.py), in the process training/runtime.py sets up. Its settings,
one per --flag, are training's TrainConfig.

    python finetune.py --init scratch --data gutenberg --max-tokens 50_000_000      # one GPU, or the CPU
    torchrun --nproc-per-node 8 finetune.py --init scratch --data gutenberg ...      # 8 GPUs, same script
"""
import json
import math
import sys
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import data
from hyena import HyenaFilter, HyenaOperator
from cli import write_atomic
from training.runtime import compile_or_eager, ctrl_c, keep_freed_memory, setup_distributed, stopped
from training.checkpoint import find_checkpoint, rng_states, save_checkpoint, start_or_resume, stream_seed


def lm_loss(model, x, y):
    """Next-token cross-entropy: the model's own loss, from its full (B, L, V) logits."""
    return model(x, y)[1]


class CrossEntropy(nn.Module):
    """The objective of plain language-model training: next-token cross-entropy of .model (finetune.py), computed
    by `loss(model, x, y)`: lm_loss, or its fast twin fast.losses.lm_loss when the script asks (--fast)."""
    def __init__(self, model, loss=lm_loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, x, y):
        loss = self.loss(self.model, x, y)
        return loss, {"ce": loss.detach()}


def optim_groups(model, weight_decay, lr):
    """AdamW groups, one per (weight decay, lr): decay on matrices and embeddings only. Each Hyena operator's long
    filter takes no weight decay, and its own lr where the operator's filter_lr (Config.hyena_filter_lr) is set;
    an implicit filter's positional embedding z takes safari's lr (PositionalEmbedding.lr)."""
    own = {}  # {parameter: its settings where they differ from the run's}
    for m in model.modules():
        if isinstance(m, HyenaOperator):
            f = m.filter_fn
            own.update({p: {"weight_decay": 0.0, **({"lr": m.filter_lr} if m.filter_lr else {})}
                        for p in f.parameters()})
            if isinstance(f, HyenaFilter):
                own[f.pos_emb.z] = {"lr": f.pos_emb.lr, "weight_decay": 0.0}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hint = {"weight_decay": weight_decay if p.dim() >= 2 else 0.0, "lr": lr, **own.get(p, {})}
        groups.setdefault((hint["weight_decay"], hint["lr"]), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr": glr} for (wd, glr), ps in groups.items()]


def build_optimizer(model, cfg, fused=False):
    """AdamW over optim_groups(model); each group keeps its base lr so the schedule scales all of them alike."""
    groups = optim_groups(model, cfg.weight_decay, cfg.lr)
    for g in groups:
        g["base_lr"] = g["lr"]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def progress(tokens, seconds, cfg):
    """Fraction of the budget used: the larger of the token and the time fraction."""
    return max(tokens / cfg.max_tokens if cfg.max_tokens else 0.0,
               seconds / (60 * cfg.max_minutes) if cfg.max_minutes else 0.0)


def lr_factor(p, cfg):
    """Linear warmup over warmup_frac of the budget, then cosine down to min_lr_frac at p = 1; or (wsd) constant
    until 1 - decay_frac, then linear down to min_lr_frac at p = 1."""
    warmup = cfg.warmup_fraction()
    if p < warmup:
        return p / warmup
    if cfg.schedule == "wsd":
        return 1 - (1 - cfg.min_lr_frac) * min(1.0, max(0.0, p - (1 - cfg.decay_frac)) / cfg.decay_frac)
    q = min(1.0, (p - warmup) / (1 - warmup)) if warmup < 1 else 1.0
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * q))


@torch.no_grad()
def validation_metrics(objective, tokens, cfg, dist, amp):
    """Mean loss and metrics over eval_batches val batches; a fixed rng gives the same windows every time. Every
    rank evaluates all of them, so the ranks stay in step and all know the result."""
    objective.eval()
    rng, sums = np.random.default_rng(cfg.seed), {}
    for _ in range(cfg.eval_batches):
        x, y = data.random_batch(tokens, cfg.batch_size, cfg.block_size, rng, dist.device)  # (B, T) each
        with amp:
            loss, metrics = objective(x, y)
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + v.float()
    objective.train()
    return {k: v.item() / cfg.eval_batches for k, v in sums.items()}


def train(objective, cfg, dist=None, stage="", on_step=None, on_branch=None):
    """Train objective.model within cfg's budget; returns the run summary (rank 0 also writes it). With --branches,
    each branch is finished in this process where its decay starts (the main run's state set aside and restored),
    and on_branch(branch_cfg, summary) is called on rank 0 while the model holds the branch's final weights."""
    dist = dist or setup_distributed(cfg.device)
    with ctrl_c(Path(cfg.out_dir) / stage, dist.world == 1) as stop:
        return _train(objective, cfg, dist, stage, on_step, on_branch, stop)


def _train(objective, cfg, dist, stage, on_step, on_branch, stop):
    out, model, cuda = Path(cfg.out_dir) / stage, objective.model, dist.device.startswith("cuda")
    data_dir = data.resolve_data_dir(cfg.data, cfg.data_root)
    data.check_compatible(data.load_meta(data_dir), vocab_size=model.config.vocab_size)
    train_tokens = data.load_split(data_dir, "train")
    val_tokens = data.load_split(data_dir, "val") if cfg.eval_batches else None
    data.check_split_sizes(data_dir, cfg.block_size, train=train_tokens, val=val_tokens)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        keep_freed_memory()
    objective.to(dist.device)
    opt = build_optimizer(model, cfg, fused=cuda)
    rng = np.random.default_rng(stream_seed(cfg, stage, dist.rank))  # each rank its own stream of batches
    # step 0, or (--resume) exactly where the checkpoint left off; the sampler's streams data.unique_tokens replays
    step, tokens, elapsed0, streams, forking = start_or_resume(out, model, opt, rng, cfg, dist, stage)
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and cuda)
    amp = torch.autocast(torch.device(dist.device).type, dtype=torch.bfloat16) if bf16 else nullcontext()
    t_compile = time.perf_counter()  # the compile's trial step: reported, outside the budget
    compiled = compile_or_eager(objective, cfg, cuda, train_tokens, dist.device, amp)
    compile_s = time.perf_counter() - t_compile if compiled is not objective else 0.0
    runner = compiled if dist.world == 1 else \
        DistributedDataParallel(compiled, device_ids=[dist.local_rank] if cuda else None)
    params = [p for g in opt.param_groups for p in g["params"]]
    step_tokens = cfg.batch_size * cfg.block_size * cfg.grad_accum * dist.world
    ckpt_step, eval_step, val, recent = step, -1, {}, deque(maxlen=cfg.log_interval)
    prefix = f"{stage} " if stage else ""
    clock = {"start": time.perf_counter(), "aside": 0.0, "elapsed0": elapsed0}  # a branch swaps in its own

    def elapsed():  # the run's training wall time; under DDP the slowest rank's, so all ranks agree on lr and stop
        t = clock["elapsed0"] + time.perf_counter() - clock["start"] - clock["aside"]
        if dist.world > 1 and cfg.max_minutes:
            t = torch.tensor(t, dtype=torch.float64, device=dist.device)
            torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return float(t)

    def aside(t0):  # validation and checkpoints stay outside the budget, like compiling
        clock["aside"] += time.perf_counter() - t0

    def log(folder, record, line=None):
        if dist.master:
            with open(folder / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if line:
                print(prefix + line, file=sys.stderr)

    def validate(folder, tag=""):  # eagerly: compiling the no-grad graph would cost more than the few batches
        t0 = time.perf_counter()
        result = validation_metrics(objective, val_tokens, cfg, dist, amp)
        aside(t0)
        log(folder, {"step": step, "tokens": tokens, "val": result},
            f"{tag}step {step} | val " + " | ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result

    def checkpoint(folder, run_cfg, forking=None):  # forking: the branch it is saved to fork into
        t0 = time.perf_counter()
        state = {"config": asdict(run_cfg), "world": dist.world, "step": step, "tokens": tokens,
                 "elapsed": elapsed(), "optimizer": opt.state_dict(), "rng": rng_states(rng, dist),
                 "streams": streams, "forking": forking}
        if dist.master:
            save_checkpoint(folder, model, state)
        if dist.world > 1:
            torch_dist.barrier()
        aside(t0)

    def train_step(run_cfg, folder, now, tag=""):
        """One optimizer step at run_cfg's lr schedule (now: elapsed() before it); logs it into folder/log.jsonl."""
        nonlocal step, tokens
        factor = lr_factor(progress(tokens + step_tokens, now, run_cfg), run_cfg)  # progress at the step's end
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        t0, sums = time.perf_counter(), {}
        for micro in range(cfg.grad_accum):
            x, y = data.random_batch(train_tokens, cfg.batch_size, cfg.block_size, rng, dist.device)  # (B, T) each
            # DDP all-reduces gradients on the last micro-step only; the others accumulate locally.
            with runner.no_sync() if dist.world > 1 and micro < cfg.grad_accum - 1 else nullcontext():
                with amp:
                    loss, metrics = runner(x, y)
                (loss / cfg.grad_accum).backward()
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
        stacked = torch.stack([*sums.values(), grad_norm.float()])
        if dist.world > 1:  # mean over ranks; also makes a NaN on any rank stop every rank
            torch_dist.all_reduce(stacked)
            stacked /= dist.world
        *values, grad_norm = stacked.tolist()
        metrics = dict(zip(sums, values))
        if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):
            last = find_checkpoint(out)
            raise FloatingPointError(
                f"non-finite loss {metrics['loss']} (grad norm {grad_norm}) at step {step + 1}: stopped before "
                f"updating the weights. Lower --lr (now {cfg.lr:g}) or check the data in {data_dir}, then " +
                (f"rerun with --resume from the last good checkpoint {last} (step {ckpt_step})" if last else
                 "rerun (there is no checkpoint yet)"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step, tokens = step + 1, tokens + step_tokens
        now_t = time.perf_counter()
        record = {"step": step, "tokens": tokens, "lr": cfg.lr * factor, **metrics, "grad_norm": grad_norm,
                  "tokens_per_s": step_tokens / (now_t - t0),
                  "elapsed_s": clock["elapsed0"] + now_t - clock["start"] - clock["aside"]}
        if cuda:
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        recent.append(metrics)
        line, window["steps"] = None, window["steps"] + 1
        if step % cfg.log_interval == 0:
            rate = window["steps"] * step_tokens / (now_t - window["t"])  # over this log window, evals included
            left = ([(run_cfg.max_tokens - tokens) / rate] if run_cfg.max_tokens else []) + \
                ([60 * run_cfg.max_minutes - record["elapsed_s"]] if run_cfg.max_minutes else [])
            eta = max(0.0, min(left))
            line = (f"{tag}step {step} | {tokens / 1e6:.2f}M tok | loss {metrics['loss']:.4f} | "
                    f"{rate / 1e3:.1f}k tok/s | ETA {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m{int(eta % 60):02d}s")
            window.update(t=now_t, steps=0)
        log(folder, record, line)
        if on_step is not None:
            on_step(step)

    def summarize(folder, run_cfg, val, extra=None, before=None):  # before(summary): called before it is written
        seconds = elapsed()
        summary = {"stage": stage, "out_dir": str(folder), "world": dist.world, "compiled": compiled is not objective,
                   "compile_s": compile_s, "fast": cfg.fast, "fast_on": cfg.fast_on(dist.device),
                   "aside_s": clock["aside"], "tokens": tokens, "steps": step,
                   "minutes": seconds / 60, "tokens_per_s": tokens / seconds if seconds else 0.0, "val": val,
                   "train": {k: sum(m[k] for m in recent) / len(recent) for k in recent[0]} if recent else {},
                   "data_stream": run_cfg.data_stream, "sampler": {"steps": step, "streams": streams},
                   **(extra or {})}
        if dist.master:  # summary.json last: a branch folder holding one is finished
            summary["unique_tokens"] = data.unique_tokens(len(train_tokens), [summary["sampler"]])
            if before is not None:
                before(summary)
            write_atomic(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def finish_branch(branch):
        """Run a branch's decay from here to its budget, save it like a run of its own, then put the main run's
        state back: one process pays for the stable phase once and compiles once."""
        nonlocal step, tokens, recent
        from training.branches import budget_label, open_branch, put_back, set_aside
        checkpoint(out, cfg, budget_label(branch))  # a crash inside the branch resumes right here, into it
        t_fork, fork_elapsed = time.perf_counter(), elapsed()
        saved = {**set_aside(model, opt, rng, cuda), "step": step, "tokens": tokens, "recent": recent,
                 "clock": dict(clock)}
        folder = Path(branch.out_dir) / stage
        if dist.master:
            open_branch(out, branch, stage)
        clock.update(start=time.perf_counter(), aside=0.0, elapsed0=fork_elapsed)  # setting up is not the branch's
        window.update(t=time.perf_counter(), steps=0)
        recent, tag = deque(recent, maxlen=cfg.log_interval), f"[{budget_label(branch)}] "
        while progress(tokens, now := elapsed(), branch) < 1:
            train_step(branch, folder, now, tag)
            if stop:
                break
        if not stop:
            b_val = validate(folder, tag) if val_tokens is not None else {}
            checkpoint(folder, branch)
            summarize(folder, branch, b_val, {"branch_of": str(out), "forked_at_step": saved["step"]},
                      before=on_branch and (lambda summary: on_branch(branch, summary)))  # final/ before summary.json
            if dist.master:
                print(f"{prefix}branch {budget_label(branch)}: finished at step {step} in {branch.out_dir}",
                      file=sys.stderr)
        put_back(saved, model, opt, rng, cuda)
        step, tokens, recent = saved["step"], saved["tokens"], saved["recent"]
        clock.update(saved["clock"])
        clock["aside"] += time.perf_counter() - t_fork  # the branch's time is not the main run's

    def halt():
        """A signal asked to stop: the finished step's checkpoint, then `stopped` (cli.run: exit 128 + its number)."""
        if ckpt_step != step:
            checkpoint(out, cfg)
        raise stopped(stop[0], step, out)

    branches = []  # --branches: the TrainConfig of each shorter budget still to finish, here (training/branches.py)
    if cfg.branches:
        from training.branches import pending_branches
        branches = pending_branches(cfg, stage, step, lambda branch: progress(tokens, elapsed0, branch), forking)
    objective.train()
    window = {"t": time.perf_counter(), "steps": 0}  # the progress line's rate: steps since its last line
    while progress(tokens, now := elapsed(), cfg) < 1:
        for branch in [b for b in branches if progress(tokens + step_tokens, now, b) > 1 - cfg.decay_frac]:
            finish_branch(branch)  # the next step would decay in a run of budget B: B's run goes its own way here
            branches.remove(branch)
            ckpt_step = step
            window.update(t=time.perf_counter(), steps=0)
            if stop:
                break
        if stop:  # (a signal that came after the last step's check below, or during a branch)
            halt()
        train_step(cfg, out, now)
        if val_tokens is not None and step % cfg.eval_interval == 0:
            val, eval_step = validate(out), step
        if step % cfg.ckpt_interval == 0:
            checkpoint(out, cfg)
            ckpt_step = step
        if stop:
            halt()
    if val_tokens is not None and eval_step != step:
        val = validate(out)
    if ckpt_step != step:
        checkpoint(out, cfg)
    return summarize(out, cfg, val)
