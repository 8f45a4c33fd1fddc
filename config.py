"""The model configuration: GPT-NeoX's own fields under HF's names (so config.json maps across) plus the
student's per-layer mixers and Hyena settings. Re-exported by hyena.py."""
from dataclasses import asdict, dataclass, field, fields

MIXERS = ("attention", "hyena")


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

    @property
    def l_max(self):
        return self.hyena_l_max or self.max_position_embeddings

    @classmethod
    def from_hf(cls, d):
        """Read an HF GPT-NeoX config.json dict (old rotary_pct/rotary_emb_base keys or rope_parameters)."""
        if d.get("model_type", "gpt_neox") != "gpt_neox":
            raise ValueError(f"config.json has model_type {d.get('model_type')!r}; only 'gpt_neox' "
                             "(Pythia / GPT-NeoX) checkpoints are supported")
        if d.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported (GPT-NeoX uses 'gelu')")
        if d.get("tie_word_embeddings", False):
            raise ValueError("tie_word_embeddings=true is not supported: GPT-NeoX unembeds with embed_out")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and not f.name.startswith("hyena_")}
        kw["rotary_pct"] = d.get("rotary_pct", d.get("partial_rotary_factor",
                                 rope.get("partial_rotary_factor", 0.25)))
        kw["rotary_emb_base"] = d.get("rotary_emb_base", d.get("rope_theta", rope.get("rope_theta", 1e4)))
        kw.update({f"hyena_{k}": v for k, v in d.get("hyena", {}).items()})
        return cls(**kw)

    def to_hf(self):
        d = {k: v for k, v in asdict(self).items() if not k.startswith("hyena_") and k != "mixers"}
        d.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], hidden_act="gelu",
                 tie_word_embeddings=False, attention_bias=True, bos_token_id=0, eos_token_id=0,
                 rope_parameters={"rope_type": "default", "rope_theta": self.rotary_emb_base,
                                  "partial_rotary_factor": self.rotary_pct})
        if "hyena" in self.mixers:  # students only: a pure-attention config stays plain GPT-NeoX
            d["mixers"] = self.mixers
            d["hyena"] = {k[len("hyena_"):]: v for k, v in asdict(self).items() if k.startswith("hyena_")}
        return d
