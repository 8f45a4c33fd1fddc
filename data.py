"""Read what prepare.py writes: data/NAME/{train,val,test}.bin (flat uint16 token ids, <|endoftext|> after every
document) and meta.json; random batches for training (evaluation/windows.py cuts what eval.py scores).

    tokens = load_split(resolve_data_dir("gutenberg"), "train")   # np.memmap, nothing read yet
    x, y = random_batch(tokens, 8, 512, np.random.default_rng(0))  # (8, 512) int64 each, y = x shifted by one
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "val", "test")


def resolve_data_dir(name_or_path, root="data"):
    """A bare name ("gutenberg") is a folder under root; anything with a directory part is a path as it stands."""
    path = Path(name_or_path)
    return path if path.name != str(name_or_path) else Path(root) / path


def load_meta(data_dir):
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        name, root = Path(data_dir).name, Path(data_dir).parent
        out = "" if root == Path("data") else f" --out-dir {root}"
        raise FileNotFoundError(f"{path} not found: no prepared data in {data_dir}. Make it with "
                                f"`python prepare.py {name}{out}` for a hub dataset (list: `python prepare.py --help`) "
                                f"or `python prepare.py text PATH... --name {name}{out}` for local text files")
    return json.loads(path.read_text())


def load_split(data_dir, split):
    """The split's tokens as a read-only uint16 memmap; checked against meta.json so a stale file is caught."""
    meta = load_meta(data_dir)
    if split not in meta["splits"]:
        raise ValueError(f"{data_dir} has no {split!r} split (it has: {', '.join(meta['splits'])}); it was made by "
                         f"`{meta['command']}`")
    path = Path(data_dir) / f"{split}.bin"
    size = path.stat().st_size if path.is_file() else None
    if size != 2 * meta["splits"][split]["tokens"]:
        raise ValueError(f"{path} is missing or does not match meta.json ({size} bytes, meta.json says "
                         f"{meta['splits'][split]['tokens']} uint16 tokens); remake it with "
                         f"`{meta['command']} --force`")
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    top = int(tokens.max()) if len(tokens) else 0  # one pass over the file: an id past the vocabulary fails here,
    if top >= meta["vocab_size"]:  # naming the file, not as an IndexError deep in a model (after hours of training)
        raise ValueError(f"{path} holds token id {top}, but meta.json's vocab_size is {meta['vocab_size']}: the file "
                         f"is corrupt or from another tokenizer; remake it with `{meta['command']} --force`")
    return tokens


def check_split_sizes(data_dir, block_size, **splits):
    """Refuse, before a run's first step, a split (name=tokens; None: not used) too short for one training window
    of block_size + 1 tokens, which would otherwise fail steps later (at the first validation), naming nothing."""
    for split, tokens in splits.items():
        if tokens is not None and len(tokens) <= block_size:
            fix = (f"lower --block-size to {len(tokens) - 1} or less, " if len(tokens) > 1 else "") + \
                ("train without validation (--eval-batches 0), " if split == "val" else "")
            raise ValueError(f"the {split} split of {data_dir} holds {len(tokens):,} tokens, too few for --block-size "
                             f"{block_size} (a window needs {block_size + 1}): {fix}or remake {data_dir} with more "
                             f"{split} text (it was made by `{load_meta(data_dir)['command']}`)")


def tokenizer_sha256(name_or_path, revision="main"):
    """sha256 of the tokenizer.json that load_tokenizer(name_or_path) reads: that .json file itself, a folder
    holding tokenizer.json, or a hub repo id (downloaded into the hub cache)."""
    from tokenizer import tokenizer_file_sha256, tokenizer_path  # here only (and the hub client for a hub id)
    return tokenizer_file_sha256(tokenizer_path(name_or_path, revision))


def check_tokenizer(meta, ckpt, revision="main"):
    """Refuse a checkpoint (a folder, a hub id) that brings a tokenizer other than the one the data was made with.
    meta.json's sha256 decides; where it differs, both files are read and compared token by token, since a hub
    repo's tokenizer.json may differ from the data's copy in formatting only. A checkpoint without a tokenizer.json
    (a run's ckpt/) can be checked for its vocabulary size only (check_compatible)."""
    from hub import HubError
    from tokenizer import load_tokenizer
    path = Path(ckpt).expanduser()
    if path.is_dir() and not (path / "tokenizer.json").is_file():
        return
    try:
        sha = tokenizer_sha256(ckpt, revision)
    except HubError as e:  # a hub repo without a tokenizer.json
        print(f"note: the tokenizer of {ckpt} cannot be compared with the data's ({e})", file=sys.stderr)
        return
    if sha == meta["tokenizer_sha256"]:
        return
    try:
        same = _encoding_state(load_tokenizer(ckpt, revision)) == _encoding_state(load_tokenizer(meta["tokenizer"]))
    except (OSError, ValueError, HubError):  # either cannot be read: the hashes alone decide
        same = False
    if not same:
        check_compatible(meta, tokenizer_sha256=sha)  # raises, naming both hashes and the fix


def _encoding_state(enc):
    """What decides the ids an encoding gives: all of its state but its name and the file's hash."""
    return {k: v for k, v in enc.__getstate__().items() if k not in ("name", "source_sha256")}


def check_compatible(meta, tokenizer_sha256=None, vocab_size=None):
    """Refuse data a model cannot read correctly. meta: load_meta's dict (or the data folder). The model's
    vocab_size may exceed the tokenizer's (Pythia pads 50277 to 50304); it must not be smaller."""
    meta = meta if isinstance(meta, dict) else load_meta(meta)
    made = f"the data was made by `{meta['command']}` with tokenizer {meta['tokenizer']}"
    if tokenizer_sha256 is not None and tokenizer_sha256 != meta["tokenizer_sha256"]:
        raise ValueError(f"{made} (tokenizer.json sha256 {meta['tokenizer_sha256'][:12]}...) but the model's "
                         f"tokenizer.json has sha256 {tokenizer_sha256[:12]}...: the same ids would mean other text. "
                         "Re-run that command with --tokenizer set to the model's tokenizer and --force")
    if vocab_size is not None and meta["vocab_size"] > vocab_size:
        raise ValueError(f"{made} ({meta['vocab_size']} token ids) but the model has vocab_size {vocab_size}: ids "
                         f">= {vocab_size} have no embedding. Use a model with vocab_size >= {meta['vocab_size']}, "
                         "or re-run that command with the model's tokenizer and --force")


def random_batch(tokens, batch_size, block_size, rng, device="cpu"):
    """batch_size windows at random starts: x (B, T) and y (B, T) = the next tokens, int64 on device.
    rng: np.random.Generator or torch.Generator (seeded by the caller, so runs repeat)."""
    if len(tokens) <= block_size:
        raise ValueError(f"{len(tokens)} tokens are too few for block_size {block_size}: need at least block_size + 1")
    high = len(tokens) - block_size  # the last start still has block_size + 1 tokens
    if isinstance(rng, torch.Generator):
        starts = torch.randint(high, (batch_size,), generator=rng).numpy()
    else:
        starts = rng.integers(high, size=batch_size)
    rows = torch.from_numpy(tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))  # (B, T+1)
    x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # (B, T) each
    if torch.device(device).type == "cuda":  # pinned host memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def unique_tokens(n_tokens, samplers):
    """How many of a split's n_tokens tokens some training runs read, replayed from their summaries' "sampler" (every
    rank's seed, batch shape and steps per stream), drawing the starts as random_batch does: the union of the windows,
    in memory per window drawn. None where a run's streams do not start at step 0 (resumed from older code)."""
    starts, ends = [], []
    for sampler in samplers:
        streams, rngs = sampler["streams"], {}  # a stream resumed with the same seed continues its generator
        if not streams or streams[0]["first_step"] != 0:
            return None
        for i, s in enumerate(streams):
            last = streams[i + 1]["first_step"] if i + 1 < len(streams) else sampler["steps"]
            draws = (last - s["first_step"]) * s["grad_accum"] * s["batch_size"]
            for seed in s["seeds"]:
                rng = rngs.setdefault(tuple(seed), np.random.default_rng(seed))
                starts.append(rng.integers(n_tokens - s["block_size"], size=draws))
                ends.append(starts[-1] + s["block_size"] + 1)  # a window reads block_size + 1 tokens
    if not starts:
        return 0
    order = np.argsort(np.concatenate(starts), kind="stable")
    lo, hi = np.concatenate(starts)[order], np.concatenate(ends)[order]
    reach = np.maximum.accumulate(hi)  # the furthest token read by any window starting at or before this one
    before = np.concatenate([[0], reach[:-1]])
    return int(np.maximum(0, reach - np.maximum(lo, before)).sum())
