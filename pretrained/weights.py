"""Pretrained weights, read with checks: a checkpoint's safetensors (one file or the shards an index names), every
tensor named and shaped as the model expects (load_weights: what GPTNeoX.from_pretrained and
modal.student.load_pretrained read through); what a --ckpt argument names (resolve_ckpt) and the tokenizer it
carries; the --dtype table.
"""
import json
import sys
from pathlib import Path

import torch

from hub import HubError, looks_like_path, resolve_file
from pretrained.safetensors import read_safetensors

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype
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
    import data  # here: reading weights needs no data
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
