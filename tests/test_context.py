"""eval.py's context sweep (several --context values): the same tokens are scored at every context, models past
their maximum are refused, extrapolated (as transformers computes RoPE) or windowed, and the JSON says which.
Tiny random GPT-NeoX models (max_position_embeddings 32) on real WikiText documents with the real tokenizer."""
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cli
import eval as ev
from data import load_split
from pretrained.config import read_config
from hyena import Config, GPTNeoX, make_student
from modal.student import to_modal
from evaluation.sweep import evaluate_context
from evaluation.windows import context_windows, document_windows
from tokenizer import load_tokenizer

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"  # beside the repository
TOKENIZER = SHARED / "tokenizer" / "20B_tokenizer.json"
WIKI = SHARED / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw"
pytestmark = pytest.mark.skipif(not (TOKENIZER.is_file() and WIKI.is_file()),
                                reason=f"needs the shared offline data ({TOKENIZER}, {WIKI})")
TINY = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2, vocab_size=50304,
            max_position_embeddings=32)
SWEEP = ["--context", "16", "32", "64", "--score-tokens", "8", "--batch-size", "3", "--window-stride", "8"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """data/books: val = three documents of about 300, 40 and 150 tokens, each followed by <|endoftext|>."""
    enc = load_tokenizer(TOKENIZER)
    text = WIKI.read_text(encoding="utf-8")
    docs = [enc.encode(text[:1300]), enc.encode(text[1300:1500]), enc.encode(text[1500:2200])]
    ids = [t for d in docs for t in d + [enc.eot_token]]
    d = tmp_path_factory.mktemp("data") / "books"
    d.mkdir()
    np.array(ids, dtype=np.uint16).tofile(d / "val.bin")
    meta = {"command": f"python prepare.py text --val A --name books --tokenizer {TOKENIZER}",
            "tokenizer": str(TOKENIZER), "tokenizer_sha256": hashlib.sha256(TOKENIZER.read_bytes()).hexdigest(),
            "vocab_size": enc.n_vocab, "eot_token": enc.eot_token, "dtype": "uint16",
            "splits": {"val": {"tokens": len(ids), "documents": len(docs)}}}
    (d / "meta.json").write_text(json.dumps(meta))
    return d.parent


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """teacher (attention, max 32), conv (all-Hyena student, l_max 32), modal (its modal version), and
    local (the teacher with its mixers' outputs zeroed: each prediction depends on the current token alone)."""
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    teacher = GPTNeoX(Config(**TINY))
    teacher.save_pretrained(out / "teacher")
    conv = make_student(teacher)
    conv.save_pretrained(out / "conv")
    to_modal(conv, state_size=4).save_pretrained(out / "modal")
    with torch.no_grad():
        for block in teacher.gpt_neox.layers:
            block.attention.dense.weight.zero_()
            block.attention.dense.bias.zero_()
    teacher.save_pretrained(out / "local")
    return {k: str(out / k) for k in ("teacher", "conv", "modal", "local")}


def sweep(root, *ckpts, extra=()):
    return ev.main(["--ckpt", *ckpts, "--data", "books", "--data-root", str(root), *SWEEP, *extra])


def spans_of(root, length, max_windows=64):
    meta = json.loads((root / "books" / "meta.json").read_text())
    return document_windows(load_split(root / "books", "val"), meta["eot_token"], length, max_windows)


def test_windows_end_at_document_ends_and_step_back(root):
    tokens = load_split(root / "books", "val")
    eot = json.loads((root / "books" / "meta.json").read_text())["eot_token"]
    lengths = [len(d) for d in np.split(np.asarray(tokens), np.flatnonzero(tokens == eot) + 1)[:-1]]  # with eot
    spans, documents, longest = spans_of(root, 64)
    n0, n2 = lengths[0] - 1, lengths[2] - 1  # document 1 is shorter than 64: not used
    assert longest == n0 and documents == 2 and len(spans) == n0 // 64 + n2 // 64
    start2 = lengths[0] + lengths[1]
    assert spans[0].tolist() == tokens[n0 - 64 - 1:n0].tolist()  # the last 64 tokens of document 0, one before
    assert spans[1].tolist() == tokens[start2 + n2 - 65:start2 + n2].tolist()  # then document 2's last
    assert spans[2].tolist() == tokens[n0 - 129:n0 - 64].tolist()  # round robin: document 0's second-last
    assert len(spans_of(root, 64, max_windows=3)[0]) == 3
    first = spans_of(root, n0)[0]  # a window that starts at the file's first token reads <|endoftext|> before it
    assert len(first) == 1 and first[0, 0] == eot and first[0, 1:].tolist() == tokens[:n0].tolist()


@pytest.mark.parametrize("context,score,window,stride", [(100, 20, 50, 10), (100, 20, 50, 7), (100, 100, 50, 10),
                                                         (64, 8, 32, 8), (64, 64, 32, 32), (40, 8, 64, 8)])
def test_sliding_windows_score_the_last_tokens_once_each_with_at_most_window_context(context, score, window, stride):
    forwards = context_windows(context, score, window, stride)
    scored = [p for start, end, n in forwards for p in range(end - n, end)]  # input positions whose next is scored
    assert scored == list(range(context - score, context))  # each once, in order
    for start, end, n in forwards:
        for p in range(end - n, end):  # predicted from positions start..p: at most window, at least window - stride
            assert min(window - stride + 1, p + 1) <= p - start + 1 <= window  # + 1 (or all there are)
    assert context_windows(context, score, None) == context_windows(context, score, context) == [(0, context, score)]


def test_a_token_local_model_scores_the_same_at_every_context_and_mode(root, ckpts):
    """A model whose prediction depends on the current token alone gives one loss for one set of (input, target)
    pairs: equal losses at 16, 32 and 64 tokens, native, extrapolated and windowed, mean the same tokens."""
    runs = [sweep(root, ckpts["local"], extra=["--beyond", b]) for b in ("extrapolate", "window")]
    entries = [r["contexts"][ckpts["local"]][c] for r in runs for c in ("16", "32", "64")]
    assert [e["mode"] for e in entries] == ["native", "native", "extrapolate", "native", "native", "window"]
    assert {e["scored_tokens"] for e in entries} == {8 * len(spans_of(root, 64)[0])}
    assert max(e["loss"] for e in entries) == pytest.approx(min(e["loss"] for e in entries), rel=1e-6)
    other = sweep(root, ckpts["teacher"], extra=["--beyond", "window"])["contexts"][ckpts["teacher"]]
    assert other["16"]["loss"] != other["32"]["loss"]  # while a model that reads its context does differ


def reference_loss(model, spans, context, score, forwards=None):
    """One span and one forward at a time, full logits, the targets by hand."""
    nll, length = 0.0, spans.shape[1] - 1
    for span in torch.from_numpy(spans.astype(np.int64)):
        x, y = span[length - context:length], span[length - context + 1:]  # (C,) each
        for start, end, n in forwards or [(0, context, score)]:
            with torch.no_grad():
                logits = model(x[start:end][None])[0][0, -n:]  # (n, V)
            nll += F.cross_entropy(logits, y[end - n:end], reduction="sum").item()
    return nll / (len(spans) * score)


@pytest.mark.parametrize("max_batch_tokens", [65536, 40])
def test_native_and_window_losses_are_the_plain_loops(root, ckpts, max_batch_tokens):
    model = GPTNeoX.from_pretrained(ckpts["teacher"])
    spans = spans_of(root, 64)[0]
    native = evaluate_context(model, spans, 32, 8, batch_size=3, max_batch_tokens=max_batch_tokens)
    assert native["loss"] == pytest.approx(reference_loss(model, spans, 32, 8), rel=1e-6)
    assert native["read_tokens"] == 32 * len(spans) and native["windows"] == len(spans)
    windowed = evaluate_context(model, spans, 64, 24, window=32, stride=8, max_batch_tokens=max_batch_tokens)
    forwards = context_windows(64, 24, 32, 8)
    assert len(forwards) == 3 and windowed["scored_tokens"] == 24 * len(spans)
    assert windowed["loss"] == pytest.approx(reference_loss(model, spans, 64, 24, forwards), rel=1e-6)
    for window in (64, 100):  # a window as long as the context, or longer, is the native forward
        same = evaluate_context(model, spans, 64, 24, window=window, stride=8)
        assert same["loss"] == evaluate_context(model, spans, 64, 24)["loss"]


def test_extrapolated_rope_is_transformers(root, ckpts):
    """Past max_position_embeddings (32) the teacher's positions go on as transformers' GPT-NeoX computes them."""
    transformers = pytest.importorskip("transformers")
    r = sweep(root, ckpts["teacher"], extra=["--beyond", "extrapolate"])["contexts"][ckpts["teacher"]]["64"]
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(ckpts["teacher"]).eval()
    spans = spans_of(root, 64)[0]
    x, y = torch.from_numpy(spans[:, :-1].astype(np.int64)), torch.from_numpy(spans[:, -8:].astype(np.int64))
    with torch.no_grad():
        logits = hf(x).logits[:, -8:]  # (N, 8, V)
    assert r["mode"] == "extrapolate"
    assert r["loss"] == pytest.approx(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item(), rel=1e-5)


def test_a_modal_student_runs_past_l_max_natively(root, ckpts):
    cfg = read_config(Path(ckpts["modal"]) / "config.json")
    assert cfg.l_max == 32 and ev.max_context(cfg) is None  # every layer modal: defined for any length
    r = sweep(root, ckpts["modal"])["contexts"][ckpts["modal"]]  # --beyond refuse, the default: nothing refused
    assert [r[c]["mode"] for c in ("16", "32", "64")] == ["native"] * 3
    assert len({r[c]["loss"] for c in r}) == 3


def test_a_conv_student_past_l_max_is_refused_skipped_or_windowed(root, ckpts, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(ev.main, ["--ckpt", ckpts["conv"], "--data", "books", "--data-root", str(root), *SWEEP])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    for part in (ckpts["conv"], "maximum of 32 tokens", "l_max", "--context 64", "--beyond extrapolate",
                 "--beyond window"):
        assert part in err, (part, err)
    r = sweep(root, ckpts["conv"], extra=["--beyond", "extrapolate"])["contexts"][ckpts["conv"]]
    assert r["64"] == {"skipped": r["64"]["skipped"]} and "l_max 32" in r["64"]["skipped"]
    assert f"{ckpts['conv']} at context 64: skipped: conv Hyena filters end at l_max 32" in capsys.readouterr().err
    assert r["32"]["mode"] == "native"
    w = sweep(root, ckpts["conv"], extra=["--beyond", "window", "--window-stride", "4"])["contexts"][ckpts["conv"]]
    assert (w["64"]["mode"], w["64"]["window"]) == ("window", 32) and w["32"]["loss"] == r["32"]["loss"]


def test_json_layout_and_table(root, ckpts, tmp_path, capsys):
    out = tmp_path / "ctx.json"
    got = sweep(root, ckpts["teacher"], ckpts["modal"], extra=["--beyond", "window", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["contexts"] == got["contexts"] and saved["context_sweep"] == got["context_sweep"]
    s = saved["context_sweep"]
    assert (s["data"], s["split"], s["score_tokens"], s["contexts"], s["beyond"], s["window_stride"]) == \
        ("books", "val", 8, [16, 32, 64], "window", 8)
    assert s["windows"] == len(spans_of(root, 64)[0]) and s["max_windows"] == 64
    e = saved["contexts"][ckpts["teacher"]]["64"]
    assert e["mode"] == "window" and e["compiled"] is False and e["peak_mem_gb"] is None  # CPU: no GPU memory
    assert e["ppl"] == pytest.approx(math.exp(e["loss"])) and e["read_tokens_per_s"] > 0
    assert saved["results"] == [{"model": c, "path": c} for c in (ckpts["teacher"], ckpts["modal"])]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| model | ctx 16 | ctx 32 | ctx 64 |"
    assert lines[2] == f"| {ckpts['teacher']} | " + " | ".join(
        f"{saved['contexts'][ckpts['teacher']][c]['ppl']:.3f}" for c in ("16", "32")) + f" | {e['ppl']:.3f} w |"


def test_a_failing_compile_falls_back_to_eager_and_says_so(root, ckpts, monkeypatch, capsys):
    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no compiler here")
        return run
    monkeypatch.setattr(torch, "compile", broken)
    r = sweep(root, ckpts["teacher"], extra=["--compile", "--beyond", "window"])["contexts"][ckpts["teacher"]]
    eager = sweep(root, ckpts["teacher"], extra=["--beyond", "window"])["contexts"][ckpts["teacher"]]
    assert "warning: torch.compile failed (RuntimeError: no compiler here)" in capsys.readouterr().err
    assert r["16"]["compiled"] is False and "no compiler here" in r["16"]["compile_error"]
    assert [r[c]["loss"] for c in ("16", "32")] == [eager[c]["loss"] for c in ("16", "32")]


def test_no_document_long_enough_says_the_longest(root, ckpts, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(ev.main, ["--ckpt", ckpts["modal"], "--data", "books", "--data-root", str(root),
                          "--context", "16", "5000", "--score-tokens", "8"])
    err = capsys.readouterr().err
    longest = spans_of(root, 64)[2]
    assert e.value.code == 2 and "no document of --data books (val split) is 5000 tokens long" in err
    assert f"the longest has {longest}" in err and "--context" in err


@pytest.mark.parametrize("argv,message", [
    (["--context", "64", "--beyond", "window"], "--beyond is for a context sweep"),
    (["--context", "16", "32"], "--score-tokens 512 is longer than the shortest --context 16"),
    (["--context", "16", "32", "--score-tokens", "8", "--stride", "8"], "--stride does not apply to a context sweep"),
    (["--context", "16", "32", "16", "--score-tokens", "8"], "repeats a value"),
    (["--context", "16", "32", "--score-tokens", "8", "--data", "books", "other"], "give one --data, got 2"),
])
def test_flags_that_do_not_fit_are_refused_by_name(root, ckpts, argv, message, capsys):
    with pytest.raises(SystemExit):
        ev.main(["--ckpt", ckpts["teacher"], "--data", "books", "--data-root", str(root), *argv])
    assert message in capsys.readouterr().err
