"""Checkpoints: training checkpoints, and the pretrained weights GPTNeoX.from_pretrained reads.

Training checkpoints are written atomically (a complete one exists at every instant, even under kill -9) and
restored exactly (weights, optimizer moments, every rank's RNG and data-sampler state), so `--resume` continues
a run as if it had never stopped (bitwise on CPU).

Layout of OUT/ckpt/: config.json + model.safetensors (GPTNeoX.save_pretrained, loadable on its own) and
train_state.pt (a dict of tensors, numbers and strings, read with torch.load(weights_only=True)).

A wsd run's --branches are finished runs of their own in OUT_DIR@B/ (train.py runs each one's decay in-process).
"""
import json
import math
import pickle
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

import data
from config import to_hf
from lib.cli import disk_full, write_atomic
from hub import HubError, looks_like_path, resolve_file
from lib.safetensors_io import read_safetensors
from tokenizer import tokenizer_file_sha256, tokenizer_path

# --resume refuses to change these (or the sequences per step), which would change what a step means. The lr, the
# budgets and the split of a step into GPUs x micro-batches may change.
RESUME_FIELDS = ("data", "block_size", "seed")
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype


def find_checkpoint(out):
    """out/ckpt, else out/ckpt.old (a save killed between its two renames), else None."""
    return next((Path(out) / n for n in ("ckpt", "ckpt.old") if (Path(out) / n / "train_state.pt").is_file()), None)


def _nbytes(obj):
    """Bytes of the tensors in obj (nested dicts, lists, tuples): about what saving it takes on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (dict, list, tuple)):
        return sum(map(_nbytes, obj.values() if isinstance(obj, dict) else obj))
    return 0


def save_checkpoint(out, model, state):
    """Write ckpt.tmp/ completely, then swap it in, so a complete checkpoint exists at every instant. A write that
    fails removes ckpt.tmp (its partial files would keep the space the next try needs); the last checkpoint stays."""
    tmp, cur, old = out / "ckpt.tmp", out / "ckpt", out / "ckpt.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, metadata={"step": str(state["step"]), "tokens": str(state["tokens"])})
        torch.save(state, tmp / "train_state.pt")
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full(e, out, _nbytes(model.state_dict()) + _nbytes(state))
        if full is None:
            raise
        last = find_checkpoint(out)
        raise OSError(f"{out}: {full} writing the checkpoint of step {state['step']}; " +
                      (f"the last one, {last}, is kept. Free space there, then rerun the same command with --resume"
                       if last else "there is no earlier one. Free space there, then rerun the same command")) from None
    if cur.exists():
        shutil.rmtree(old, ignore_errors=True)
        cur.rename(old)
    tmp.rename(cur)
    shutil.rmtree(old, ignore_errors=True)


def rng_states(rng, dist):
    """Every rank's sampler and torch RNG states, in rank order (rank 0 saves them all)."""
    mine = {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(),  # numpy's: a dict of ints and str
            "cuda": torch.cuda.get_rng_state() if dist.device.startswith("cuda") else None}
    every = [mine] * dist.world
    if dist.world > 1:
        torch_dist.all_gather_object(every, mine)
    return every


def load_checkpoint(out, model, opt, rng, cfg, dist, stream_seed):
    """Restore weights, optimizer and RNGs from out/ckpt (or ckpt.old); returns (step, tokens, elapsed_s, the
    sampler's streams so far: see train.py). stream_seed(rank, step): a rank's fresh sampler seed from that step."""
    ckpt = find_checkpoint(out)
    if ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out}/ckpt (nor ckpt.old); run without --resume")
    try:
        state = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # truncated or not a torch file
        raise ValueError(f"--resume: {ckpt}/train_state.pt is unreadable ({str(e).splitlines()[0]}); delete "
                         f"{ckpt} to resume from the older checkpoint if there is one, or start afresh without "
                         "--resume") from None
    was, now = state["config"], asdict(cfg)
    changed = [f"{k} {was[k]} -> {now[k]}" for k in RESUME_FIELDS if was[k] != now[k]]
    split = [(c["batch_size"], c["grad_accum"], w) for c, w in ((was, state["world"]), (now, dist.world))]
    if math.prod(split[0]) != math.prod(split[1]):
        changed.append("sequences per step (batch_size x grad_accum x GPUs) {} -> {}".format(
            *(" x ".join(map(str, s)) for s in split)))
    if changed:
        raise ValueError(f"--resume: {ckpt} was trained with other settings ({'; '.join(changed)}). Resume with the "
                         "checkpoint's flags, or start afresh in another --out-dir")
    saved = json.loads((ckpt / "config.json").read_text())
    if saved != json.loads(json.dumps(to_hf(model.config))):
        raise ValueError(f"--resume: the model in {ckpt}/config.json (hidden {saved['hidden_size']}, layers "
                         f"{saved['num_hidden_layers']}, mixers {saved.get('mixers', 'attention')}) is not the model "
                         "being trained; build the same model, or start afresh in another --out-dir")
    model.load_state_dict(read_safetensors(ckpt / "model.safetensors"))
    hyper = [{k: g[k] for k in ("base_lr", "weight_decay", "betas")} for g in opt.param_groups]
    opt.load_state_dict(state["optimizer"])  # moments and step counts; the hyper-parameters are this run's
    for g, h in zip(opt.param_groups, hyper):
        g.update(h)
    streams = list(state.get("streams", []))
    if state["world"] != dist.world:  # other GPU count: the old per-rank streams do not map; start fresh ones
        rng.bit_generator.state = np.random.default_rng(stream_seed(dist.rank, state["step"])).bit_generator.state
        if dist.master:
            print(f"--resume: {state['world']} -> {dist.world} GPUs: the data sampler continues with new streams "
                  "(a correct continuation, but not the batches the original run would have seen)", file=sys.stderr)
        return state["step"], state["tokens"], state["elapsed"], streams
    mine = state["rng"][dist.rank]
    rng.bit_generator.state = mine["numpy"]
    torch.set_rng_state(mine["torch"])
    if mine["cuda"] is not None and dist.device.startswith("cuda"):
        torch.cuda.set_rng_state(mine["cuda"])
    return state["step"], state["tokens"], state["elapsed"], streams


def save_final(model, out, meta, cfg=None):
    """OUT_DIR/final: the weights, the data's tokenizer.json (a local file, or a hub id's cached copy) and, given
    the run's TrainConfig, training_data.json: the data it trained on (`eval.py --ckpt OUT_DIR` alone scores it)."""
    try:
        tok = tokenizer_path(meta["tokenizer"])
    except (OSError, HubError):  # e.g. offline with a cold cache: the checkpoint goes without it
        tok = None
    try:
        model.save_pretrained(out)
        if tok and tokenizer_file_sha256(tok) == meta["tokenizer_sha256"]:
            write_atomic(out / "tokenizer.json", tok.read_bytes())
        if cfg is not None:
            where = data.resolve_data_dir(cfg.data, cfg.data_root)
            write_atomic(out / "training_data.json", json.dumps({"data": cfg.data, "data_root": cfg.data_root,
                                                                 "path": str(where.resolve())}, indent=1) + "\n")
    except OSError as e:  # each file is written atomically: nothing partial is left
        full = disk_full(e, out, _nbytes(model.state_dict()))
        if full is None:
            raise
        raise OSError(f"{out}: {full} writing the final weights; the run's checkpoint is kept. Free space there, "
                      "then rerun the same command with --resume") from None


def trim_log(path, step):
    """Keep the log lines up to the resumed step: the interrupted run's later steps are about to be redone."""
    def keep(line):
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError):  # a line cut short by a kill
            return False
    if path.exists():
        write_atomic(path, "".join(line + "\n" for line in path.read_text().splitlines() if keep(line)))


# ----------------------------------------------------------------------------- pretrained weights

# Buffers that HF checkpoints may carry but that we recompute: never persistent in this model.
IGNORED_SUFFIXES = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")
# Tensors of the Hyena filter that checkpoints from before it followed safari's convention lack.
SAFARI_FILTER_TENSORS = ("filter_fn.pos_emb.z", "filter_fn.pos_emb.t", "filter_fn.modulation.deltas")


def read_pretrained(name_or_path, revision, expected, mixers):
    """The state dict a pretrained checkpoint holds, checked against `expected` (a fresh model's state_dict()):
    every tensor named and shaped as there, none missing; HF's lm_head.weight read as embed_out.weight, buffers we
    recompute skipped. Refusals name the file and the key; old-convention Hyena filters say why they are refused."""
    state = {}
    for path in weight_files(name_or_path, revision):
        for key, t in read_safetensors(path).items():
            key = "embed_out.weight" if key == "lm_head.weight" else key
            if key.endswith(IGNORED_SUFFIXES):
                continue
            if key not in expected:
                raise ValueError(f"{path}: unexpected key {key!r} for a GPT-NeoX with mixers {mixers}")
            if t.shape != expected[key].shape:
                raise ValueError(f"{path}: {key!r} has shape {list(t.shape)}, the config implies "
                                 f"{list(expected[key].shape)}")
            state[key] = t
    missing = sorted(set(expected) - set(state))
    if missing and all(k.endswith(SAFARI_FILTER_TENSORS) for k in missing):
        raise ValueError(f"{name_or_path}@{revision}: checkpoint lacks the Hyena filter's {missing[:3]}...: it was "
                         "written before the filter followed safari's convention (decay rates in the opposite "
                         "channel order, fixed positional embedding), so it would compute another function. "
                         "Retrain it with this version")
    if missing:
        raise ValueError(f"{name_or_path}@{revision}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return state


def load_weights(model, name_or_path, revision="main"):
    """model (built from the checkpoint's config) with the checkpoint's weights, every one checked
    (read_pretrained); returns it. GPTNeoX.from_pretrained and modal.student.load_pretrained read through it."""
    state = read_pretrained(name_or_path, revision, model.state_dict(), model.config.mixers)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # e.g. the filter's shared Sin given different frequencies
        raise ValueError(f"{name_or_path}@{revision}: {e}") from None
    return model


def weight_files(name_or_path, revision="main"):
    """model.safetensors, or the shards a model.safetensors.index.json names. Pickle files are refused."""
    try:
        return [resolve_file(name_or_path, "model.safetensors", revision)]
    except (FileNotFoundError, HubError) as single_err:
        try:
            index = Path(resolve_file(name_or_path, "model.safetensors.index.json", revision))
        except (FileNotFoundError, HubError):
            raise FileNotFoundError(
                f"{name_or_path}@{revision} has neither model.safetensors nor model.safetensors.index.json "
                f"({single_err}). Only safetensors are loaded (pickle files are never unpickled); convert "
                "pytorch_model.bin with transformers' save_pretrained(safe_serialization=True)") from None
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [resolve_file(name_or_path, s, revision) for s in shards]


def resolve_ckpt(name):
    """A folder written by save_pretrained; a train.py --out-dir: its final/, else its ckpt/ (said in one line);
    else a hub repo id. A folder holding neither is refused, naming the subfolders that hold a checkpoint."""
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return str(path)
    for sub in ("final", "ckpt"):
        if (path / sub / "config.json").is_file():
            print(f"{name}: a training run's folder: using its {sub}/ ({path / sub})", file=sys.stderr)
            return str(path / sub)
    if path.exists():
        found = sorted(str(c.parent) for pattern in ("*/config.json", "*/*/config.json") for c in path.glob(pattern))
        raise FileNotFoundError(f"checkpoint not found: {path} holds no config.json (nor final/ or ckpt/ with one); " +
                                (f"pass one of its subfolders: {', '.join(found[:6])}" if found else
                                 "expected a folder written by save_pretrained or a train.py --out-dir"))
    if looks_like_path(name):
        raise FileNotFoundError(f"checkpoint not found: {name} is no local folder, nor a hub repo id like "
                                "'EleutherAI/pythia-160m'")
    return name


def checkpoint_tokenizer(ckpt):
    """The tokenizer.json a local checkpoint folder carries, else None."""
    path = Path(ckpt) / "tokenizer.json"
    return str(path) if path.is_file() else None


def trained_on(labels, ckpts):
    """(--data names, --data-root) of the data these checkpoints trained on (their training_data.json), for
    eval.py --ckpt alone; the recorded name under its root where that exists from here, else its absolute path."""
    dirs = []
    for label, ckpt in zip(labels, ckpts):
        path = Path(ckpt) / "training_data.json"
        if not path.is_file():
            run = Path(ckpt).parent / "distill_summary.json"  # an older distill run names its data there
            name = json.loads(run.read_text())["args"]["data"] if run.is_file() else "openwebtext"
            raise ValueError(f"--ckpt {label}: no record of the data it trained on (no {path.name}: a hub model, or "
                             "a checkpoint saved before they were recorded); pass --data NAME, a dataset prepare.py "
                             f"made under --data-root (e.g. --data {name}), and/or --prompt TEXT")
        rec = json.loads(path.read_text())
        here = data.resolve_data_dir(rec["data"], rec["data_root"])
        dirs.append((here if (here / "meta.json").is_file() else Path(rec["path"])).resolve())
    dirs = list(dict.fromkeys(dirs))  # each dataset once, in order
    roots = {d.parent for d in dirs}
    return ([d.name for d in dirs], str(roots.pop())) if len(roots) == 1 else ([str(d) for d in dirs], "data")


# ----------------------------------------------------------------------------- --branches (train.py's wsd)

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
