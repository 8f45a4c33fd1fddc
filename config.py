"""The model configuration: GPT-NeoX's own fields under HF's names (so config.json maps across) plus the
student's per-layer mixers and Hyena settings.

`Config.from_hf` reads a config.json the way transformers' GPT-NeoX does, or refuses it by key and file.
The keys transformers' GPT-NeoX reads, and what happens to each here:
- required: vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
  max_position_embeddings (transformers would take its defaults; a config missing one is broken).
- supported: layer_norm_eps, use_parallel_residual, attention_bias, initializer_range, rotary_pct,
  rotary_emb_base, rope_parameters / rope_scaling of rope_type default, linear or dynamic.
- refused unless harmless: hidden_act other than "gelu", tie_word_embeddings true, head_dim other than
  hidden_size / num_attention_heads, attention_dropout / hidden_dropout other than 0 (no dropout here),
  quantization_config, any other RoPE type or RoPE key, a RoPE factor below 1.
- ignored (nothing a causal LM computes reads them): classifier_dropout, use_cache, bos/eos/pad_token_id,
  is_decoder, dtype and the like.
Top-level rope_theta / partial_rotary_factor are refused: transformers' GPT-NeoX ignores them (it reads
rotary_emb_base / rotary_pct or rope_parameters), so honouring them would compute something else.
"""
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

MIXERS = ("attention", "hyena")
ROPE_TYPES = ("default", "linear", "dynamic")
REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings")
ROPE_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor", "factor")

# Model shapes by name (finetune.py --config, experiment.py --sweep): Pythia's exact sizes (the 70m is Config's
# defaults); the vocabulary comes from the data.
SHAPES = {
    "pythia-14m": dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512),
    "pythia-31m": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1024),
    "pythia-70m": {},
    "pythia-160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "pythia-410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                 max_position_embeddings=256),
}


@dataclass
class Config:
    vocab_size: int = 50304
    hidden_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    max_position_embeddings: int = 2048
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    rope_type: str = "default"     # "default" | "linear" | "dynamic" (NTK), as transformers' rope_parameters
    rope_factor: float = 1.0       # the scaling factor of linear / dynamic RoPE
    attention_bias: bool = True    # query_key_value and dense carry biases
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    mixers: list = field(default_factory=list)  # per layer "attention" | "hyena"; empty = all attention
    hyena_order: int = 2           # N: number of projections gated in; N-1 long convolutions
    hyena_filter_order: int = 64   # width of the implicit filter's FFN
    hyena_emb_dim: int = 33        # positional embedding size (1 + 2 * bands), odd
    hyena_l_max: int = 0           # 0 = max_position_embeddings
    hyena_filter_lr: float = 0.0   # own learning rate for filter parameters; 0 = the run's lr
    hyena_modal_state: list = field(default_factory=list)  # per layer: 0 = implicit filter, d > 0 = d modes

    def __post_init__(self):
        if not self.mixers:
            self.mixers = ["attention"] * self.num_hidden_layers
        self.mixers = list(self.mixers)
        if len(self.mixers) != self.num_hidden_layers or any(m not in MIXERS for m in self.mixers):
            raise ValueError(f"Config.mixers must list {self.num_hidden_layers} entries from {MIXERS}, "
                             f"got {self.mixers}")
        self.hyena_modal_state = list(self.hyena_modal_state) or [0] * self.num_hidden_layers
        if len(self.hyena_modal_state) != self.num_hidden_layers:
            raise ValueError(f"Config.hyena_modal_state (config.json hyena.modal_state) must list "
                             f"{self.num_hidden_layers} entries, one per layer, got {self.hyena_modal_state}")
        for i, (d, m) in enumerate(zip(self.hyena_modal_state, self.mixers)):
            if isinstance(d, bool) or not isinstance(d, int) or d < 0 or (d and m != "hyena"):
                raise ValueError(f"Config.hyena_modal_state[{i}] = {d!r}: each entry is an int, 0 (implicit "
                                 f"filter) or d > 0 (d modes) on a Hyena layer only; layer {i} is {m!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        number = isinstance(self.rope_factor, (int, float))
        if self.rope_type != "default" and not (number and self.rope_factor >= 1):
            raise ValueError(f"the RoPE factor must be a number >= 1 for {self.rope_type} RoPE, got {self.rope_factor!r}")
        head_dim = self.hidden_size // self.num_attention_heads
        rot = int(head_dim * self.rotary_pct)
        if rot % 2 and rot == head_dim:  # transformers rotates 2 * ceil(rot / 2) dims: one more than the head has
            raise ValueError(f"rotary_pct {self.rotary_pct} gives an odd rotary dimension {rot} equal to the head "
                             f"size {head_dim}; transformers fails on it too. Use an even rotary dimension")
        if self.rope_type == "dynamic" and rot <= 2:  # transformers divides by rot - 2
            raise ValueError(f"dynamic RoPE needs more than 2 rotary dimensions, rotary_pct {self.rotary_pct} "
                             f"gives {rot}")

    @property
    def l_max(self):
        return self.hyena_l_max or self.max_position_embeddings

    @property
    def filter_context(self):
        """The longest sequence the model can compute at all: l_max while any Hyena layer has a convolutional
        (implicit) filter, whose table ends there; None (any length) otherwise. RoPE is defined at every position."""
        conv = any(m == "hyena" and d == 0 for m, d in zip(self.mixers, self.hyena_modal_state))
        return self.l_max if conv else None

    @property
    def native_context(self):
        """The longest context the model is native to (None: any length): attention layers' max_position_embeddings
        (past it RoPE extrapolates), convolutional Hyena filters' l_max; modal filters have no limit."""
        limits = [self.max_position_embeddings] if "attention" in self.mixers else []
        limits += [self.filter_context] if self.filter_context is not None else []
        return min(limits) if limits else None

    def trained_at(self, context):
        """This config, recording that the model was trained on sequences of `context` tokens: attention layers'
        max_position_embeddings and modal-only students' l_max rise to it (never fall), so eval.py and sampling
        treat it as native there. Refused where the function would change or is undefined: dynamic RoPE (reads
        max_position_embeddings), convolutional Hyena filters past l_max (their table ends there)."""
        kw = asdict(self)
        if self.filter_context is not None and context > self.filter_context:
            raise ValueError(f"context {context} exceeds the convolutional Hyena filters' l_max {self.l_max}")
        if "attention" in self.mixers and context > self.max_position_embeddings:
            if self.rope_type == "dynamic":
                raise ValueError(f"context {context} exceeds max_position_embeddings {self.max_position_embeddings} "
                                 "under dynamic RoPE, whose frequencies depend on max_position_embeddings: recording "
                                 "the longer context would change the function")
            kw["max_position_embeddings"] = context
        if "hyena" in self.mixers and context > self.l_max:  # modal filters only (conv ones were refused above)
            kw["hyena_l_max"] = context
        return Config(**kw)

    @classmethod
    def from_file(cls, path):
        """Config.from_hf of a config.json file; a file that is not JSON is refused by name."""
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e}); a GPT-NeoX config.json is expected") from None
        return cls.from_hf(d, source=str(path))

    @classmethod
    def from_hf(cls, d, source="config.json"):
        """Read an HF GPT-NeoX config.json dict (old rotary_pct/rotary_emb_base keys or rope_parameters);
        `source` (the file) is named in every refusal."""
        def refuse(msg):
            raise ValueError(f"{source}: {msg}")

        if d.get("model_type", "gpt_neox") != "gpt_neox":
            refuse(f"model_type {d.get('model_type')!r}; only 'gpt_neox' (Pythia / GPT-NeoX) checkpoints are supported")
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            refuse(f"missing {', '.join(missing)}: a GPT-NeoX config.json must give {', '.join(REQUIRED_KEYS)}")
        if d.get("hidden_act", "gelu") != "gelu":
            refuse(f"hidden_act {d['hidden_act']!r} is not supported (GPT-NeoX uses 'gelu')")
        if d.get("tie_word_embeddings", False):
            refuse("tie_word_embeddings=true is not supported: GPT-NeoX unembeds with embed_out")
        if d.get("head_dim") not in (None, d["hidden_size"] // d["num_attention_heads"]):
            refuse(f"head_dim {d['head_dim']} is not hidden_size / num_attention_heads; not supported")
        for k in ("attention_dropout", "hidden_dropout"):
            if d.get(k, 0.0):
                refuse(f"{k} {d[k]} is not supported: this implementation has no dropout (it would change "
                       f"training only); set {k} to 0.0")
        if d.get("quantization_config"):
            refuse("quantization_config is not supported: load full-precision weights")
        for k, instead in (("rope_theta", "rotary_emb_base"), ("partial_rotary_factor", "rotary_pct")):
            if k in d:
                refuse(f"top-level {k} is ignored by transformers' GPT-NeoX; give it as {instead} or inside "
                       "rope_parameters")

        rope_key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"  # transformers' precedence
        if d.get("rope_scaling") and d.get("rope_parameters") and d["rope_scaling"] != d["rope_parameters"]:
            refuse("rope_scaling and rope_parameters disagree; keep one")
        rope = d.get(rope_key) or {}
        if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
            refuse(f"{rope_key} must be one dict of RoPE settings (per-layer-type RoPE is not GPT-NeoX's), "
                   f"got {rope!r}")
        unknown = sorted(set(rope) - set(ROPE_KEYS))
        if unknown:
            refuse(f"{rope_key} has keys {unknown} that this implementation does not read; it reads {list(ROPE_KEYS)}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            refuse(f"{rope_key}.rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        if (rope_type == "default") == ("factor" in rope):
            refuse(f"{rope_key}.factor is " + ("read only by linear / dynamic RoPE, not default" if "factor" in rope
                                                else f"required for {rope_type} RoPE"))

        def one_of(names, default):  # one value from several spellings; disagreeing spellings are refused
            given = {n: v for n, v in names if v is not None}
            if len(set(given.values())) > 1:
                refuse(f"{' and '.join(given)} disagree ({given}); keep one")
            return next(iter(given.values()), default)

        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and not f.name.startswith("hyena_")
              and f.name not in ("rope_type", "rope_factor")}
        kw["rotary_pct"] = one_of([("rotary_pct", d.get("rotary_pct")),
                                   (f"{rope_key}.partial_rotary_factor", rope.get("partial_rotary_factor"))], 0.25)
        kw["rotary_emb_base"] = one_of([("rotary_emb_base", d.get("rotary_emb_base")),
                                        (f"{rope_key}.rope_theta", rope.get("rope_theta"))], 1e4)
        kw["rope_type"], kw["rope_factor"] = rope_type, rope.get("factor", 1.0)
        kw.update({f"hyena_{k}": v for k, v in d.get("hyena", {}).items()})
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            refuse(str(e))

    def to_hf(self):
        skip = ("mixers", "rope_type", "rope_factor", "rotary_pct", "rotary_emb_base")
        d = {k: v for k, v in asdict(self).items() if not k.startswith("hyena_") and k not in skip}
        rope = {"rope_type": self.rope_type, "rope_theta": self.rotary_emb_base,
                "partial_rotary_factor": self.rotary_pct}
        if self.rope_type != "default":
            rope["factor"] = self.rope_factor
        d.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], hidden_act="gelu",
                 tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, rope_parameters=rope)
        if "hyena" in self.mixers:  # students only: a pure-attention config stays plain GPT-NeoX
            d["mixers"] = self.mixers
            d["hyena"] = {k[len("hyena_"):]: v for k, v in asdict(self).items() if k.startswith("hyena_")}
        return d
