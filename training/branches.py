"""A warmup-stable-decay run's --branches: shorter budgets B that the run also finishes, each from where B's decay
starts, into OUT_DIR@B as a run of its own (train.py runs each branch's decay in-process; TrainConfig reads the
flag). Only a run given --branches needs this module.
"""
import shutil
from dataclasses import replace
from pathlib import Path


def budget_name(b):
    """A budget as a branch's folder and flag spell it: whole numbers in full (token budgets), else as :g does."""
    return str(int(b)) if float(b).is_integer() else f"{b:g}"


def branch_folder(out_dir, budget):
    """Where a --branches budget's run lives: OUT_DIR@B (experiment/scaling.py names its points the same way)."""
    return Path(f"{out_dir}@{budget_name(budget)}")


def pending_branches(cfg, stage):
    """The TrainConfig (branch_config) of each --branches budget not yet finished (its folder's stage has no
    summary.json); refuses one not below the budget."""
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
                shutil.copytree(d, folder / d.name, dirs_exist_ok=True)
