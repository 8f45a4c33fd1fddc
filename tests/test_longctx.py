"""Long context (issue 15): fine-tuning past l_max for modal students only, the passkey probe, the speed probe."""
import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune
from experiment import longctx, runner, throughput
from pretrained.config import read_config
from hyena import Config, GPTNeoX
from modal.student import load_pretrained, to_modal
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
    long = load_pretrained(tmp_path / "long" / "final")
    assert long.config.l_max == 128 and long.config.hyena_modal_state == [2, 2]  # trained at 128: recorded
    assert json.loads((tmp_path / "long" / "summary.json").read_text())["tokens"] == 2 * 2 * 128

    with pytest.raises(ValueError, match=r"--block-size 128 exceeds the convolutional Hyena filters' l_max 32 .*"
                                         r"--block-size 32 or less.*distill.py --teacher .*--modal-state"):
        finetune.main(finetune_args(tmp_path / "conv", tmp_path / "refused", data_dir, 128))


def test_attention_trains_past_max_position_embeddings_unless_rope_is_dynamic(tmp_path, data_dir, capsys):
    tiny("attention", 32).save_pretrained(tmp_path / "att")
    finetune.main(finetune_args(tmp_path / "att", tmp_path / "long", data_dir, 64))
    assert "attention layers train past max_position_embeddings 32" in capsys.readouterr().err
    assert read_config(tmp_path / "long" / "final" / "config.json").max_position_embeddings == 64
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


def sweep_entry(ppl, tps=None, mode="native", compiled=True):
    return {"mode": mode, "ppl": ppl, "loss": 1.0, "scored_tokens": 512, "windows": 1, "read_tokens_per_s": tps,
            "peak_mem_gb": 1.0, "compiled": compiled}


def test_report_longctx_section_from_synthetic_runs(tmp_path):
    from experiment import pages
    d = tmp_path / "runs" / "longctx"
    d.mkdir(parents=True)
    models = {"teacher": "T", "best": "B", "modal d4": "M", "long": "L"}
    (d / "models.json").write_text(json.dumps({"models": models, "block": 2048, "long": 16384, "modal": 4}))
    (d / "sweep-window.json").write_text(json.dumps({"contexts": {
        "T": {"2048": sweep_entry(20.0, 1000), "16384": sweep_entry(19.0, 900, "window"),
              "32768": sweep_entry(19.0, 900, "window")},
        "B": {"2048": sweep_entry(22.0), "16384": {"skipped": "conv filters end at l_max 2048"}},
        "L": {"2048": sweep_entry(21.0, 2000), "16384": sweep_entry(18.0, 2500),  # 5.3 % under the teacher
              "32768": sweep_entry(17.5, 1500)}}}))  # 1.67x the teacher's tokens/s: short of 2x
    (d / "sweep-extrapolate.json").write_text(json.dumps({"contexts": {"T": {"16384": sweep_entry(80.0, 1, "extrapolate")}}}))
    (d / "passkey-window.json").write_text(json.dumps({"passkey": {"L": {"2048": {
        "mode": "native", "accuracy": 0.5, "mean_key_logprob": -3.0, "trials": 2}, "4096": {"skipped": "x"}}}}))
    (d / "speed.json").write_text(json.dumps({"tokens_per_step": 32768, "device": "H200", "contexts": {
        "2048": {"batch_size": 16, "tokens_per_s": 1e6, "peak_mem_gb": 5.0, "compiled": True},
        "16384": {"batch_size": 2, "tokens_per_s": 0.95e6, "peak_mem_gb": 6.0, "compiled": True}}}))
    (d / "infer.json").write_text(json.dumps({"tokens": 65536, "stride": 512, "device": "H200", "infer": {
        "T": {"32768": {"mode": "window", "tokens_per_s": 900.0, "peak_mem_gb": 2.0, "compiled": True}},
        "L": {"32768": {"mode": "native", "tokens_per_s": 1500.0, "peak_mem_gb": 3.0, "compiled": True}}}}))
    m = pages.write_longctx(tmp_path / "runs", tmp_path / "res")
    md = (tmp_path / "res" / "longctx" / "LONGCTX.md").read_text()
    assert json.loads((tmp_path / "res" / "longctx" / "longctx.json").read_text())["targets"] == m["targets"]
    assert "| model (mode past its native maximum) | 2048 | 16384 | 32768 |" in md
    assert "| long (window) | 21.00 | 18.00 | 17.50 |" in md and "| teacher (window) | 20.00 | 19.00 (window) |" in md
    assert "| best (window) | 22.00 | skipped |" in md and "teacher (extrapolate)" in md
    assert "| long (window) | 0.50 (-3.00) | skipped |" in md
    assert [t["reached"] for t in m["targets"]] == [True, True, True, False]
    assert "(+5.3%)" in md and "(0.95x)" in md and "1,500 vs 900 (1.67x" in md
    assert "| long | 32768 | native | 1,500 | 3.00 | True |" in md
    assert pages.write_longctx(tmp_path / "none", tmp_path / "res2") == {}  # no study: no section


def test_experiment_long_step_commands_and_resume(tmp_path, monkeypatch):
    """--preset tiny --modal 4 --long-context 512: the fine-tune at 512 x 2 (8 x 128 tokens per step), then the
    sweeps, passkeys and speed at contexts scaled to 128..1024; a rerun with every output present runs nothing."""
    from experiment import experiment, report
    runs = tmp_path / "runs"
    for d in ["teacher", "scratch", "paper", "paper-ft", "best", "best-ce", "best-ce-ft", "modal/d4"]:
        (runs / d / "final").mkdir(parents=True)
    for name in ["teacher", "scratch", "paper", "paper-ft", "best", "best-ce-kd", "best-ce", "modal"]:
        (runs / "eval").mkdir(parents=True, exist_ok=True)
        (runs / "eval" / f"{name}.json").write_text("{}")
    launched = []

    class Done:
        returncode = 0

        def poll(self):
            return 0

    def fake_run(cmd, *a, **kw):
        launched.append([str(c) for c in cmd])
        out = [str(c) for c in cmd]
        if "--json" in out:
            Path(out[out.index("--json") + 1]).write_text("{}")
        return Done()
    monkeypatch.setattr(experiment, "prepare_commands", lambda *a: [])
    monkeypatch.setattr(runner, "run", fake_run)
    monkeypatch.setattr(runner, "finish", lambda proc: 0)
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    monkeypatch.setattr(report, "main", lambda argv: None)
    argv = ["--preset", "tiny", "--gpus", "0", "--runs", str(runs), "--results", str(tmp_path / "res"),
            "--modal", "4", "--long-context", "512", "--no-dtype-study"]
    experiment.main(argv)
    tune = next(c for c in launched if c[1].endswith("finetune.py"))
    assert tune[tune.index("--init") + 1] == str(runs / "modal" / "d4" / "final")
    assert (tune[tune.index("--block-size") + 1], tune[tune.index("--batch-size") + 1]) == ("512", "2")
    sweep = next(c for c in launched if c[1].endswith("eval.py") and "window" in c)
    assert sweep[sweep.index("--context") + 1:sweep.index("--score-tokens")] == ["128", "256", "512", "1024"]
    assert sweep[sweep.index("--ckpt") + 1:sweep.index("--beyond")] == [str(runs / p / "final") for p in
                                                                        ("teacher", "best", "modal/d4", "long")]
    speed = next(c for c in launched if "speed" in c)
    assert speed[speed.index("--contexts") + 1:speed.index("--tokens-per-step")] == ["128", "512"]
    names = json.loads((runs / "longctx" / "models.json").read_text())["models"]
    assert names["long"] == str(runs / "long" / "final")
    (runs / "long" / "final").mkdir(parents=True)
    launched.clear()
    experiment.main(argv)
    assert launched == []  # every long step's output exists: skipped
    with pytest.raises(ValueError, match="--long-context .*--modal D"):
        experiment.main([a for a in argv if a not in ("--modal", "4")])


def test_sliding_windows_cover_every_position_once():
    for length, window, stride in ((100, 32, 8), (64, 32, 32), (33, 32, 5), (20, 32, 8)):
        covered = []
        for start, n in throughput.window_starts(length, window, stride):
            end = min(start + window, length)
            covered += range(end - n, end)
        assert covered == list(range(length)), (length, window, stride)


def test_infer_scores_every_token_the_same_way_as_the_model(tmp_path):
    """infer's native read is the model's own mean CE; its sliding windows equal the native read where the
    window holds the whole sequence, and equal a by-hand per-window computation otherwise."""
    teacher = tiny("attention", 32)
    x = torch.randint(VOCAB, (2, 65))
    native = throughput.score_sequences(teacher, x)
    assert torch.allclose(native, teacher(x[:, :-1], x[:, 1:])[1], rtol=1e-6)
    assert torch.allclose(throughput.score_sequences(teacher, x, window=64, stride=8), native, rtol=1e-6)
    with torch.no_grad():
        nll = []
        for start, n in throughput.window_starts(64, 16, 8):
            logits = teacher(x[:, start:start + 16])[0][:, -n:]  # (B, n, V)
            nll.append(torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), x[:, start + 16 - n + 1:start + 17].flatten(), reduction="sum"))
    by_hand = sum(nll) / x[:, 1:].numel()
    assert torch.allclose(throughput.score_sequences(teacher, x, window=16, stride=8), by_hand, rtol=1e-5)


def test_infer_reads_the_teacher_in_windows_and_a_modal_student_whole(tmp_path):
    teacher = tiny("attention", 32)
    teacher.save_pretrained(tmp_path / "teacher")
    to_modal(tiny("hyena", 32), state_size=4).save_pretrained(tmp_path / "modal")
    out = longctx.main(["infer", "--ckpt", str(tmp_path / "teacher"), str(tmp_path / "modal"), "--contexts", "32",
                        "128", "--tokens", "256", "--stride", "8", "--device", "cpu",
                        "--json", str(tmp_path / "infer.json")])
    t, m = out["infer"][str(tmp_path / "teacher")], out["infer"][str(tmp_path / "modal")]
    assert t["32"]["mode"] == "native" and t["128"] == {**t["128"], "mode": "window", "window": 32}
    assert m["128"]["mode"] == "native" and m["128"]["batch_size"] == 2
    assert all(r["tokens_per_s"] > 0 for r in (*t.values(), *m.values()))
    assert json.loads((tmp_path / "infer.json").read_text())["infer"][str(tmp_path / "modal")]["32"]["loss"] > 0
