"""The card's three commands, run as a user types them, against tests/fakehub.py standing in for the hub:

    python prepare.py openwebtext
    python distill.py --layers progressive
    python eval.py --ckpt out/distill

The fake hub holds an "EleutherAI/pythia-70m" that is a tiny GPT-NeoX (2 layers, width 32, 2048 positions like the
real one) with a byte-level tokenizer of 257 ids, and a "Skylion007/openwebtext" of 100 real OpenWebText documents
in parquet, where prepare.py reads the real one. Everything else is the scripts' defaults (data/, out/distill,
batch 16 x 2048, the hub ids), run through cli.run from the folder a user would be in. distill.py's two overrides,
for time: --max-tokens 4 x 16 x 2048 (two steps per progressive stage) instead of its 100M-token default (checked
without training it: test_distill_defaults_and_the_budget_line), and --eval-batches 1 (of 20: ~13 s each on a CPU).
"""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import distill
import eval as ev
import prepare
from fakehub import FakeHub, serve
from hyena import Config, GPTNeoX
import cli
from tokenizer import _byte_of_char

OWT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "openwebtext" / "owt10k_val500.jsonl"
STEP = 16 * 2048  # distill's default batch x block


def byte_tokenizer():
    """GPT-2-style byte-level BPE with the 256 bytes as its vocabulary and no merges, <|endoftext|> = 256."""
    vocab = {c: b for c, b in _byte_of_char().items()}
    return {"normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
            "added_tokens": [{"id": 256, "content": "<|endoftext|>", "special": True, "normalized": False,
                              "lstrip": False, "rstrip": False, "single_word": False}],
            "model": {"type": "BPE", "vocab": vocab, "merges": []}}


@pytest.fixture
def card(tmp_path, monkeypatch):
    """A fake hub as HF_ENDPOINT with the tiny pythia-70m and openwebtext, a fresh cache, cwd an empty folder."""
    if not OWT.is_file():
        pytest.skip(f"needs the shared offline data ({OWT})")
    with FakeHub() as fake:
        serve(fake, tmp_path, monkeypatch)
        torch.manual_seed(0)
        teacher = GPTNeoX(Config(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                                 vocab_size=264, max_position_embeddings=2048))
        teacher.save_pretrained(tmp_path / "pythia")
        (tmp_path / "pythia" / "tokenizer.json").write_text(json.dumps(byte_tokenizer()))
        fake.add_dir("EleutherAI/pythia-70m", tmp_path / "pythia")
        docs = [d for d in (json.loads(line)["text"] for line in OWT.open()) if len(d) > 2100][:100]
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table({"text": docs}), buf)
        fake.add_file("Skylion007/openwebtext", "plain_text/train-00000-of-00001.parquet", buf.getvalue().to_pybytes(),
                      repo_type="dataset")
        (tmp_path / "user").mkdir()
        monkeypatch.chdir(tmp_path / "user")
        yield fake


def command(main, *argv):
    """`python script.py ARGV...`: cli.run(main) exits 0."""
    with pytest.raises(SystemExit) as e:
        cli.run(main, list(argv))
    assert e.value.code == 0


def test_distill_defaults_and_the_budget_line(monkeypatch, capsys, tmp_path):
    """--layers progressive alone: Pythia-70M, openwebtext, out/distill, 100M tokens said in the first line; an
    explicit budget wins (a --max-minutes alone is no token budget)."""
    monkeypatch.chdir(tmp_path)
    runs = []
    monkeypatch.setattr(distill, "distill", lambda dcfg, cfg, dist: runs.append((dcfg, cfg)))
    distill.main(["--layers", "progressive", "--device", "cpu"])
    dcfg, cfg = runs[-1]
    assert (dcfg.teacher, cfg.data, cfg.data_root, cfg.out_dir) == ("EleutherAI/pythia-70m", "openwebtext", "data",
                                                                    "out/distill")
    assert (cfg.max_tokens, cfg.max_minutes, cfg.batch_size, cfg.block_size) == (100_000_000, 0, 16, 2048)
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("distill: budget 100,000,000 tokens (the default; --max-tokens or --max-minutes")
    for flags, budget in ((["--max-minutes", "5"], (0, 5.0)), (["--max-tokens", "2e6"], (2_000_000, 0))):
        distill.main(["--device", "cpu", *flags])
        assert (runs[-1][1].max_tokens, runs[-1][1].max_minutes) == budget
        assert "the default" not in capsys.readouterr().err


def test_the_cards_three_commands_run_as_written(card, capsys):
    command(prepare.main, "openwebtext")
    meta = json.loads(Path("data/openwebtext/meta.json").read_text())
    assert meta["tokenizer"] == "EleutherAI/pythia-70m" and meta["vocab_size"] == 257
    assert meta["splits"]["val"]["tokens"] > 2048  # one held-out document (0.05% of 100, rounded up)

    capsys.readouterr()
    command(distill.main, "--layers", "progressive", "--max-tokens", str(4 * STEP), "--eval-batches", "1")
    err = capsys.readouterr().err
    assert "the default" not in err.splitlines()[0]  # the budget given is the budget run
    assert [json.loads(Path(f"out/distill/stage-{l:02d}/summary.json").read_text())["tokens"] for l in (0, 1)] \
        == [2 * STEP, 2 * STEP]
    final = Path("out/distill/final")
    assert GPTNeoX.from_pretrained(final).config.mixers == ["hyena", "hyena"]
    record = json.loads((final / "training_data.json").read_text())
    assert (record["data"], record["data_root"]) == ("openwebtext", "data")
    assert record["path"] == str(Path("data/openwebtext").resolve())
    assert (final / "tokenizer.json").read_text() == json.dumps(byte_tokenizer())  # the hub id's, from the cache
    assert "python eval.py --ckpt out/distill" in err

    command(ev.main, "--ckpt", "out/distill")
    out = capsys.readouterr().out
    header, rest = out.split("\n", 1)
    assert header.startswith("--- out/distill (temperature 0.8")  # a short sample first, then the table
    row = next(line for line in rest.splitlines() if line.startswith("| out/distill |"))
    assert "| openwebtext token ppl |" in rest and 1 < float(row.split("|")[3]) < 257 * 2


def test_eval_ckpt_alone_without_a_record_says_which_data_to_pass(card, capsys):
    """A hub model, or a run saved before training_data.json (its distill_summary.json names the data)."""
    GPTNeoX.from_pretrained("EleutherAI/pythia-70m").save_pretrained(Path("old/final"))
    Path("old/distill_summary.json").write_text(json.dumps({"args": {"data": "gutenberg"}}))
    for ckpt, data in (("EleutherAI/pythia-70m", "openwebtext"), ("old", "gutenberg")):
        with pytest.raises(SystemExit) as e:
            cli.run(ev.main, ["--ckpt", ckpt])
        err = capsys.readouterr().err.splitlines()[-1]
        assert e.value.code == 2 and err.startswith(f"eval.py: error: --ckpt {ckpt}: no record of the data")
        assert f"--data {data})" in err
