"""A training run's settings: TrainConfig, one field per flag of every training script (finetune.py, distill.py),
each with its help text, checked on construction so a bad value is refused naming its flag; the budgets of a
warmup-stable-decay run's --branches (training/branches.py runs them). `add_train_args` turns the fields into a
parser's --flags (a script may change their defaults), `train_config_from_args` reads them back. train.py's loop
runs a TrainConfig. DistillConfig holds what distill.py does beyond the loop (its own flags), checked alike.

The loop's plumbing beside it: checkpoint.py (checkpoints, exact resume, the final weights), runtime.py (the
process: torchrun's ranks, signals, compile or eager, the allocator), branches.py (--branches).
"""
import argparse
from dataclasses import MISSING, dataclass, field, fields

from cli import integer

CHOICES = {"dtype": ("auto", "bf16", "fp32"), "compile": ("auto", "on", "off"),  # the flags with fixed choices
           "schedule": ("cosine", "wsd"), "fast": ("auto", "on", "off")}


def arg(default, help):
    """A TrainConfig field with the help text of its --flag."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    out_dir: str = arg(MISSING, "folder for log.jsonl, ckpt/ and summary.json")
    data: str = arg("gutenberg", "prepared data: a name under --data-root, or a folder (see prepare.py)")
    data_root: str = arg("data", "where prepare.py put the named datasets")
    batch_size: int = arg(8, "sequences per micro-batch per GPU")
    block_size: int = arg(2048, "tokens per sequence")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    lr: float = arg(6e-4, "peak learning rate; groups with their own lr (Hyena filters) are scaled alike")
    min_lr_frac: float = arg(0.1, "the schedule ends at min_lr_frac * lr")
    warmup_frac: float = arg(0.02, "fraction of the budget spent on linear warmup")
    schedule: str = arg("cosine", "after the warmup: cosine decay over the whole budget, or wsd (warmup-stable-"
                        "decay: constant lr, then a linear decay over the last --decay-frac of the budget)")
    decay_frac: float = arg(0.2, "wsd: the fraction of the budget spent decaying")
    branches: str = arg("", "wsd: shorter budgets B (comma-separated, in the budget's unit: minutes with "
                        "--max-minutes, else tokens) that the run also finishes, each from where B's decay starts "
                        "(in this process, then the run goes on), into OUT_DIR@B as a run of its own: one stable "
                        "phase pays for every budget")
    weight_decay: float = arg(0.1, "AdamW decay of matrices and embeddings (never biases, norms, Hyena filters)")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.95, "AdamW beta2")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0 = never; the norm is logged anyway)")
    max_tokens: int = arg(0, "token budget, counted over all GPUs (0 = none)")
    max_minutes: float = arg(0.0, "wall-clock budget of the training steps in minutes (compiling, "
                              "validation and checkpoints outside it; 0 = none); the first budget to end stops the run")
    eval_interval: int = arg(200, "validate every this many optimizer steps (and at the end)")
    eval_batches: int = arg(20, "validation batches, the same windows every time (0 = no validation)")
    log_interval: int = arg(10, "print a progress line every this many steps (log.jsonl has every step)")
    ckpt_interval: int = arg(500, "checkpoint every this many steps (and at the end)")
    compile: str = arg("auto", "torch.compile the objective: auto (on CUDA), on, off; a compile that fails "
                       "falls back to eager with a warning")
    dtype: str = arg("auto", "auto = bf16 autocast on CUDA, fp32 on CPU")
    # auto leaves a CPU run plain, the code one reads. There the fused loss would spare the page faults of the full
    # logits: measured, the tiny preset at V = 50k, 30 steps: +11 s of kernel time, +300 MB of peak memory and
    # 2-20 % more wall time plain (a loaded 2-core machine). Not needed, so not the default: --fast on asks for it.
    fast: str = arg("auto", "fast/'s twins (the same numbers, faster: FFT convolution with a hand-written backward, "
                    "the loss fused in chunks, Triton decoding kernels): auto (on CUDA), on, off. On a CPU, on spares "
                    "the full logits' page faults at a 50k vocabulary")
    seed: int = arg(1337, "seeds the data sampler (per rank) and the validation windows")
    data_stream: str = arg("", "names this run's stream of training windows: the sampler's seed is folded with it "
                           "and with the stage, so runs given different names (and a run's stages) read other windows")
    resume: bool = arg(False, "continue from OUT_DIR/ckpt exactly where it stopped")
    device: str = arg("auto", "auto, cpu, cuda or cuda:N (under torchrun each rank takes its LOCAL_RANK GPU)")

    def __post_init__(self):
        if self.max_tokens <= 0 and self.max_minutes <= 0:
            raise ValueError("no budget: set --max-tokens and/or --max-minutes (the run stops at whichever ends first)")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        for name in ("batch_size", "block_size", "grad_accum", "eval_interval", "log_interval", "ckpt_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_batches", "max_tokens", "max_minutes", "lr", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name):g}")
        if not 0 < self.decay_frac < 1:
            raise ValueError(f"--decay-frac must be between 0 and 1, got {self.decay_frac:g}")
        if self.branches:
            if self.schedule != "wsd":
                raise ValueError(f"--branches {self.branches}: branching needs --schedule wsd (a cosine run's "
                                 "lr at any moment depends on its whole budget)")
            if bool(self.max_tokens) == bool(self.max_minutes):
                raise ValueError(f"--branches {self.branches}: give exactly one budget, --max-minutes or "
                                 "--max-tokens, so the branch budgets have one unit")
            self.branch_budgets()  # checks the numbers

    def fast_on(self, device):
        """Whether the run puts fast/'s twins in (the training scripts install them; train() records it): on, or
        auto on a CUDA device, the rule of fast.wanted (eval.py's --fast), which tests/test_train.py holds equal."""
        return self.fast == "on" or (self.fast == "auto" and str(device).startswith("cuda"))

    def warmup_fraction(self):
        """The warmup as a fraction of the budget: warmup_frac, or with --branches warmup_frac of the smallest
        budget of the family, which every branch then shares (training/branches.branch_config)."""
        if not self.branches:
            return self.warmup_frac
        budget = self.max_tokens or self.max_minutes
        return self.warmup_frac * min(self.branch_budgets()[0], budget) / budget

    def branch_budgets(self):
        """--branches as numbers, each > 0 (that they are below the budget train() checks, per stage)."""
        try:
            budgets = sorted(float(b) for b in self.branches.split(",") if b.strip())
        except ValueError:
            raise ValueError(f"--branches {self.branches!r}: give comma-separated numbers, e.g. 1,2,5") from None
        if any(b <= 0 for b in budgets):
            raise ValueError(f"--branches {self.branches!r}: budgets must be > 0")
        return budgets


def add_train_args(parser, **defaults):
    """Every TrainConfig field as --flag-name; `defaults` overrides TrainConfig's defaults for one script."""
    unknown = set(defaults) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ValueError(f"add_train_args: {sorted(unknown)} are not TrainConfig fields")
    for f in fields(TrainConfig):
        flag, default = "--" + f.name.replace("_", "-"), defaults.get(f.name, f.default)
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        elif default is MISSING:
            parser.add_argument(flag, type=f.type, required=True, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=integer if f.type is int else f.type, default=default,
                                choices=CHOICES.get(f.name),
                                help=f.metadata["help"] + ("" if default is None else " (default: %(default)s)"))


def train_config_from_args(args):
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


@dataclass
class DistillConfig:
    """What distill.py does beyond the training loop's TrainConfig: one field per flag of the same name (see
    distill.py's --help for each); checked on construction, naming the flag at fault."""
    teacher: str
    revision: str = "main"
    layers: str = "progressive"      # the alignment: progressive | joint | independent | none
    hyena_layers: str = "all"        # which layers become Hyena: "all" or e.g. "0,2,4"
    init: str = "teacher"            # Hyena projections' init: teacher | random
    hyena_order: int = 2
    hyena_filter_lr: float = 0.0     # own lr for filter parameters (0: the run's)
    train: str = "mixer"             # alignment trains this: mixer | block
    e2e_train: str = "all"           # the end-to-end stage trains this: mixer | block | all
    align_compile: str = ""          # --compile of the alignment stages ("": the run's --compile)
    e2e_tokens: float = 0
    e2e_minutes: float = 0.0
    e2e_lr: float = 3e-4
    kd_temperature: float = 1.0
    ce_weight: float = 0.0
    modal_state: int = 0             # convert the teacher to this many modes per channel (0: no conversion)
    modal_tol: float = 0.0           # or choose the modes per layer by this relative filter error
    modal_max_state: int = 64
    modal_refine_steps: int = 0

    def __post_init__(self):
        for name, low in (("hyena_order", 1), ("e2e_tokens", 0), ("e2e_minutes", 0), ("hyena_filter_lr", 0),
                          ("modal_state", 0), ("modal_tol", 0), ("modal_max_state", 1), ("modal_refine_steps", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name):g}")
        if self.kd_temperature <= 0:
            raise ValueError(f"--kd-temperature must be > 0, got {self.kd_temperature:g}")
        if self.modal_state and self.modal_tol:
            raise ValueError("give --modal-state (d for every layer) or --modal-tol (d per layer), not both")
        if self.convert and self.hyena_layers != "all":
            raise ValueError("--hyena-layers does not apply with --modal-state/--modal-tol: every Hyena layer of the "
                             "teacher is converted")
        if self.layers == "none" and not (self.e2e or self.convert):
            raise ValueError("nothing to do: --layers none and no --e2e-tokens/--e2e-minutes")

    @property
    def convert(self):
        """Whether the teacher's filters become modal (--modal-state or --modal-tol)."""
        return bool(self.modal_state or self.modal_tol)

    @property
    def e2e(self):
        """Whether an end-to-end KL stage runs (a token or time budget for it)."""
        return bool(self.e2e_tokens or self.e2e_minutes)
