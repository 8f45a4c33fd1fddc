"""Training checkpoints: saved atomically, restored exactly, and the run's final weights.

Training checkpoints are written atomically (a complete one exists at every instant, even under kill -9) and
restored exactly (weights, optimizer moments, every rank's RNG and data-sampler state), so `--resume` continues
a run as if it had never stopped (bitwise on CPU).

Layout of OUT/ckpt/: config.json + model.safetensors (GPTNeoX.save_pretrained, loadable on its own) and
train_state.pt (a dict of tensors, numbers and strings, read with torch.load(weights_only=True)).

A wsd run's --branches are finished runs of their own in OUT_DIR@B/ (training/branches.py; train.py runs each
one's decay in-process). Pretrained weights (GPTNeoX.from_pretrained) are read by pretrained/weights.py.
"""
import json
import math
import pickle
import shutil
import sys
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

import data
from cli import disk_full, write_atomic

# --resume refuses to change these (or the sequences per step), which would change what a step means. The lr, the
# budgets and the split of a step into GPUs x micro-batches may change.
RESUME_FIELDS = ("data", "block_size", "seed")


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


def start_or_resume(out, model, opt, rng, cfg, dist, stage=""):
    """Where train() starts: step 0 (refusing a folder that holds a checkpoint already), or with --resume exactly
    where out's checkpoint left off (load_checkpoint); returns (step, tokens, elapsed_s, the sampler's streams:
    note_stream, the --branches budget the checkpoint was forking into, if any). Rank 0 begins out/log.jsonl, or
    trims it to the resumed step."""
    step, tokens, elapsed, streams, forking = 0, 0, 0.0, [], None
    if cfg.resume:
        step, tokens, elapsed, streams, forking = load_checkpoint(out, model, opt, rng, cfg, dist, stage)
    elif find_checkpoint(out):
        raise FileExistsError(f"{out} already holds a checkpoint: pass --resume to continue that run, or choose "
                              "another --out-dir (or delete that folder) to start afresh")
    if dist.master:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            trim_log(out / "log.jsonl", step)
        else:
            write_atomic(out / "log.jsonl", "")
    return step, tokens, elapsed, note_stream(streams, step, cfg, stage, dist), forking


def load_checkpoint(out, model, opt, rng, cfg, dist, stage=""):
    """Restore weights, optimizer and RNGs from out/ckpt (or ckpt.old); returns (step, tokens, elapsed_s, the
    sampler's streams so far: note_stream, the branch budget it was saved to fork into or None)."""
    from pretrained.config import to_hf  # HF's config.json and safetensors, read back on the resume path only
    from pretrained.safetensors import read_safetensors
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
        fresh = np.random.default_rng(stream_seed(cfg, stage, dist.rank, state["step"]))
        rng.bit_generator.state = fresh.bit_generator.state
        if dist.master:
            print(f"--resume: {state['world']} -> {dist.world} GPUs: the data sampler continues with new streams "
                  "(a correct continuation, but not the batches the original run would have seen)", file=sys.stderr)
        return state["step"], state["tokens"], state["elapsed"], streams, state.get("forking")
    mine = state["rng"][dist.rank]
    rng.bit_generator.state = mine["numpy"]
    torch.set_rng_state(mine["torch"])
    if mine["cuda"] is not None and dist.device.startswith("cuda"):
        torch.cuda.set_rng_state(mine["cuda"])
    return state["step"], state["tokens"], state["elapsed"], streams, state.get("forking")


def stream_seed(cfg, stage, rank, restart=None):
    """The data sampler's seed on one rank: the run's --seed folded with its --data-stream and stage, so each
    stage of a run, and each run given its own stream, draws its own windows (restart: the step where a resume
    onto another GPU count started fresh streams)."""
    key = zlib.crc32(f"{cfg.data_stream}/{stage}".encode())
    return [cfg.seed, rank, key] + ([] if restart is None else [restart])


def note_stream(streams, step, cfg, stage, dist):
    """The sampler's streams (what data.unique_tokens replays, one entry per change of GPU count or batch shape), with
    one more from `step` where this run starts one: every rank's seed, fresh ones where the GPU count changed."""
    if not streams or (streams[-1]["world"], streams[-1]["batch_size"], streams[-1]["grad_accum"]) != \
            (dist.world, cfg.batch_size, cfg.grad_accum):
        same = streams and streams[-1]["world"] == dist.world  # the same generators go on (restarted ones too)
        seeds = streams[-1]["seeds"] if same else [stream_seed(cfg, stage, r, step if streams else None)
                                                   for r in range(dist.world)]
        streams.append({"first_step": step, "world": dist.world, "batch_size": cfg.batch_size,
                        "block_size": cfg.block_size, "grad_accum": cfg.grad_accum, "seeds": seeds})
    return streams


def save_final(model, out, meta, cfg=None):
    """OUT_DIR/final: the weights, the data's tokenizer.json (a local file, or a hub id's cached copy) and, given
    the run's TrainConfig, training_data.json: the data it trained on (`eval.py --ckpt OUT_DIR` alone scores it)."""
    from hub import HubError  # here: the hub client and the tokenizer stay off the training loop's imports
    from tokenizer import tokenizer_file_sha256, tokenizer_path
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
