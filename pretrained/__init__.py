"""Checkpoints in Hugging Face's format, read and written with checks: what GPTNeoX.from_pretrained and
save_pretrained import when called (hyena.py itself imports none of it).

  config.py       hyena.Config <-> HF's config.json (read_config, from_hf with its refusals, to_hf), trained_at,
                  the model shapes by name (SHAPES)
  safetensors.py  safetensors read and written by hand (nothing read is ever unpickled)
  weights.py      a checkpoint's weights, every tensor checked by name and shape (load_weights); what a --ckpt
                  names (resolve_ckpt) and its tokenizer; the --dtype table
"""
