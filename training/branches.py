"""A warmup-stable-decay run's --branches: shorter budgets B that the run also finishes, each from where B's decay
starts, into OUT_DIR@B as a run of its own (train.py runs each branch's decay in-process; TrainConfig reads the
flag). Only a run given --branches needs this module.
"""
import copy
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from cli import write_atomic


def budget_name(b):
    """A budget as a branch's folder and flag spell it: whole numbers in full (token budgets), else as :g does."""
    return str(int(b)) if float(b).is_integer() else f"{b:g}"


def budget_label(cfg):
    """The run's budget as its flag spells it (--max-tokens, else --max-minutes)."""
    return budget_name(cfg.max_tokens or cfg.max_minutes)


def branch_folder(out_dir, budget):
    """Where a --branches budget's run lives: OUT_DIR@B (experiment/scaling.py names its points the same way)."""
    return Path(f"{out_dir}@{budget_name(budget)}")


def pending_branches(cfg, stage, step=0, used=lambda branch: 0.0, forking=None):
    """The TrainConfig (branch_config) of each --branches budget not yet finished (its folder's stage has no
    summary.json); refuses one not below the budget, and one whose decay began before `step`, where this run
    resumed (used(branch): the fraction of the branch's budget the run had used then), unless the checkpoint
    resumed was the one saved to fork into it (`forking`, its budget's name)."""
    if not cfg.branches:
        return []
    budget = cfg.max_tokens or cfg.max_minutes
    todo = []
    for b in cfg.branch_budgets():
        if b >= budget:
            raise ValueError(f"--branches {cfg.branches}: {budget_name(b)} is not below this run's budget "
                             f"{budget_name(budget)} ({'--max-tokens' if cfg.max_tokens else '--max-minutes'}); "
                             "the full run is that budget's point")
        folder = branch_folder(cfg.out_dir, b)
        if not (folder / stage / "summary.json").exists():
            todo.append(branch_config(cfg, folder, b))
    for branch in todo:
        if used(branch) > 1 - cfg.decay_frac and budget_label(branch) != forking:
            raise ValueError(f"--branches {cfg.branches}: budget {budget_label(branch)}'s decay began before step "
                             f"{step}, where this run resumed, so its branch can no longer be taken; drop it from "
                             "--branches and run that budget on its own")
    return todo


def branch_config(cfg, folder, budget):
    """The TrainConfig of a branch: this run's, with the branch's folder and budget, and the warmup this run had
    (the same length, as a fraction of the branch's budget): a run of this config from the start is the branch."""
    unit = "max_tokens" if cfg.max_tokens else "max_minutes"
    main = cfg.max_tokens or cfg.max_minutes
    return replace(cfg, out_dir=str(folder), branches="", resume=False,
                   warmup_frac=cfg.warmup_fraction() * main / budget,
                   **{unit: int(budget) if unit == "max_tokens" else budget})


def copy_finished_stages(out, folder, stage):
    """A branch's folder starts with the run's finished stages beside this one (distill's alignment before its
    end-to-end stage), so it reads as a whole run of its own."""
    if stage:
        for d in out.parent.iterdir():
            if d.is_dir() and d.name != stage and (d / "summary.json").exists():
                shutil.copytree(d, folder / d.name, dirs_exist_ok=True, copy_function=link_or_copy)


def link_or_copy(src, dst):
    """A hard link where the file system allows one (a stage's checkpoint is hundreds of MB), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def set_aside(model, opt, rng, cuda):
    """What a branch changes of the run's state, copied for put_back: the weights, the optimizer, the sampler's and
    torch's RNGs."""
    return {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": copy.deepcopy(opt.state_dict()),
            "rng": copy.deepcopy(rng.bit_generator.state), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if cuda else None}


def put_back(saved, model, opt, rng, cuda):
    """The run's state as set_aside copied it."""
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    rng.bit_generator.state = saved["rng"]
    torch.set_rng_state(saved["torch"])
    if cuda:
        torch.cuda.set_rng_state(saved["cuda"])


def open_branch(out, branch, stage):
    """A branch's folder as its run starts (rank 0): the run's finished stages beside this one, and this stage's
    log so far."""
    copy_finished_stages(out, Path(branch.out_dir), stage)
    folder = Path(branch.out_dir) / stage
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "log.jsonl", (out / "log.jsonl").read_text())
