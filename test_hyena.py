"""Behaviour of the model file, hyena.py: GPT-NeoX parity with transformers (attention, RoPE, the decoding cache),
the Hyena operator in a model, students, generation, and the file standing alone."""
import json
import os

import pytest
import torch

from pretrained.config import from_hf, to_hf
from hyena import Config, GPTNeoX, HyenaOperator, make_student, new_cache, sample

TINY = dict(hidden_size=64, num_attention_heads=4, intermediate_size=160, num_hidden_layers=3, vocab_size=211,
            max_position_embeddings=64)


def randomized(cfg, seed=0):
    """A model whose every tensor (LayerNorms and biases too) is random, so parity tests cover them all."""
    torch.manual_seed(seed)
    m = GPTNeoX(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


# ----------------------------------------------------------------------------- GPT-NeoX = transformers

PARITY_CONFIGS = {
    "pythia-70m": Config(),
    "rotary_pct=1.0": Config(**{**TINY, "rotary_pct": 1.0}),
    "sequential residual": Config(**{**TINY, "use_parallel_residual": False}),
    "2 heads, intermediate != 4*hidden": Config(**{**TINY, "num_attention_heads": 2}),
    "rope base 500": Config(**{**TINY, "rotary_emb_base": 500.0, "rotary_pct": 0.5}),
    "odd rotary dims (3 of 12)": Config(**{**TINY, "hidden_size": 48}),
    "linear rope": Config(**{**TINY, "rope_type": "linear", "rope_factor": 2.5}),
    "dynamic rope past max_pos": Config(**{**TINY, "rope_type": "dynamic", "rope_factor": 2.0, "rotary_pct": 0.5,
                                           "max_position_embeddings": 32}),  # the test's 48 tokens exceed 32
    "attention_bias false": Config(**{**TINY, "attention_bias": False}),
}


@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_logits_match_transformers(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = PARITY_CONFIGS[name]
    ours = randomized(cfg)
    ours.save_pretrained(tmp_path)
    hf, info = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # every tensor we wrote is one transformers expects, and vice versa
    assert hf.config.rope_parameters["rope_type"] == cfg.rope_type  # it runs the scaling we mean
    assert hf.config.rope_parameters.get("factor", 1.0) == cfg.rope_factor
    assert hf.config.attention_bias == cfg.attention_bias
    idx = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        delta = (GPTNeoX.from_pretrained(tmp_path)(idx)[0] - hf.eval()(idx).logits).abs().max().item()
    print(f"max |dlogit| {name}: {delta:.2e}")
    assert delta <= 1e-4


ROPE_SCALED = {name: PARITY_CONFIGS[name] for name in ("odd rotary dims (3 of 12)", "linear rope",
                                                       "dynamic rope past max_pos")}


@pytest.mark.parametrize("name", ROPE_SCALED)
def test_cached_decoding_matches_transformers_generate(name, tmp_path):
    """Every decoding step's logits equal transformers' generate: odd rotary dims and scaled RoPE in the KV
    cache (dynamic NTK: the prompt fits in max_position_embeddings, the generation runs past it, and each
    step's frequencies follow the growing length while cached keys keep theirs)."""
    transformers = pytest.importorskip("transformers")
    cfg = ROPE_SCALED[name]
    ours = randomized(cfg)
    ours.save_pretrained(tmp_path)
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path).eval()
    assert (hf.config.rope_parameters["rope_type"], hf.config.rope_parameters.get("factor", 1.0)) == \
        (cfg.rope_type, cfg.rope_factor)
    T, new = 20, 24
    idx = torch.randint(0, cfg.vocab_size, (2, T))
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new, do_sample=False,
                      output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    seq, theirs = out.sequences, torch.stack(out.logits, 1)  # (2, T+new), (2, new, V)
    cache = new_cache(ours, T + new)
    with torch.no_grad():
        steps = [ours(seq[:, :T], cache=cache)[0]]
        steps += [ours(seq[:, i:i + 1], cache=cache)[0] for i in range(T, T + new - 1)]
    delta = (torch.cat(steps, 1) - theirs).abs().max().item()
    print(f"max |dlogit| decoding {name}: {delta:.2e}")
    assert delta <= 1e-4
    assert torch.equal(ours.generate(idx, new, temperature=0, extrapolate=True), seq)  # dynamic: past max_pos


@pytest.mark.parametrize("rotary_pct", [0.0, 0.1, 0.45, 0.75], ids=["0 dims", "1 dim", "5 dims", "9 dims"])
def test_every_rotary_width_matches_transformers_in_forward_and_decoding(rotary_pct, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = Config(**{**TINY, "hidden_size": 48, "num_hidden_layers": 2, "rotary_pct": rotary_pct})  # head_dim 12
    ours = randomized(cfg)
    ours.save_pretrained(tmp_path)
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 24))
    with torch.no_grad():
        assert torch.allclose(ours(idx)[0], hf(idx).logits, atol=1e-4)
    out = hf.generate(idx[:, :8], attention_mask=torch.ones_like(idx[:, :8]), max_new_tokens=8, do_sample=False,
                      pad_token_id=0)
    assert torch.equal(ours.generate(idx[:, :8], 8, temperature=0), out)


def test_scaled_rope_changes_the_logits():
    """The parity configs' scaling is not a no-op at the tested lengths (so their parity tests can fail)."""
    idx = torch.randint(0, 211, (1, 48))
    for name in ("linear rope", "dynamic rope past max_pos"):
        cfg = PARITY_CONFIGS[name]
        plain = Config(**{**cfg.__dict__, "rope_type": "default", "rope_factor": 1.0})
        with torch.no_grad():
            a, b = randomized(cfg)(idx)[0], randomized(plain)(idx)[0]
        assert (a - b).abs().max() > 1e-3, name


@pytest.mark.parametrize("rope_type", ["linear", "dynamic"])
def test_loads_transformers_scaled_rope_checkpoints(rope_type, tmp_path):
    """A checkpoint transformers wrote with the old `rope_scaling: {type, factor}` spelling computes its logits."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPTNeoXConfig(hidden_size=48, num_attention_heads=4, intermediate_size=96,
                                        num_hidden_layers=2, vocab_size=97, max_position_embeddings=24, rotary_pct=0.5,
                                        rope_scaling={"type": rope_type, "factor": 3.0})
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(hf_cfg).eval().save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**{k: v for k, v in d.items() if k != "rope_parameters"},
                                                      "rope_scaling": {"type": rope_type, "factor": 3.0}}))
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path).eval()
    ours = GPTNeoX.from_pretrained(tmp_path)
    assert (ours.config.rope_type, ours.config.rope_factor) == (rope_type, 3.0)
    idx = torch.randint(0, 97, (1, 40))  # past max_position_embeddings, where dynamic acts
    with torch.no_grad():
        assert torch.allclose(ours(idx)[0], hf(idx).logits, atol=1e-4)


def test_attention_bias_false_round_trips_without_bias_tensors(tmp_path):
    from pretrained.safetensors import read_safetensors
    m = randomized(Config(**{**TINY, "attention_bias": False}))
    m.save_pretrained(tmp_path)
    assert not any(k.endswith(("attention.query_key_value.bias", "attention.dense.bias"))
                   for k in read_safetensors(tmp_path / "model.safetensors"))
    assert json.loads((tmp_path / "config.json").read_text())["attention_bias"] is False
    again = GPTNeoX.from_pretrained(tmp_path)
    idx = torch.randint(0, 211, (2, 20))
    with torch.no_grad():
        assert again.config == m.config and torch.equal(again(idx)[0], m(idx)[0])
        student = make_student(again)  # the Hyena projections start from bias-free attention
        assert torch.equal(student.gpt_neox.layers[0].hyena.in_proj.bias, torch.zeros(3 * 64))


REFUSED_CONFIGS = {  # config.json changes -> what the refusal must name
    "yarn": ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, r"rope_parameters.rope_type 'yarn' .*"
             r"supported: default, linear, dynamic"),
    "rope_scaling longrope": ({"rope_parameters": None, "rope_scaling": {"type": "longrope", "factor": 2.0}},
                              r"rope_scaling.rope_type 'longrope'"),
    "unread rope key": ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "beta_fast": 32}}, "beta_fast"),
    "linear without factor": ({"rope_parameters": {"rope_type": "linear"}}, "factor is required for linear"),
    "factor below 1": ({"rope_parameters": {"rope_type": "dynamic", "factor": 0.5}}, "factor must be a number >= 1"),
    "per-layer rope": ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "per-layer-type"),
    "top-level rope_theta": ({"rope_theta": 500.0}, "top-level rope_theta is ignored by transformers"),
    "disagreeing rotary_pct": ({"rotary_pct": 0.5, "rope_parameters": {"rope_type": "default",
                                                                        "partial_rotary_factor": 0.25}},
                               "rotary_pct and rope_parameters.partial_rotary_factor disagree"),
    "dropout": ({"hidden_dropout": 0.1}, "hidden_dropout 0.1 is not supported"),
    "head_dim": ({"head_dim": 32}, "head_dim 32"),
    "quantized": ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config"),
    "odd rotary = head": ({"hidden_size": 12, "num_attention_heads": 4,
                           "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 1.0}},
                          "odd rotary dimension 3"),
}


@pytest.mark.parametrize("name", REFUSED_CONFIGS)
def test_config_settings_that_would_change_the_computation_are_refused_by_name(name, tmp_path):
    m = GPTNeoX(Config(**TINY))
    m.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    change, message = REFUSED_CONFIGS[name]
    (tmp_path / "config.json").write_text(json.dumps({**d, **change}))
    with pytest.raises(ValueError, match=message) as e:
        GPTNeoX.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_config_missing_an_architecture_key_is_refused_by_key_and_file(tmp_path):
    m = GPTNeoX(Config(**TINY))
    m.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    for gone in (["hidden_size"], ["vocab_size", "num_hidden_layers"], ["intermediate_size"]):
        (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in d.items() if k not in gone}))
        with pytest.raises(ValueError, match=f"config.json: missing {', '.join(gone)}") as e:
            GPTNeoX.from_pretrained(tmp_path)
        assert str(tmp_path / "config.json") in str(e.value)


def test_loads_transformers_checkpoint_and_config_forms(tmp_path):
    """A checkpoint written by transformers (lm_head name variants, inv_freq buffers, new config keys) loads."""
    transformers = pytest.importorskip("transformers")
    cfg = Config(**{**TINY, "rotary_pct": 0.5})
    hf_cfg = transformers.GPTNeoXConfig(**{k: v for k, v in to_hf(cfg).items() if k != "architectures"})
    hf = transformers.GPTNeoXForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert from_hf(d) == cfg
    legacy = {k: v for k, v in d.items() if k != "rope_parameters"} | {"rotary_pct": 0.5, "rotary_emb_base": 1e4}
    assert from_hf(legacy) == cfg
    idx = torch.randint(0, cfg.vocab_size, (1, 40))
    with torch.no_grad():
        assert torch.allclose(GPTNeoX.from_pretrained(tmp_path)(idx)[0], hf(idx).logits, atol=1e-4)


def test_from_pretrained_rejects_bad_checkpoints(tmp_path):
    from pretrained.safetensors import read_safetensors, write_safetensors
    m = GPTNeoX(Config(**TINY))
    m.save_pretrained(tmp_path)
    state = read_safetensors(tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())

    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        GPTNeoX.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    write_safetensors(tmp_path / "model.safetensors", {**state, "gpt_neox.extra.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="unexpected key 'gpt_neox.extra.weight'"):
        GPTNeoX.from_pretrained(tmp_path)
    write_safetensors(tmp_path / "model.safetensors", {**state, "embed_out.weight": torch.zeros(3, 64)})
    with pytest.raises(ValueError, match=r"'embed_out.weight' has shape \[3, 64\]"):
        GPTNeoX.from_pretrained(tmp_path)
    write_safetensors(tmp_path / "model.safetensors", {k: v for k, v in state.items() if "layers.2.mlp" not in k})
    with pytest.raises(ValueError, match="lacks 4 tensors"):
        GPTNeoX.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        GPTNeoX.from_pretrained(tmp_path)


def test_sharded_checkpoint_and_lm_head_name(tmp_path):
    from pretrained.safetensors import write_safetensors
    m = randomized(Config(**TINY))
    state = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in m.state_dict().items()}
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for fname, ks in shards.items():
        write_safetensors(tmp_path / fname, {k: state[k] for k in ks})
    weight_map = {k: f for f, ks in shards.items() for k in ks}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(to_hf(m.config)))
    idx = torch.randint(0, 211, (1, 16))
    with torch.no_grad():
        assert torch.equal(GPTNeoX.from_pretrained(tmp_path)(idx)[0], m(idx)[0])


# ----------------------------------------------------------------------------- the Hyena operator in a model

# (the operator's own behaviour: tests/test_hyena_operator.py)

def test_hyena_parameter_count_near_attention():
    cfg = Config()
    attn = sum(p.numel() for p in GPTNeoX(Config(**{**TINY, "hidden_size": 512, "num_attention_heads": 8,
                                                     "num_hidden_layers": 1})).gpt_neox.layers[0].attention.parameters())
    op = HyenaOperator(cfg.hidden_size, cfg.l_max)
    table = op.filter_fn.pos_emb.z.numel()  # safari's trainable positional table (l_max x emb_dim), apart
    hy = sum(p.numel() for p in op.parameters()) - table
    print(f"d=512: attention {attn:,} parameters, Hyena order 2 {hy:,} ({hy / attn - 1:+.1%}) + table {table:,}")
    assert abs(hy / attn - 1) <= 0.10


# ----------------------------------------------------------------------------- students

def test_make_student_copies_everything_but_the_mixer():
    teacher = randomized(Config(**TINY))
    student = make_student(teacher, layers=[0, 2])
    assert student.config.mixers == ["hyena", "attention", "hyena"]
    ts = teacher.state_dict()
    for k, v in student.state_dict().items():
        if ".hyena." not in k:
            assert torch.equal(v, ts[k]), k
    hy, att = student.gpt_neox.layers[0].hyena, teacher.gpt_neox.layers[0].attention
    assert torch.equal(hy.out_proj.weight, att.dense.weight)
    q_head0 = att.query_key_value.weight[:16]  # per-head interleaved: head 0's q rows come first
    assert torch.equal(hy.in_proj.weight[:16], q_head0)
    idx = torch.randint(0, 211, (2, 20))
    with torch.no_grad():
        assert torch.equal(make_student(teacher, layers=[])(idx)[0], teacher(idx)[0])
        r = make_student(teacher, init="random")
    assert not torch.equal(r.gpt_neox.layers[0].hyena.out_proj.weight, att.dense.weight)
    with pytest.raises(ValueError, match="out of range"):
        make_student(teacher, layers=[3])


def test_make_student_keeps_a_hybrid_teachers_trained_hyena_layers():
    hybrid = randomized(Config(**TINY))
    hybrid = make_student(hybrid, layers=[0])
    with torch.no_grad():
        hybrid.gpt_neox.layers[0].hyena.out_proj.weight.add_(1.0)  # "trained"
    student = make_student(hybrid)  # the rest becomes Hyena too
    assert student.config.mixers == ["hyena"] * 3
    assert torch.equal(student.gpt_neox.layers[0].hyena.out_proj.weight, hybrid.gpt_neox.layers[0].hyena.out_proj.weight)


def test_casting_to_bf16_keeps_the_filter_fp32_and_fp64_follows():
    """model.to(bf16) must not round the implicit filter's time grid (bf16 keeps ~640 of 2048 steps distinct):
    the filter stays fp32, bit for bit. .double() makes it fp64 end to end."""
    op = HyenaOperator(16, l_max=2048)
    k32 = op.filter_fn(2048)
    op.to(torch.bfloat16)
    assert op.in_proj.weight.dtype == torch.bfloat16 and op.filter_fn.pos_emb.z.dtype == torch.float32
    assert torch.equal(op.filter_fn(2048), k32)
    op.double()
    assert all(t.dtype == torch.float64 for t in op.filter_fn.state_dict().values())
    k64 = op.filter_fn(2048)
    assert k64.dtype == torch.float64 and torch.allclose(k64, k32.double(), rtol=1e-5, atol=1e-6)
    student = make_student(randomized(Config(**TINY))).to(torch.bfloat16).eval()  # a bf16 model still decodes
    assert student.generate(torch.randint(0, 211, (1, 5)), 4, temperature=0).shape == (1, 9)


def test_checkpoints_from_the_old_filter_convention_are_refused_with_the_reason(tmp_path):
    from pretrained.safetensors import read_safetensors, write_safetensors
    make_student(randomized(Config(**TINY))).save_pretrained(tmp_path)
    state = read_safetensors(tmp_path / "model.safetensors")
    old = {k: v for k, v in state.items() if not k.endswith(("pos_emb.z", "pos_emb.t", "modulation.deltas"))}
    write_safetensors(tmp_path / "model.safetensors", old)
    with pytest.raises(ValueError, match="written before the filter followed safari's convention"):
        GPTNeoX.from_pretrained(tmp_path)
    key = "gpt_neox.layers.1.hyena.filter_fn.implicit_filter.3.freq"  # separate Sin frequencies (old convention)
    write_safetensors(tmp_path / "model.safetensors", {**state, key: state[key] + 1})
    with pytest.raises(ValueError, match="shares one Sin"):
        GPTNeoX.from_pretrained(tmp_path)


@pytest.mark.parametrize("mixers", [[0, 1, 2], [1]], ids=["student", "hybrid"])
def test_student_save_load_round_trip(mixers, tmp_path):
    student = make_student(randomized(Config(**{**TINY, "hyena_order": 3})), layers=mixers)
    student.save_pretrained(tmp_path)
    again = GPTNeoX.from_pretrained(tmp_path)
    assert again.config == student.config
    idx = torch.randint(0, 211, (2, 30))
    with torch.no_grad():
        assert torch.equal(again(idx)[0], student(idx)[0])
    assert "mixers" in json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("layers", [None, [], [0, 2]], ids=["hyena", "attention", "hybrid"])
@pytest.mark.parametrize("order", [2, 3])
def test_cached_generation_equals_full_forward(layers, order):
    teacher = randomized(Config(**{**TINY, "hyena_order": order}))
    model = make_student(teacher, layers=layers).eval()
    prompt = torch.randint(0, 211, (2, 7))
    out = model.generate(prompt, max_new_tokens=25, temperature=0)
    assert out.shape == (2, 32) and torch.equal(out[:, :7], prompt)
    cache = new_cache(model, 32)
    with torch.no_grad():  # a cached forward returns the last position's logits only
        steps = [model(out[:, :7], cache=cache)[0]] + [model(out[:, i:i + 1], cache=cache)[0] for i in range(7, 32)]
        full = model(out)[0]
    err = (torch.cat(steps, dim=1) - full[:, 6:]).abs().max().item()
    assert err <= 1e-4, err
    assert torch.equal(full[:, 6:-1].argmax(-1), out[:, 7:])  # greedy tokens are the full forward's argmax


def test_sampling_respects_top_k():
    model = make_student(randomized(Config(**TINY)), layers=[1]).eval()
    torch.manual_seed(0)
    prompt = torch.randint(0, 211, (1, 4))
    logits = model(prompt)[0][0, -1]
    out = model.generate(prompt, max_new_tokens=1, temperature=1.0, top_k=1)
    assert out[0, -1] == logits.argmax()


def test_generate_asks_stop_after_every_new_token_and_zero_new_tokens_draw_nothing():
    """stop sees the sequence after each new token, the last included, and ends it where it says; asking for no
    new tokens returns the prompt and leaves the generator alone."""
    model = make_student(randomized(Config(**TINY)), layers=[1]).eval()
    prompt = torch.randint(0, 211, (2, 5))
    seen = []
    out = model.generate(prompt, 3, temperature=0, stop=lambda seq: seen.append(seq.shape[1]) or False)
    assert seen == [6, 7, 8] and out.shape == (2, 8)
    seen.clear()
    assert model.generate(prompt, 3, temperature=0, stop=lambda seq: seen.append(seq.shape[1]) or
                          seq.shape[1] == 6).shape == (2, 6) and seen == [6]
    torch.manual_seed(1)
    state = torch.get_rng_state()
    assert torch.equal(model.generate(prompt, 0), prompt) and torch.equal(torch.get_rng_state(), state)


def test_sample_draws_what_multinomial_draws_without_reading_the_device_back(no_host_reads):
    """hyena.sample is torch.multinomial's own draw for one sample (probs / Exp(1) noise, argmax), minus its host
    check: from the same generator state, the same tokens, with top_k and temperature applied first."""
    logits = torch.randn(64, 300) * 3
    for temperature, top_k in ((1.0, None), (0.7, 20)):
        scaled = logits / temperature
        if top_k:
            scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[:, -1:], -float("inf"))
        torch.manual_seed(3)
        want = torch.multinomial(scaled.softmax(-1), 1)
        torch.manual_seed(3)
        with no_host_reads():
            got = sample(logits, temperature, top_k)
        assert got.shape == (64, 1) and torch.equal(got, want)
    assert torch.equal(sample(logits, 0), logits.argmax(-1, keepdim=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast check needs CUDA")
def test_bf16_autocast_forward_close_to_fp32():
    model = make_student(randomized(Config()), layers=[0, 2, 4]).cuda()
    idx = torch.randint(0, 50304, (2, 512), device="cuda")
    with torch.no_grad():
        ref = model(idx)[0]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(idx)[0].float()
    assert torch.isfinite(low).all()
    assert ((low - ref).norm() / ref.norm()).item() <= 2e-2


@pytest.mark.parametrize("layers", [None, []], ids=["hyena", "attention"])
def test_decoding_steps_never_read_the_device_back_so_a_cuda_graph_can_capture_them(layers, no_host_reads):
    """The position is one device tensor, shared by all layers and advanced in place: a step has fixed shapes
    and calls no .item() (what a CUDA graph cannot capture: `graphed_step` replays one)."""
    torch.manual_seed(0)
    model = make_student(randomized(Config(**TINY)), layers=layers).eval()
    idx = torch.randint(TINY["vocab_size"], (2, 12))
    cache = new_cache(model, 12)
    pos = cache.pos
    with torch.no_grad():
        model(idx[:, :8], cache=cache)
        assert cache.pos is pos and pos.item() == 8  # the same tensor, moved on by the prefill
        with no_host_reads():
            steps = [model(idx[:, i:i + 1], cache=cache)[0] for i in range(8, 12)]
        assert pos.item() == 12
        full = model(idx)[0]
    for i, logits in zip(range(8, 12), steps):
        assert torch.allclose(logits[:, 0], full[:, i], atol=1e-4)


def test_graphed_step_refuses_a_cache_without_room_for_its_warm_up():
    from fast.step import graphed_step
    model = make_student(randomized(Config(**TINY)), layers=[0])
    cache = new_cache(model, 12)
    cache.advance(11)
    with pytest.raises(ValueError, match="make max_len at least pos \\+ 2"):
        graphed_step(model, cache, batch=1)  # raised before anything touches a GPU


def test_generating_past_max_position_embeddings_is_refused_unless_asked():
    """Attention past the longest context it trained at runs RoPE where it never learned: generate refuses by name
    and says what to do; extrapolate=True runs it. Modal and Hyena layers have their own limits (l_max)."""
    model = make_student(randomized(Config(**TINY)), layers=[1]).eval()  # attention in layers 0 and 2
    prompt = torch.randint(0, 211, (1, 60))
    assert model.generate(prompt, 4, temperature=0).shape == (1, 64)  # exactly max_position_embeddings: native
    with pytest.raises(ValueError, match=r"60 prompt tokens \+ 5 new = 65 positions, past max_position_embeddings "
                                         r"64.*pass extrapolate=True"):
        model.generate(prompt, 5, temperature=0)
    student = make_student(randomized(Config(**{**TINY, "hyena_l_max": 80})))  # no attention left: l_max bounds it
    assert student.generate(prompt, 20, temperature=0).shape == (1, 80)
    teacher = randomized(Config(**TINY))
    assert teacher.generate(prompt, 10, temperature=0, extrapolate=True).shape == (1, 70)


STANDALONE = """
import sys, torch
import hyena
assert hyena.__file__.startswith(sys.argv[1]), hyena.__file__
torch.manual_seed(0)
cfg = hyena.Config(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=64)
teacher = hyena.GPTNeoX(cfg)
idx = torch.randint(0, 97, (2, 24))
for order in (2, 3):
    student = hyena.make_student(teacher, order=order)
    for m in (teacher, student):
        logits, loss = m(idx[:, :-1], idx[:, 1:])
        loss.backward()
        assert logits.shape == (2, 23, 97) and loss.item() > 0
        out = m.generate(idx[:, :5], 8, temperature=0)
        assert out.shape == (2, 13) and torch.equal(m(out)[0][:, 4:-1].argmax(-1), out[:, 5:])
        assert m.generate(idx[:, :5], 8, temperature=0.8, top_k=10).shape == (2, 13)
print(" ".join(sorted(sys.modules)))
"""


def test_hyena_py_alone_builds_a_teacher_and_its_student_computes_the_loss_and_generates(tmp_path):
    """Copied into an empty folder, with no project module reachable, hyena.py is the whole model."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent
    shutil.copy(root / "hyena.py", tmp_path / "hyena.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-s", "-c", STANDALONE, str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ours = {p.stem for p in root.glob("*.py")} | {p.name for p in root.iterdir() if (p / "__init__.py").is_file()}
    loaded = {name.split(".")[0] for name in run.stdout.split()}
    assert loaded & ours == {"hyena"}, loaded & ours
