"""Distil a GPT-NeoX teacher into a Hyena student: layer alignment (MSE), then optionally end-to-end KL.

    python prepare.py openwebtext && python distill.py --layers progressive    # the defaults below
    torchrun --nproc-per-node 4 distill.py ...                     # same script, any number of GPUs

Defaults: --teacher EleutherAI/pythia-70m, --data openwebtext, --out-dir out/distill and, with neither --max-tokens
nor --max-minutes, 100M tokens (said in the run's first line): ~17M per progressive stage of Pythia-70M, 1-2 minutes
of steps on one H100 (0.9-2.0M tokens/s at batch 16 x 2048, bf16, compiled) plus each stage's compile.

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

Modal conversion (`--modal-state D` or `--modal-tol TOL`, docs/modal.md): the teacher is a distilled conv student;
every Hyena filter becomes D decaying complex modes (modal/), the fit errors go to OUT_DIR/modal_fit.json, and the
conv student teaches the optional stages (e.g. a short `--layers none --e2e-tokens N` KL repair).

What trains (`--train` aligning, `--e2e-train` end to end): `mixer` (the Hyena operators: alignment's default, the
MLPs and norms being the teacher's), `block` (whole Hyena blocks) or `all` (end to end's default: all re-adapts).
"""
import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from training.checkpoint import save_final
from cli import out_dir_lock, write_atomic
from hyena import make_student
from training.runtime import setup_distributed
from training import DistillConfig, TrainConfig, add_train_args, train_config_from_args
from train import train

DEFAULT_TOKENS = 100_000_000  # the alignment budget with no --max-tokens/--max-minutes: see the docstring


def rel_mse(out, target):
    """MSE / mean(target^2): scale-free, so layers of any depth weigh alike."""
    target = target.float()
    return F.mse_loss(out.float(), target) / target.pow(2).mean().clamp_min(1e-12)


def kd_loss(hs, ht, targets, student, teacher, temperature=1.0, ce_weight=0.0):
    """Mean over tokens of tau^2 KL(p_teacher || p_student) [+ ce_weight * CE over the scored tokens], from final
    hidden states hs, ht (B, L, D) before the final LayerNorm. Its fast twin fast.losses.kd_loss computes it fused
    with its gradient in row chunks, never holding the (B, L, V) logits; tests/test_losses.py holds the two equal."""
    with torch.no_grad():
        zt = teacher.head(ht).float() / temperature  # (B, L, V)
    z = student.head(hs).float()  # (B, L, V)
    kl = F.kl_div(F.log_softmax(z / temperature, -1), F.log_softmax(zt, -1), log_target=True, reduction="sum")
    ce = F.cross_entropy(z.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum") if ce_weight else 0.0
    return (temperature ** 2 * kl + ce_weight * ce) / targets.numel()


class Distill(nn.Module):
    """The objective train.py optimises: `forward(x, y) -> (loss, metrics)`; `.model` is the student."""

    def __init__(self, teacher, student, mode, layer=None, temperature=1.0, ce_weight=0.0, kd=kd_loss):
        super().__init__()
        self.model, self.teacher = student, teacher
        self.mode, self.layer, self.temperature, self.ce_weight = mode, layer, temperature, ce_weight
        self.kd = kd  # the end-to-end loss: kd_loss, or fast.losses.kd_loss (--fast)
        self.hyena_layers = [i for i, m in enumerate(student.config.mixers) if m == "hyena"]

    def train(self, mode=True):
        """train.py switches the objective between training and validation: only the student follows, the teacher
        stays in eval mode (it is frozen too: distill() turns its gradients off)."""
        super().train(mode)
        self.teacher.eval()
        return self

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
        loss = self.kd(hs, ht, y, self.model, self.teacher, self.temperature, self.ce_weight)
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
        raise ValueError(f"--hyena-layers {spec!r} must be 'all' or a list like 0,2,4") from None


@dataclass
class Stage:
    """One training run of the student, in OUT_DIR/name: the Distill objective's mode (and, progressive, its
    layer), what trains (set_trainable's `what` of `layers`), and its budget and lr (cfg)."""
    name: str
    mode: str
    trains: str
    layers: list
    cfg: TrainConfig
    layer: int | None = None


def plan_stages(dcfg, cfg, layers):
    """The stages in order: the alignment (one stage per layer when progressive, its budget split evenly over
    them), then the end-to-end stage if it has a budget. Only the last stage branches (--branches)."""
    stages = []
    align = dataclasses.replace(cfg, compile=dcfg.align_compile or cfg.compile)
    if dcfg.layers == "progressive":
        per = dataclasses.replace(align, max_tokens=int(cfg.max_tokens // len(layers)),
                                  max_minutes=cfg.max_minutes / len(layers))
        stages += [Stage(f"stage-{l:02d}", "progressive", dcfg.train, [l], per, layer=l) for l in layers]
    elif dcfg.layers != "none":
        stages.append(Stage(dcfg.layers, dcfg.layers, dcfg.train, layers, align))
    if dcfg.e2e:
        e2e_cfg = dataclasses.replace(cfg, max_tokens=int(dcfg.e2e_tokens), max_minutes=dcfg.e2e_minutes,
                                      lr=dcfg.e2e_lr)
        stages.append(Stage("e2e", "e2e", dcfg.e2e_train, layers, e2e_cfg))
    for st in stages[:-1]:  # --branches are budgets of the last stage: the earlier ones run once, shared
        st.cfg = dataclasses.replace(st.cfg, branches="")
    return stages


def check_branches(cfg, stages):
    """--branches are budgets of the last stage, checked before any stage trains, naming that stage's flag."""
    if not cfg.branches:
        return
    if not stages or (last := stages[-1]).mode == "progressive":
        raise ValueError(f"--branches {cfg.branches}: progressive alignment ends in one layer's stage, whose budget is "
                         "not the run's: add an end-to-end stage (--e2e-tokens/--e2e-minutes) to branch it, or "
                         "branch finetune.py after it")
    budget, unit = (last.cfg.max_tokens, "tokens") if last.cfg.max_tokens else (last.cfg.max_minutes, "minutes")
    flag = f"--e2e-{unit}" if last.name == "e2e" else f"--max-{unit}"
    if max(cfg.branch_budgets()) >= budget:
        raise ValueError(f"--branches {cfg.branches}: every budget must be below the {last.name} stage's {flag} "
                         f"{budget:g}, which the run itself finishes")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="EleutherAI/pythia-70m", help="hub id or directory of a GPT-NeoX "
                   "checkpoint (default: %(default)s)")
    p.add_argument("--revision", default="main", help="hub revision of the teacher (e.g. step143000)")
    p.add_argument("--layers", default="progressive", choices=["progressive", "joint", "independent", "none"])
    p.add_argument("--hyena-layers", default="all", help="which layers become Hyena: 'all' or e.g. 0,2,4")
    p.add_argument("--init", default="teacher", choices=["teacher", "random"], help="Hyena projections' init")
    p.add_argument("--hyena-order", type=int, default=2)
    p.add_argument("--hyena-filter-lr", type=float, default=0.0, help="own lr for filter params (0: --lr)")
    p.add_argument("--train", default="mixer", choices=["mixer", "block"], help="alignment trains this (the "
                   "alignment losses never reach the embeddings or the head, so 'all' is for --e2e-train only)")
    p.add_argument("--align-compile", default="", choices=["", "auto", "on", "off"], help="--compile for the "
                   "alignment stages only (default: --compile's); off saves each progressive stage's compile")
    p.add_argument("--e2e-train", default="all", choices=["mixer", "block", "all"], help="end-to-end trains this")
    p.add_argument("--e2e-tokens", type=float, default=0, help="token budget of the end-to-end KL stage")
    p.add_argument("--e2e-minutes", type=float, default=0.0, help="time budget of the end-to-end KL stage")
    p.add_argument("--e2e-lr", type=float, default=3e-4)
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of CE added to the end-to-end KL")
    p.add_argument("--modal-state", type=int, default=0, help="convert the teacher (a Hyena student) to modal "
                   "filters with this many modes per channel in every Hyena layer (0: no conversion)")
    p.add_argument("--modal-tol", type=float, default=0.0, help="convert to modal filters, choosing per layer the "
                   "smallest d in 1, 2, 4, ... --modal-max-state with relative filter error <= this")
    p.add_argument("--modal-max-state", type=int, default=64, help="largest d --modal-tol may choose")
    p.add_argument("--modal-refine-steps", type=int, default=0, help="Adam steps on each filter's fit error")
    add_train_args(p, lr=1e-3, out_dir="out/distill", data="openwebtext", batch_size=16, max_tokens=None,
                   max_minutes=None)  # None: not given, so default_budget's 100M tokens
    args = p.parse_args(argv)
    default_budget(args)
    dcfg = DistillConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig)})
    if dcfg.layers == "none":  # only the end-to-end stage: its budget is the run's
        args.max_tokens, args.max_minutes = int(dcfg.e2e_tokens), dcfg.e2e_minutes
        if dcfg.convert and not (args.max_tokens or args.max_minutes):
            args.max_tokens = 1  # conversion only: no stage trains, but TrainConfig insists on a budget
    cfg = train_config_from_args(args)
    dist = setup_distributed(cfg.device)
    try:
        with out_dir_lock(cfg.out_dir, dist.master):
            return distill(dcfg, cfg, dist)
    finally:
        dist.close()


def default_budget(args):
    """No --max-tokens nor --max-minutes: DEFAULT_TOKENS, said in the run's first line (rank 0's) so that a budget
    the user did not choose is never silent; one flag given, the other is 0 (none)."""
    if args.max_tokens is None and args.max_minutes is None and args.layers != "none":
        args.max_tokens = DEFAULT_TOKENS
        if os.environ.get("RANK", "0") == "0":
            print(f"distill: budget {DEFAULT_TOKENS:,} tokens (the default; --max-tokens or --max-minutes sets "
                  f"another), teacher {args.teacher}, data {args.data}, out-dir {args.out_dir}", file=sys.stderr)
    args.max_tokens, args.max_minutes = args.max_tokens or 0, args.max_minutes or 0.0


def distill(dcfg, cfg, dist):
    """Make the student (or the modal conversion), train it through its stages, and save OUT_DIR/final; returns
    {stage name: train.train's summary}."""
    from modal.student import load_pretrained  # any checkpoint, a modal student's too (modal/ builds those)
    meta = data.load_meta(data.resolve_data_dir(cfg.data, cfg.data_root))
    teacher = load_pretrained(dcfg.teacher, dcfg.revision).to(dist.device).eval().requires_grad_(False)
    data.check_tokenizer(meta, dcfg.teacher, dcfg.revision)
    data.check_compatible(meta, vocab_size=teacher.config.vocab_size)
    n = teacher.config.num_hidden_layers
    layers = parse_layers(dcfg.hyena_layers, n)
    torch.manual_seed(cfg.seed)  # the Hyena filters (and --init random projections) are drawn here
    if dcfg.convert:
        from modal.student import convert  # Laughing Hyena (modal/, an extra): only for --modal-state / --modal-tol
        student = convert(teacher, dcfg.teacher, dcfg.modal_state, dcfg.modal_tol, dcfg.modal_max_state,
                          dcfg.modal_refine_steps, Path(cfg.out_dir) if dist.master else None)
        layers = [i for i, m in enumerate(student.config.mixers) if m == "hyena"]
    else:
        student = make_student(teacher, layers, init=dcfg.init, order=dcfg.hyena_order,
                               filter_lr=dcfg.hyena_filter_lr)
    if max(cfg.block_size, 1) > student.config.l_max:
        raise ValueError(f"--block-size {cfg.block_size} exceeds the teacher's max_position_embeddings "
                         f"{student.config.l_max}; use --block-size {student.config.l_max} or less")

    out = Path(cfg.out_dir)
    stages = plan_stages(dcfg, cfg, layers)
    check_branches(cfg, stages)
    if dcfg.convert and stages and dist.master and not (out / "converted").exists():
        save_final(student, out / "converted", meta)  # the modal student before its repair, for comparison
    summaries = {}
    for stage in stages:
        done = out / stage.name / "summary.json"
        if cfg.resume and done.exists():  # finished earlier: take its weights and move on
            student.load_state_dict(load_pretrained(out / stage.name / "ckpt").to(dist.device).state_dict())
            summaries[stage.name] = json.loads(done.read_text())
            continue
        set_trainable(student, stage.trains, stage.layers)
        if dist.master:
            print(f"distill: {stage.name}: training {stage.trains} of layers {stage.layers}", file=sys.stderr)
        started = any((out / stage.name / d).exists() for d in ("ckpt", "ckpt.old"))
        stage_cfg = dataclasses.replace(stage.cfg, resume=cfg.resume and started)
        on = cfg.fast_on(dist.device)  # --fast: fast/'s twins, put in from outside (auto: on CUDA)
        if on:
            import fast.losses  # fast/, an extra: loaded only when asked for
        objective = Distill(teacher, student, stage.mode, stage.layer, dcfg.kd_temperature, dcfg.ce_weight,
                            fast.losses.kd_loss if on else kd_loss)
        objective = fast.install(objective) if on else objective
        summaries[stage.name] = train(objective, stage_cfg, dist, stage=stage.name,
                                      on_branch=lambda branch, last: finish(student, *branch_run(dcfg, cfg, stage, branch),
                                                                            {**summaries, stage.name: last}, meta))
    if dist.master:
        finish(student, dcfg, cfg, summaries, meta)
        print(f"distill: student saved to {out / 'final'}; evaluate it on {cfg.data}'s validation split, with a "
              f"sample, with: python eval.py --ckpt {out}", file=sys.stderr)
    return summaries


def finish(student, dcfg, cfg, summaries, meta):
    """OUT_DIR/final (with the data's tokenizer.json, like finetune.py, for eval.py and sampling) and
    distill_summary.json: every flag's value, each stage's summary, and the unique training tokens all stages read."""
    out = Path(cfg.out_dir)
    save_final(student, out / "final", meta, cfg)  # cfg: the data it trained on, for eval.py
    known = all("sampler" in s for s in summaries.values())  # a stage finished by older code did not record it
    unique = data.unique_tokens(meta["splits"]["train"]["tokens"], [s["sampler"] for s in summaries.values()])
    settings = {**dataclasses.asdict(dcfg), **dataclasses.asdict(cfg)}
    write_atomic(out / "distill_summary.json", json.dumps({"args": settings, "stages": summaries,
                                                           "unique_tokens": unique if known else None}, indent=2))


def branch_run(dcfg, cfg, stage, branch):
    """A --branches budget's run as its settings say: the run's own, in the branch's folder, with the branch's budget
    on the flags of the stage that branched (the end-to-end stage's, or a joint / independent alignment's)."""
    if stage.name == "e2e":
        dcfg = dataclasses.replace(dcfg, e2e_tokens=branch.max_tokens, e2e_minutes=branch.max_minutes)
    else:
        cfg = dataclasses.replace(cfg, max_tokens=branch.max_tokens, max_minutes=branch.max_minutes)
    return dcfg, dataclasses.replace(cfg, out_dir=branch.out_dir, branches="")


if __name__ == "__main__":
    import cli  # the one error path: exit 2 and one line, no traceback (--debug shows it)
    cli.run(main)
