"""distill.py's settings and plan: DistillConfig, what the script does beyond the training loop (one field per
flag of the same name, checked on construction), and the training runs it makes of them, in order: one Stage per
progressive layer (or one joint / independent alignment), then the end-to-end stage (plan_stages).
"""
import dataclasses
from dataclasses import dataclass

from training import TrainConfig


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
