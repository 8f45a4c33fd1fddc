"""eval.py: perplexities equal plain hand computations; every token is scored once; the CLI's table, JSON, errors
and samples. Tiny random GPT-NeoX models on a real WikiText snippet tokenized with the real tokenizer."""
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
import eval as ev
from data import load_split
from hyena import Config, GPTNeoX, make_student
from tokenizer import load_tokenizer

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"  # beside the repository
TOKENIZER = SHARED / "tokenizer" / "20B_tokenizer.json"
WIKI = SHARED / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw"
pytestmark = pytest.mark.skipif(not (TOKENIZER.is_file() and WIKI.is_file()),
                                reason=f"needs the shared offline data ({TOKENIZER}, {WIKI})")
TINY = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2, vocab_size=50304,
            max_position_embeddings=128)


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def docs():
    text = WIKI.read_text(encoding="utf-8")
    return text[:1200], text[1200:2000], text[2000:2400]  # two test documents, one val document


@pytest.fixture(scope="module")
def root(tmp_path_factory, enc, docs):
    """data/wiki in data.py's format: test = doc0 <eot> doc1 <eot>, val = doc2 <eot>."""
    d = tmp_path_factory.mktemp("data") / "wiki"
    d.mkdir()
    splits = {"test": enc.encode(docs[0]) + [enc.eot_token] + enc.encode(docs[1]) + [enc.eot_token],
              "val": enc.encode(docs[2]) + [enc.eot_token]}
    for split, ids in splits.items():
        np.array(ids, dtype=np.uint16).tofile(d / f"{split}.bin")
    meta = {"command": f"python prepare.py text --val A --test B --name wiki --tokenizer {TOKENIZER}",
            "tokenizer": str(TOKENIZER), "tokenizer_sha256": hashlib.sha256(TOKENIZER.read_bytes()).hexdigest(),
            "vocab_size": enc.n_vocab, "eot_token": enc.eot_token, "dtype": "uint16",
            "splits": {s: {"tokens": len(ids), "documents": ids.count(enc.eot_token)} for s, ids in splits.items()}}
    (d / "meta.json").write_text(json.dumps(meta))
    return d.parent


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny random teacher and a student with one Hyena layer, saved as checkpoints."""
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    teacher = GPTNeoX(Config(**TINY))
    teacher.save_pretrained(out / "teacher")
    make_student(teacher, layers=[1]).save_pretrained(out / "student")
    return str(out / "teacher"), str(out / "student")


def reference_nll(model, tokens, context, stride):
    """The Hugging Face perplexity guide's loop: one window at a time, model(x, y), each token scored once."""
    tokens = torch.from_numpy(tokens.astype(np.int64))
    n, nll, count, prev_end = len(tokens), 0.0, 0, 0
    for begin in range(0, n - 1, stride):
        end = min(begin + context, n - 1)
        x, y = tokens[begin:end][None], tokens[begin + 1:end + 1][None].clone()
        y[:, :-(end - prev_end)] = -1  # context only: scored by an earlier window
        with torch.no_grad():
            nll += model(x, y)[1].item() * (end - prev_end)
        count, prev_end = count + end - prev_end, end
        if end == n - 1:
            break
    return nll, count


@pytest.mark.parametrize("stride", [None, 40])
def test_perplexity_is_the_plain_loops(root, ckpts, stride):
    tokens = load_split(root / "wiki", "test")
    model = GPTNeoX.from_pretrained(ckpts[1])
    r = ev.evaluate(model, tokens, 64, stride=stride, batch_size=3)  # several windows a forward, a short last one
    nll, count = reference_nll(model, tokens, 64, stride or 64)
    assert r["tokens"] == count == len(tokens) - 1  # every token but the first, exactly once
    assert r["token_ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert r["nll"] == pytest.approx(nll, rel=1e-5)


def test_word_ppl_and_bits_per_byte_count_the_decoded_scored_text(root, ckpts, enc, docs):
    tokens = load_split(root / "wiki", "test")
    r = ev.evaluate(GPTNeoX.from_pretrained(ckpts[0]), tokens, 128, to_text=ev.text_decoder(enc))
    text = enc.decode(enc.encode(docs[0])[1:]) + "\n" + docs[1] + "\n"  # the first token is context; eot -> "\n"
    words, nbytes = len(re.findall(r"\S+", text)), len(text.encode("utf-8"))
    assert (r["words"], r["bytes"]) == (words, nbytes)
    assert r["word_ppl"] == pytest.approx(math.exp(r["nll"] / words), rel=1e-12)
    assert r["bits_per_byte"] == pytest.approx(r["nll"] / math.log(2) / nbytes, rel=1e-12)
    assert r["word_ppl"] > r["token_ppl"]  # fewer words than tokens share the same NLL

    part = ev.evaluate(GPTNeoX.from_pretrained(ckpts[0]), tokens, 128, max_tokens=100, to_text=ev.text_decoder(enc))
    assert part["tokens"] == 99 and part["bytes"] == len(enc.decode(tokens[1:100].tolist()).encode())


def test_precision(root, ckpts):
    tokens = load_split(root / "wiki", "test")
    model = GPTNeoX.from_pretrained(ckpts[1])
    ppl = {name: ev.evaluate(model, tokens, 128, max_tokens=257, dtype=ev.DTYPES[name])["token_ppl"]
           for name in ("fp64", "fp32", "bf16")}
    print(ppl)
    assert next(model.parameters()).dtype == torch.float32  # evaluate cast a copy, not the caller's model
    assert ppl["fp64"] == pytest.approx(ppl["fp32"], rel=1e-5)
    assert ppl["bf16"] != ppl["fp32"] and ppl["bf16"] == pytest.approx(ppl["fp32"], rel=1e-2)


def test_main_prints_a_table_and_writes_json(root, ckpts, tmp_path, capsys):
    out = tmp_path / "eval.json"
    results = ev.main(["--ckpt", *ckpts, "--data", "wiki", "--data-root", str(root), "--context", "4096",
                       "--stride", "100", "--batch-size", "2", "--json", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| model | context | wiki token ppl | wiki word ppl | wiki bits/byte | wiki tokens |"
    saved = json.loads(out.read_text())
    assert saved["results"] == results and (saved["stride"], saved["dtype"]) == (100, "fp32")
    tokens = load_split(root / "wiki", "test")
    for line, ckpt, r in zip(lines[2:], ckpts, saved["results"]):
        m = r["datasets"]["wiki"]
        assert r["context"] == 128 and m["split"] == "test"  # capped at max_position_embeddings; test by default
        direct = ev.evaluate(GPTNeoX.from_pretrained(ckpt), tokens, 128, stride=100)
        assert m["token_ppl"] == pytest.approx(direct["token_ppl"])
        assert line == (f"| {ckpt} | 128 | {m['token_ppl']:.3f} | {m['word_ppl']:.3f} | {m['bits_per_byte']:.4f} "
                        f"| {len(tokens) - 1:,} (too few: < 1,000) |")  # a split of 493 tokens
    assert len(lines) == 4


def test_split_flag(root, ckpts, capsys):
    val = ev.main(["--ckpt", ckpts[0], "--data", str(root / "wiki"), "--split", "val", "--context", "64"])
    assert val[0]["datasets"][str(root / "wiki")]["tokens"] == len(load_split(root / "wiki", "val")) - 1


def test_missing_data_names_prepare_command(root, ckpts):
    with pytest.raises(FileNotFoundError, match=r"prepare\.py") as e:
        ev.main(["--ckpt", ckpts[0], "--data", "wikitext103", "--data-root", str(root)])
    assert "wikitext103" in str(e.value)


@pytest.mark.parametrize("name", ["nowhere/at/all", "no-such-run", "./out/x"])
def test_missing_checkpoint(root, tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ev.main(["--ckpt", name, "--data", "wiki", "--data-root", str(root)])


def test_checkpoint_names(ckpts, tmp_path):
    assert ev.resolve_ckpt("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"  # a hub id: from_pretrained fetches it
    GPTNeoX(Config(**TINY)).save_pretrained(tmp_path / "run" / "ckpt")
    assert ev.resolve_ckpt(str(tmp_path / "run")) == str(tmp_path / "run" / "ckpt")  # a train.py out_dir
    assert ev.resolve_ckpt(ckpts[0]) == ckpts[0]


def test_vocab_and_tokenizer_mismatch(root, tmp_path):
    GPTNeoX(Config(**{**TINY, "vocab_size": 1000})).save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="vocab_size 1000"):
        ev.main(["--ckpt", str(tmp_path / "small"), "--data", "wiki", "--data-root", str(root)])
    GPTNeoX(Config(**TINY)).save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "tokenizer.json").write_text("{}")  # a checkpoint that brings another tokenizer
    with pytest.raises(ValueError, match="sha256"):
        ev.main(["--ckpt", str(tmp_path / "other"), "--data", "wiki", "--data-root", str(root)])


def test_greedy_sample_is_generate(ckpts, enc, capsys):
    ev.main(["--ckpt", ckpts[1], "--prompt", "The lobster is", "--temperature", "0", "--max-new-tokens", "12",
             "--tokenizer", str(TOKENIZER)])
    out = capsys.readouterr().out
    ids = torch.tensor([enc.encode("The lobster is")])
    greedy = GPTNeoX.from_pretrained(ckpts[1]).generate(ids, 12, temperature=0)
    assert out.splitlines()[0].startswith(f"--- {ckpts[1]}")
    assert out.splitlines()[1:] == enc.decode(greedy[0].tolist()).splitlines()
    assert len(greedy[0]) == len(ids[0]) + 12


def test_prompt_past_the_hyena_l_max_says_what_to_change(ckpts, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(ev.main, ["--ckpt", ckpts[1], "--prompt", "The lobster is", "--max-new-tokens", "200",
                          "--tokenizer", str(TOKENIZER)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "--max-new-tokens 200" in err and "l_max 128" in err and "shorten the prompt" in err, err
    assert "Config.hyena_l_max" not in err


def test_a_teacher_samples_past_its_max_position_only_when_asked(ckpts, capsys):
    """RoPE past max_position_embeddings is a context the teacher never trained at: refused by name with both fixes,
    run (with a note) under --extrapolate."""
    ask = ["--ckpt", ckpts[0], "--prompt", "The lobster is", "--max-new-tokens", "200", "--temperature", "0",
           "--tokenizer", str(TOKENIZER), "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        cli.run(ev.main, ask)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "max_position_embeddings 128" in err and "--extrapolate" in err and "--max-new-tokens to 124" in err, err
    ev.main(ask + ["--extrapolate"])
    out, err = capsys.readouterr()
    assert "The lobster is" in out and "RoPE extrapolates" in err


def test_a_modal_student_samples_past_its_l_max(ckpts, tmp_path, capsys):
    """Modal filters are defined at every length: the prompt-length check that guards conv filters lets it run (this
    hybrid's attention layer past its positions under --extrapolate)."""
    from modal.student import to_modal
    to_modal(GPTNeoX.from_pretrained(ckpts[1]), state_size=4).save_pretrained(tmp_path / "modal")
    ev.main(["--ckpt", str(tmp_path / "modal"), "--prompt", "The lobster is", "--max-new-tokens", "200",
             "--temperature", "0", "--tokenizer", str(TOKENIZER), "--device", "cpu", "--extrapolate"])
    assert "The lobster is" in capsys.readouterr().out


def test_a_modal_student_evaluates_with_no_extra_flags(root, ckpts, tmp_path):
    """to_modal's checkpoint (modal/student.py) goes through eval.py like any other, its perplexity close to its conv
    student's (the fit is close at this size)."""
    from modal.student import to_modal
    to_modal(GPTNeoX.from_pretrained(ckpts[1]), state_size=8).save_pretrained(tmp_path / "modal")
    conv, mod = ev.main(["--ckpt", ckpts[1], str(tmp_path / "modal"), "--data", "wiki", "--data-root", str(root),
                         "--context", "64"])
    a, b = (r["datasets"]["wiki"]["token_ppl"] for r in (conv, mod))
    assert abs(b - a) <= 0.01 * a


def succeeds(argv, capsys):
    """eval.py as its __main__ runs it: (stdout, stderr) after checking it exits 0 without a traceback."""
    with pytest.raises(SystemExit) as e:
        cli.run(ev.main, argv)
    out, err = capsys.readouterr()
    assert e.value.code == 0 and "Traceback" not in err, err
    return out, err


def test_the_table_shows_the_context_used_and_a_longer_one_asked_is_warned_by_name(root, ckpts, capsys):
    out, err = succeeds(["--ckpt", *ckpts, "--data", "wiki", "--data-root", str(root), "--context", "4096"], capsys)
    rows = out.strip().splitlines()
    assert rows[0].startswith("| model | context | wiki token ppl |")
    assert [row.split(" | ")[1] for row in rows[2:]] == ["128", "128"]
    for ckpt, what in zip(ckpts, ("its max_position_embeddings 128", "its Hyena filters' l_max 128")):
        assert f"warning: --context 4096 is past the maximum of {ckpt} ({what}): it is evaluated at context 128" in err
    _, err = succeeds(["--ckpt", ckpts[0], "--data", "wiki", "--data-root", str(root), "--context", "64"], capsys)
    assert "--context" not in err  # within the maximum: no warning


def test_a_split_scored_on_few_tokens_gets_a_warning_on_its_row(root, ckpts, tmp_path, capsys):
    out, err = succeeds(["--ckpt", ckpts[0], "--data", "wiki", "--data-root", str(root), "--context", "64",
                         "--max-tokens", "5", "--json", str(tmp_path / "e.json")], capsys)
    assert out.strip().splitlines()[2].endswith(" | 4 (too few: < 1,000) |"), out
    assert f"warning: {ckpts[0]} on wiki test: only 4 tokens scored (fewer than 1,000): noisy perplexities" in err
    saved = json.loads((tmp_path / "e.json").read_text())["results"][0]["datasets"]["wiki"]
    assert saved["tokens"] == 4 and "fewer than 1,000" in saved["warning"]


def test_a_run_folder_gives_its_final_or_names_the_subfolder_to_pass(root, ckpts, tmp_path, capsys):
    run = tmp_path / "run"  # finetune.py's layout: OUT_DIR/ckpt (the training checkpoint) and OUT_DIR/final
    for sub in ("ckpt", "final"):
        shutil.copytree(ckpts[0], run / sub)
    out, err = succeeds(["--ckpt", str(run), "--data", "wiki", "--data-root", str(root), "--context", "64",
                         "--json", str(tmp_path / "e.json")], capsys)
    assert f"{run}: a training run's folder: using its final/ ({run / 'final'})" in err
    assert json.loads((tmp_path / "e.json").read_text())["results"][0]["path"] == str(run / "final")

    shutil.copytree(ckpts[0], tmp_path / "distill" / "align" / "ckpt")  # a run still in its first stage
    with pytest.raises(SystemExit) as e:
        cli.run(ev.main, ["--ckpt", str(tmp_path / "distill"), "--data", "wiki", "--data-root", str(root)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"pass one of its subfolders: {tmp_path / 'distill' / 'align' / 'ckpt'}" in err, err
