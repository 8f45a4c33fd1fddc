"""Long context (issue 15): fine-tuning past l_max for modal students only, the passkey probe, the speed probe."""
import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune
from config import Config
from experiment import longctx
from hyena import GPTNeoX, to_modal
from tokenizer import load_tokenizer

VOCAB = 64
TOKENIZER = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tokenizer" / "20B_tokenizer.json"


def tiny(mixer, l_max, vocab=VOCAB, **kw):
    torch.manual_seed(0)
    return GPTNeoX(Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          vocab_size=vocab, max_position_embeddings=l_max, mixers=[mixer] * 2, **kw))


@pytest.fixture
def data_dir(tmp_path):
    """A fixed cycle through 48 token ids, as test_train.py's: long enough for 128-token blocks."""
    cycle = np.random.default_rng(0).permutation(VOCAB)[:48]
    folder = tmp_path / "cycle"
    folder.mkdir()
    splits = {}
    for split, repeats in (("train", 100), ("val", 10)):
        np.tile(cycle, repeats).astype(np.uint16).tofile(folder / f"{split}.bin")
        splits[split] = {"tokens": 48 * repeats, "documents": 1}
    (folder / "meta.json").write_text(json.dumps({
        "source": "test", "command": "python prepare.py text cycle.txt --name cycle", "tokenizer": "none",
        "tokenizer_sha256": "0" * 64, "vocab_size": VOCAB, "eot_token": 0, "dtype": "uint16", "splits": splits}))
    return folder


def finetune_args(init, out, data_dir, block):
    return ["--init", str(init), "--data", str(data_dir), "--out-dir", str(out), "--block-size", str(block),
            "--batch-size", "2", "--max-tokens", str(2 * 2 * block), "--eval-batches", "1", "--device", "cpu"]


def test_modal_student_fine_tunes_past_l_max_and_records_the_context(tmp_path, data_dir):
    conv = tiny("hyena", 32)
    modal = to_modal(conv, state_size=2)
    conv.save_pretrained(tmp_path / "conv")
    modal.save_pretrained(tmp_path / "modal")
    assert (conv.config.native_context, modal.config.native_context) == (32, None)  # modal: any length

    finetune.main(finetune_args(tmp_path / "modal", tmp_path / "long", data_dir, 128))  # 4x its l_max
    long = GPTNeoX.from_pretrained(tmp_path / "long" / "final")
    assert long.config.l_max == 128 and long.config.hyena_modal_state == [2, 2]  # trained at 128: recorded
    assert json.loads((tmp_path / "long" / "summary.json").read_text())["tokens"] == 2 * 2 * 128

    with pytest.raises(ValueError, match=r"--block-size 128 exceeds the convolutional Hyena filters' l_max 32 .*"
                                         r"--block-size 32 or less.*distill.py --teacher .*--modal-state"):
        finetune.main(finetune_args(tmp_path / "conv", tmp_path / "refused", data_dir, 128))


def test_attention_trains_past_max_position_embeddings_unless_rope_is_dynamic(tmp_path, data_dir, capsys):
    tiny("attention", 32).save_pretrained(tmp_path / "att")
    finetune.main(finetune_args(tmp_path / "att", tmp_path / "long", data_dir, 64))
    assert "attention layers train past max_position_embeddings 32" in capsys.readouterr().err
    assert Config.from_file(tmp_path / "long" / "final" / "config.json").max_position_embeddings == 64
    tiny("attention", 32, rope_type="dynamic", rope_factor=2.0, rotary_pct=0.5).save_pretrained(tmp_path / "dyn")
    with pytest.raises(ValueError, match=r"--block-size 64 exceeds max_position_embeddings 32 .*dynamic RoPE"):
        finetune.main(finetune_args(tmp_path / "dyn", tmp_path / "dyn-long", data_dir, 64))


def test_native_context_per_mixer():
    cfg = Config(num_hidden_layers=3, mixers=["attention", "hyena", "hyena"], hyena_l_max=4096,
                 hyena_modal_state=[0, 4, 4])
    assert (cfg.native_context, cfg.filter_context) == (2048, None)  # attention bounds it; modal filters do not
    assert Config(**{**asdict(cfg), "hyena_modal_state": [0, 0, 4]}).native_context == 2048
    assert Config(**{**asdict(cfg), "mixers": ["hyena"] * 3, "hyena_modal_state": [0, 4, 4]}).native_context == 4096


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer(str(TOKENIZER))


@pytest.mark.parametrize("length,depth", [(300, 0.0), (301, 0.37), (1000, 1.0)])
def test_passkey_prompt_has_the_asked_length_and_the_key_once_at_the_asked_depth(enc, length, depth):
    ids, at = longctx.passkey_prompt(enc, length, 71432, depth)
    assert len(ids) == length
    needle = enc.encode(longctx.NEEDLE.format(key=71432))
    starts = [i for i in range(len(ids)) if ids[i:i + len(needle)] == needle]
    assert starts == [at]  # once
    n_fill = length - len(enc.encode(longctx.INTRO)) - len(needle) - len(enc.encode(longctx.QUESTION))
    assert at - len(enc.encode(longctx.INTRO)) == round(depth * n_fill)  # at the asked depth of the filler
    text = enc.decode(ids)
    assert re.findall(r"\d+", text) == ["71432", "71432"]  # the needle's two mentions, no other digits
    assert text.endswith("What is the pass key? The pass key is")


def fake_answer(right):
    """GPTNeoX.generate replaced: writes the prompt's key (right) or 00000 (wrong) after it."""
    def generate(self, idx, max_new_tokens, **kw):
        enc = load_tokenizer(str(TOKENIZER))
        key = re.search(r"pass key is (\d+)", enc.decode(idx[0].tolist()))
        ans = enc.encode(f" {key.group(1) if right and key else '00000'}. The grass")[:max_new_tokens]
        return torch.cat([idx, torch.tensor([ans])], 1)
    return generate


@pytest.mark.parametrize("right", [True, False])
def test_passkey_accuracy_of_a_model_that_always_answers_right_or_wrong(tmp_path, monkeypatch, right):
    tiny("hyena", 64, vocab=50304).save_pretrained(tmp_path / "conv")
    to_modal(tiny("hyena", 64, vocab=50304), state_size=2).save_pretrained(tmp_path / "modal")
    monkeypatch.setattr(GPTNeoX, "generate", fake_answer(right))
    out = longctx.main(["passkey", "--ckpt", str(tmp_path / "conv"), str(tmp_path / "modal"), "--lengths", "64",
                        "128", "--trials", "4", "--tokenizer", str(TOKENIZER), "--beyond", "window",
                        "--device", "cpu", "--json", str(tmp_path / "pk.json")])
    assert json.loads((tmp_path / "pk.json").read_text()) == out
    conv, modal = out["passkey"][str(tmp_path / "conv")], out["passkey"][str(tmp_path / "modal")]
    assert modal["128"]["mode"] == "native" and modal["128"]["input_tokens"] == 128  # modal: any length, whole
    assert conv["128"]["mode"] == "window" and conv["128"]["input_tokens"] < 64  # conv: its last tokens only
    for r in (conv["64"], modal["64"], modal["128"]):
        assert r["accuracy"] == float(right) and r["trials"] == 4
        assert sum(b["trials"] for b in r["by_depth"].values()) == 4
        assert r["mean_key_logprob"] < 0
    if right:  # the window drops the needle unless it sits in the prompt's last tokens: fewer right answers
        assert conv["128"]["correct"] < 4


def test_passkey_refuses_or_skips_past_the_native_maximum(tmp_path):
    tiny("hyena", 64, vocab=50304).save_pretrained(tmp_path / "conv")
    args = ["passkey", "--ckpt", str(tmp_path / "conv"), "--lengths", "128", "--trials", "1", "--tokenizer",
            str(TOKENIZER), "--device", "cpu"]
    with pytest.raises(ValueError, match=r"--beyond refuse: .*conv at 128 \(native 64\).*--beyond window"):
        longctx.main(args)
    out = longctx.main(args + ["--beyond", "extrapolate"])
    assert "l_max 64" in out["passkey"][str(tmp_path / "conv")]["128"]["skipped"]


def test_speed_times_the_same_tokens_per_step_at_each_context(tmp_path):
    to_modal(tiny("hyena", 32), state_size=2).save_pretrained(tmp_path / "modal")
    out = longctx.main(["speed", "--ckpt", str(tmp_path / "modal"), "--contexts", "32", "128",
                        "--tokens-per-step", "256", "--steps", "3", "--warmup", "1", "--device", "cpu",
                        "--json", str(tmp_path / "speed.json")])
    assert [out["contexts"][c]["batch_size"] for c in ("32", "128")] == [8, 2]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gb"] is None for r in out["contexts"].values())
    with pytest.raises(ValueError, match="--tokens-per-step 256 must be a multiple"):
        longctx.main(["speed", "--ckpt", str(tmp_path / "modal"), "--contexts", "96", "--tokens-per-step", "256"])
