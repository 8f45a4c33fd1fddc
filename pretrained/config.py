"""hyena.Config and HF's config.json, both ways, and the model shapes by name: an extra of hyena.py (which defines
the fields) for reading checkpoints from elsewhere.

`from_hf` reads a config.json the way transformers' GPT-NeoX does, or refuses it by key and file.
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
`to_hf` writes a config.json transformers reads (a student adds its mixers and a `hyena` block).
"""
import json
from dataclasses import asdict, fields
from pathlib import Path

from hyena import ROPE_TYPES, Config

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


def read_config(path):
    """from_hf of a config.json file; a file that is not JSON is refused by name."""
    try:
        d = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e}); a GPT-NeoX config.json is expected") from None
    return from_hf(d, source=str(path))


def from_hf(d, source="config.json"):
    """A Config from an HF GPT-NeoX config.json dict (old rotary_pct/rotary_emb_base keys or rope_parameters);
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

    kw = {f.name: d[f.name] for f in fields(Config) if f.name in d and not f.name.startswith("hyena_")
          and f.name not in ("rope_type", "rope_factor")}
    kw["rotary_pct"] = one_of([("rotary_pct", d.get("rotary_pct")),
                               (f"{rope_key}.partial_rotary_factor", rope.get("partial_rotary_factor"))], 0.25)
    kw["rotary_emb_base"] = one_of([("rotary_emb_base", d.get("rotary_emb_base")),
                                    (f"{rope_key}.rope_theta", rope.get("rope_theta"))], 1e4)
    kw["rope_type"], kw["rope_factor"] = rope_type, rope.get("factor", 1.0)
    kw.update({f"hyena_{k}": v for k, v in d.get("hyena", {}).items()})
    try:
        return Config(**kw)
    except (TypeError, ValueError) as e:
        refuse(str(e))


def to_hf(cfg):
    """config.json as transformers' GPT-NeoX reads it; a student adds its mixers and a `hyena` block."""
    skip = ("mixers", "rope_type", "rope_factor", "rotary_pct", "rotary_emb_base")
    d = {k: v for k, v in asdict(cfg).items() if not k.startswith("hyena_") and k not in skip}
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rotary_emb_base, "partial_rotary_factor": cfg.rotary_pct}
    if cfg.rope_type != "default":
        rope["factor"] = cfg.rope_factor
    d.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], hidden_act="gelu",
             tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, rope_parameters=rope)
    if "hyena" in cfg.mixers:  # students only: a pure-attention config stays plain GPT-NeoX
        d["mixers"] = cfg.mixers
        d["hyena"] = {k[len("hyena_"):]: v for k, v in asdict(cfg).items() if k.startswith("hyena_")}
    return d


def trained_at(cfg, context):
    """cfg, recording that the model was trained on sequences of `context` tokens: attention layers'
    max_position_embeddings and modal-only students' l_max rise to it (never fall), so eval.py and sampling
    treat it as native there. Refused where the function would change or is undefined: dynamic RoPE (reads
    max_position_embeddings), convolutional Hyena filters past l_max (their table ends there)."""
    kw = asdict(cfg)
    if cfg.filter_context is not None and context > cfg.filter_context:
        raise ValueError(f"context {context} exceeds the convolutional Hyena filters' l_max {cfg.l_max}")
    if "attention" in cfg.mixers and context > cfg.max_position_embeddings:
        if cfg.rope_type == "dynamic":
            raise ValueError(f"context {context} exceeds max_position_embeddings {cfg.max_position_embeddings} "
                             "under dynamic RoPE, whose frequencies depend on max_position_embeddings: recording "
                             "the longer context would change the function")
        kw["max_position_embeddings"] = context
    if "hyena" in cfg.mixers and context > cfg.l_max:  # modal filters only (conv ones were refused above)
        kw["hyena_l_max"] = context
    return Config(**kw)
