"""Cross-entropy training of a GPT-NeoX or Hyena model: from scratch or from a checkpoint.

    python finetune.py --init scratch --data shakespeare --preset tiny                    # a few minutes on a CPU
    python finetune.py --init scratch --mixer hyena --config pythia-70m --data gutenberg --max-tokens 2e9
    python finetune.py --init out/distill/final --data gutenberg --lr 1e-4 --max-tokens 1e8
    torchrun --nproc-per-node 8 finetune.py ...                                           # same flags, 8 GPUs

From scratch with `--mixer hyena` this is the paper's "pre-trained Hyena" baseline; with attention it is how
we pretrain our own GPT-NeoX teacher. The model lands in OUT_DIR/final/ (OUT_DIR/ckpt/ is the last checkpoint).
"""
import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

import data
from training.checkpoint import save_final
from cli import out_dir_lock
from pretrained.config import SHAPES, read_config, trained_at
from hyena import MIXERS, Config, GPTNeoX
from training.runtime import setup_distributed
from training import add_train_args, train_config_from_args
from modal.student import load_pretrained
from train import CrossEntropy, lm_loss, train

PRESETS = {  # --preset: train-flag defaults (explicit flags still win)
    "tiny": dict(batch_size=8, block_size=128, max_tokens=200_000, eval_interval=50, eval_batches=10,
                 ckpt_interval=100, lr=2e-3, warmup_frac=0.05, out_dir="out/tiny"),
}


def scratch_model(shape, mixer, vocab_size, block_size):
    """A fresh GPTNeoX: a SHAPES preset (vocab_size from the data) or an HF-style config.json."""
    if shape in SHAPES:
        # Pythia pads its 50277-token vocabulary to 50304, a multiple of 128 (faster matmuls): do the same.
        cfg = Config(**SHAPES[shape], vocab_size=-(-vocab_size // 128) * 128)
    elif Path(shape).is_file():
        cfg = read_config(shape)
    else:
        raise FileNotFoundError(f"--config {shape}: neither a preset ({', '.join(SHAPES)}) nor a config.json file")
    kw = asdict(cfg)
    kw["max_position_embeddings"] = max(cfg.max_position_embeddings, block_size)
    if mixer:
        kw["mixers"] = [mixer] * cfg.num_hidden_layers
    return GPTNeoX(Config(**kw))


def long_context(config, block_size, init):
    """The model's config once trained at --block-size (pretrained.config.trained_at), or a refusal naming the fix.
    Modal Hyena filters are defined at any length; convolutional ones end at l_max. Attention layers train past
    max_position_embeddings (RoPE is defined at every position: the model learns those positions), and the saved
    config's max_position_embeddings becomes the block size, except under dynamic RoPE (refused)."""
    limit = config.filter_context
    if limit is not None and block_size > limit:
        raise ValueError(f"--block-size {block_size} exceeds the convolutional Hyena filters' l_max {limit} of {init} "
                         f"(their table ends there): use --block-size {limit} or less, or convert the student to "
                         f"modal filters, defined at any length, first (distill.py --teacher {init} --modal-state D)")
    if "attention" in config.mixers and block_size > config.max_position_embeddings:
        if config.rope_type == "dynamic":
            raise ValueError(f"--block-size {block_size} exceeds max_position_embeddings "
                             f"{config.max_position_embeddings} of {init}, whose dynamic RoPE reads it: training "
                             f"there would change its function; use --block-size {config.max_position_embeddings} "
                             "or less")
        print(f"finetune: attention layers train past max_position_embeddings {config.max_position_embeddings} "
              f"(RoPE at positions up to {block_size - 1}); the saved config records {block_size}", file=sys.stderr)
    return trained_at(config, block_size)


def parse_args(argv):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=PRESETS)
    preset = pre.parse_known_args(argv)[0].preset
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", required=True,
                   help="'scratch', a folder written by save_pretrained (a distilled student, a run's ckpt/), "
                        "or a hub repo id like EleutherAI/pythia-70m")
    p.add_argument("--revision", default="main", help="hub revision of --init")
    p.add_argument("--preset", choices=PRESETS, help="small CPU-friendly defaults: " + json.dumps(PRESETS["tiny"]))
    p.add_argument("--mixer", choices=MIXERS, help="--init scratch: mixer of every layer (default: attention, "
                                                   "or what --config's config.json says)")
    p.add_argument("--config", help=f"--init scratch: model shape, one of {', '.join(SHAPES)} or a config.json "
                                    "(default: pythia-70m; tiny with --preset tiny)")
    add_train_args(p, **PRESETS.get(preset, {"out_dir": "out/finetune"}))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = train_config_from_args(args)
    data_dir = data.resolve_data_dir(cfg.data, cfg.data_root)
    meta = data.load_meta(data_dir)  # fails early, naming the prepare.py command, when the data is not there
    dist = setup_distributed(cfg.device)
    try:
        with out_dir_lock(cfg.out_dir, dist.master):
            summary = run(args, cfg, meta, dist)
    finally:
        dist.close()
    return summary


def run(args, cfg, meta, dist):
    """Make or load the model, check it against the data, train it, and save OUT_DIR/final."""
    if args.init == "scratch":
        torch.manual_seed(cfg.seed)  # every DDP rank builds the same initial weights
        model = scratch_model(args.config or ("tiny" if args.preset == "tiny" else "pythia-70m"), args.mixer,
                              meta["vocab_size"], cfg.block_size)
    elif args.config or args.mixer:
        raise ValueError("--config and --mixer shape a model made from scratch; they cannot apply to "
                         f"--init {args.init} (drop them, or use --init scratch)")
    else:
        model = load_pretrained(args.init, args.revision)
        data.check_tokenizer(meta, args.init, args.revision)
    data.check_compatible(meta, vocab_size=model.config.vocab_size)
    model.config = long_context(model.config, cfg.block_size, args.init)
    on = cfg.fast_on(dist.device)  # --fast: fast/'s twins, put in from outside (auto: on CUDA)
    if on:
        import fast.losses  # fast/, an extra: loaded only when asked for
    objective = CrossEntropy(model, fast.losses.lm_loss if on else lm_loss)
    objective = fast.install(objective) if on else objective
    summary = train(objective, cfg, dist,  # a --branches budget's model lands in its own final/
                    on_branch=lambda branch, _: save_final(model, Path(branch.out_dir) / "final", meta, branch))
    if dist.master:
        final = Path(cfg.out_dir) / "final"
        save_final(model, final, meta, cfg)  # cfg: the data it trained on, for eval.py
        print(f"saved {final} after {summary['tokens']:,} tokens; evaluate it on {cfg.data}'s validation split, "
              f"with a sample, with:\n  python eval.py --ckpt {cfg.out_dir}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    import cli  # the one error path: exit 2 and one line, no traceback (--debug shows it)
    cli.run(main)
