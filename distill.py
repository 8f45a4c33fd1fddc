"""Distil a GPT-NeoX teacher into a Hyena student: layer alignment (MSE), then optionally end-to-end KL.

    python distill.py --teacher EleutherAI/pythia-70m --data openwebtext --layers progressive --max-tokens 50e6
    torchrun --nproc-per-node 4 distill.py ...                     # same script, any number of GPUs

Alignment modes (`--layers`), each matching student layer outputs to the teacher's (MSE, "Scavenging Hyena"):
  progressive  stage l trains layer l only, fed the student's own (frozen) lower layers (MobileBERT's
               progressive knowledge transfer, the paper's method); the budget is split evenly over stages
  joint        all layers at once, the sum of per-layer MSEs, the student fed its own activations
  independent  every layer fed the teacher's input to that layer (teacher forcing), all in parallel
  none         skip alignment
Then `--e2e-tokens`/`--e2e-minutes` > 0 adds an end-to-end stage: tau^2 KL(teacher || student) on the logits
(+ `--ce-weight` x cross-entropy), fused with its gradient in row chunks: full-vocab logits never exist whole.

The MSE of a layer is divided by the mean square of the teacher's output there ("relative MSE"): GPT-NeoX's
residual stream grows with depth, and without this the deepest layers would dominate the joint sum.

Which parameters train (`--train`, alignment; `--e2e-train`, end-to-end): `mixer` (Hyena operators only: the
default for alignment, since the MLPs and LayerNorms are the teacher's and already fit teacher-like inputs),
`block` (whole Hyena blocks) or `all` (everything, the default end to end, where the network must re-adapt).
"""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from finetune import save_final
from hyena import GPTNeoX, make_student
from losses import head_loss
from train import add_train_args, setup_distributed, train, train_config_from_args


def rel_mse(out, target):
    """MSE / mean(target^2): scale-free, so layers of any depth weigh alike."""
    target = target.float()
    return F.mse_loss(out.float(), target) / target.pow(2).mean().clamp_min(1e-12)


def kd_loss(hs, ht, targets, student, teacher, temperature=1.0, ce_weight=0.0, chunk=None):
    """Mean over tokens of tau^2 KL(p_teacher || p_student) [+ ce_weight * CE], from final hidden states hs, ht
    (B, L, D) before the final LayerNorm; fused with its gradient chunk by chunk (losses.FusedHeadLoss)."""
    return head_loss(student, hs, targets, ce_weight, teacher, ht, temperature, chunk)


class Distill(nn.Module):
    """The objective train.py optimises: `forward(x, y) -> (loss, metrics)`; `.model` is the student."""

    def __init__(self, teacher, student, mode, layer=None, temperature=1.0, ce_weight=0.0):
        super().__init__()
        self.model, self.teacher = student, teacher
        self.mode, self.layer, self.temperature, self.ce_weight = mode, layer, temperature, ce_weight
        self.hyena_layers = [i for i, m in enumerate(student.config.mixers) if m == "hyena"]

    def forward(self, x, y):
        if self.mode == "e2e":
            loss, metrics = self.e2e(x, y)
        elif self.mode == "progressive":
            loss, metrics = self.progressive(x)
        else:
            loss, metrics = self.align_all(x)
        if not self.training:  # validation: where every layer stands, and the student's own CE
            with torch.no_grad():
                th, sh = self.teacher.hidden_states(x), self.model.hidden_states(x)
                metrics.update({f"mse_{i}": rel_mse(sh[i + 1], th[i + 1]) for i in range(len(th) - 1)})
                metrics["ce"] = F.cross_entropy(self.model.head(sh[-1]).float().flatten(0, 1), y.flatten())
        return loss, metrics

    def progressive(self, x):
        l = self.layer
        with torch.no_grad():
            target = self.teacher.hidden_states(x, n_layers=l + 1)[-1]  # (B, L, D) teacher's layer-l output
            inp = self.model.hidden_states(x, n_layers=l)[-1]  # (B, L, D) the student's own lower layers
        loss = rel_mse(self.model.gpt_neox.layers[l](inp), target)
        return loss, {f"mse_{l}": loss.detach()}

    def align_all(self, x):
        with torch.no_grad():
            th = self.teacher.hidden_states(x)  # N+1 x (B, L, D)
        if self.mode == "joint":
            sh = self.model.hidden_states(x)
            outs = {i: sh[i + 1] for i in self.hyena_layers}
        else:  # independent: teacher forcing, each layer sees the teacher's input to it
            outs = {i: self.model.gpt_neox.layers[i](th[i]) for i in self.hyena_layers}
        mses = {i: rel_mse(o, th[i + 1]) for i, o in outs.items()}
        return sum(mses.values()), {f"mse_{i}": m.detach() for i, m in mses.items()}

    def e2e(self, x, y):
        with torch.no_grad():
            ht = self.teacher.hidden_states(x)[-1]  # (B, L, D)
        hs = self.model.hidden_states(x)[-1]
        loss = kd_loss(hs, ht, y, self.model, self.teacher, self.temperature, self.ce_weight)
        return loss, {"kd": loss.detach()}


def set_trainable(student, what, layers):
    """Freeze everything, then unfreeze `what` (mixer|block|all) of the given layers."""
    for p in student.parameters():
        p.requires_grad_(what == "all")
    if what != "all":
        for i in layers:
            block = student.gpt_neox.layers[i]
            for p in (block.hyena if what == "mixer" else block).parameters():
                p.requires_grad_(True)


def parse_layers(spec, n):
    if spec == "all":
        return list(range(n))
    try:
        return sorted({int(i) for i in spec.split(",")})
    except ValueError:
        raise SystemExit(f"distill.py: error: --hyena-layers {spec!r} must be 'all' or a list like 0,2,4") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="hub id or directory of a GPT-NeoX checkpoint")
    p.add_argument("--revision", default="main", help="hub revision of the teacher (e.g. step143000)")
    p.add_argument("--layers", default="progressive", choices=["progressive", "joint", "independent", "none"])
    p.add_argument("--hyena-layers", default="all", help="which layers become Hyena: 'all' or e.g. 0,2,4")
    p.add_argument("--init", default="teacher", choices=["teacher", "random"], help="Hyena projections' init")
    p.add_argument("--hyena-order", type=int, default=2)
    p.add_argument("--hyena-filter-lr", type=float, default=0.0, help="own lr for filter params (0: --lr)")
    p.add_argument("--train", default="mixer", choices=["mixer", "block"], help="alignment trains this (the "
                   "alignment losses never reach the embeddings or the head, so 'all' is for --e2e-train only)")
    p.add_argument("--e2e-train", default="all", choices=["mixer", "block", "all"], help="end-to-end trains this")
    p.add_argument("--e2e-tokens", type=float, default=0, help="token budget of the end-to-end KL stage")
    p.add_argument("--e2e-minutes", type=float, default=0.0, help="time budget of the end-to-end KL stage")
    p.add_argument("--e2e-lr", type=float, default=3e-4)
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of CE added to the end-to-end KL")
    add_train_args(p, lr=1e-3, out_dir="out/distill")
    args = p.parse_args(argv)
    if args.layers == "none" and not (args.e2e_tokens or args.e2e_minutes):
        raise SystemExit("distill.py: error: nothing to do: --layers none and no --e2e-tokens/--e2e-minutes")
    if args.layers == "none":  # only the end-to-end stage: its budget is the run's
        args.max_tokens, args.max_minutes = int(args.e2e_tokens), args.e2e_minutes
    try:
        cfg = train_config_from_args(args)
    except ValueError as e:
        raise SystemExit(f"distill.py: error: {e}") from None
    dist = setup_distributed(cfg.device)
    try:
        return distill(args, cfg, dist)
    except (FileExistsError, FileNotFoundError, ValueError, FloatingPointError) as e:
        raise SystemExit(f"distill.py: error: {e}") from None
    finally:
        dist.close()


def distill(args, cfg, dist):
    teacher = GPTNeoX.from_pretrained(args.teacher, args.revision).to(dist.device).eval().requires_grad_(False)
    n = teacher.config.num_hidden_layers
    layers = parse_layers(args.hyena_layers, n)
    torch.manual_seed(cfg.seed)  # the Hyena filters (and --init random projections) are drawn here
    student = make_student(teacher, layers, init=args.init, order=args.hyena_order, filter_lr=args.hyena_filter_lr)
    if max(cfg.block_size, 1) > student.config.l_max:
        raise SystemExit(f"distill.py: error: --block-size {cfg.block_size} exceeds the teacher's "
                         f"max_position_embeddings {student.config.l_max}")

    out = Path(cfg.out_dir)
    stages = []  # (name, objective kwargs, trainable, TrainConfig)
    if args.layers == "progressive":
        per = dataclasses.replace(cfg, max_tokens=int(cfg.max_tokens // len(layers)),
                                  max_minutes=cfg.max_minutes / len(layers))
        stages += [(f"stage-{l:02d}", dict(mode="progressive", layer=l), (args.train, [l]), per) for l in layers]
    elif args.layers != "none":
        stages.append((args.layers, dict(mode=args.layers), (args.train, layers), cfg))
    if args.e2e_tokens or args.e2e_minutes:
        e2e_cfg = dataclasses.replace(cfg, max_tokens=int(args.e2e_tokens), max_minutes=args.e2e_minutes,
                                      lr=args.e2e_lr)
        stages.append(("e2e", dict(mode="e2e", temperature=args.kd_temperature, ce_weight=args.ce_weight),
                       (args.e2e_train, layers), e2e_cfg))

    summaries = {}
    for name, kw, (what, which), stage_cfg in stages:
        done = out / name / "summary.json"
        if cfg.resume and done.exists():  # finished earlier: take its weights and move on
            student.load_state_dict(GPTNeoX.from_pretrained(out / name / "ckpt").to(dist.device).state_dict())
            summaries[name] = json.loads(done.read_text())
            continue
        set_trainable(student, what, which)
        if dist.master:
            print(f"distill: {name}: training {what} of layers {which}", file=sys.stderr)
        started = any((out / name / d).exists() for d in ("ckpt", "ckpt.old"))
        stage_cfg = dataclasses.replace(stage_cfg, resume=cfg.resume and started)
        summaries[name] = train(Distill(teacher, student, **kw), stage_cfg, dist, stage=name)
    if dist.master:  # like finetune.py: the data's tokenizer.json goes along, for eval.py and sampling
        save_final(student, out / "final", data.load_meta(data.resolve_data_dir(cfg.data, cfg.data_root)))
        tmp = out / "distill_summary.json.tmp"
        tmp.write_text(json.dumps({"args": vars(args), "stages": summaries}, indent=2))
        os.replace(tmp, out / "distill_summary.json")
        print(f"distill: student saved to {out / 'final'}; evaluate with: "
              f"python eval.py --ckpt {out / 'final'} --data {cfg.data}", file=sys.stderr)
    return summaries


if __name__ == "__main__":
    main()
