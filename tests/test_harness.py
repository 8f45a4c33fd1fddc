"""harness/: the lm-eval adapter's numbers equal direct computations with the model's forward; generate_until stops
at its stop string; eval.py --tasks end to end on a tiny offline task; eval.py --protocol harness equals the
harness's own wikitext metrics; the offline tasks' data builder. Tiny random models, CPU."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as ev
from harness import build
from hyena import Config, GPTNeoX, make_student
from tokenizer import load_tokenizer

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
TOKENIZER = SHARED / "tokenizer" / "20B_tokenizer.json"
WIKI = SHARED / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw"
pytestmark = pytest.mark.skipif(not (TOKENIZER.is_file() and WIKI.is_file()),
                                reason=f"needs the shared offline data ({TOKENIZER}, {WIKI})")
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed: pip install lm-eval==0.4.13 (requirements-dev.txt)")
TINY = dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2, vocab_size=50304,
            max_position_embeddings=64)


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def student():
    """A hybrid: attention in layer 0, Hyena in layer 1 (both kinds of mixer must ignore right padding)."""
    torch.manual_seed(0)
    return make_student(GPTNeoX(Config(**TINY)), layers=[1]).eval()


@pytest.fixture(scope="module")
def texts():
    text = WIKI.read_text(encoding="utf-8")
    return text[:700], text[700:900], text[900:1000]


def lm_for(model, **kw):
    from harness.adapter import HyenaLM
    return HyenaLM(model, tokenizer=str(TOKENIZER), **kw)


def request(kind, *args):
    from lm_eval.api.instance import Instance
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def direct_logprobs(model, context, cont):
    """log P(cont tokens | context tokens) one by one, and whether each is the argmax: one unbatched forward (the
    context cut from the left to fit the model's 64 positions, as lm-eval does)."""
    context = context[max(0, len(context) + len(cont) - 65):]
    with torch.no_grad():
        logits, _ = model(torch.tensor([context + cont[:-1]]))  # (1, T, V)
    logp = F.log_softmax(logits[0, len(context) - 1:].double(), dim=-1)  # (C, V)
    target = torch.tensor(cont)
    return logp.gather(1, target[:, None])[:, 0], logp.argmax(-1) == target


def encode_pair(enc, context, cont):
    """lm-eval's split of a request into ids: an empty context is <|endoftext|>; trailing spaces move over."""
    if not context:
        return [enc.eot_token], enc.encode(cont)
    n = len(context) - len(context.rstrip())
    context, cont = context[:len(context) - n], context[len(context) - n:] + cont
    whole, ids = enc.encode(context + cont), enc.encode(context)
    return ids, whole[len(ids):]


@needs_lm_eval
def test_loglikelihood_is_the_forward(student, enc, texts):
    lm = lm_for(student, batch_size=3)  # 5 requests of different lengths: padded batches, a short last one
    pairs = [(texts[0][:300], texts[0][300:340]), (texts[1][:50], " the"), ("", texts[2]), (texts[2][:60], texts[2][60:]),
             (texts[1][:120] + " ", "of")]
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for (context, cont), (ll, greedy) in zip(pairs, got):
        logp, is_max = direct_logprobs(student, *encode_pair(enc, context, cont))
        assert ll == pytest.approx(logp.sum().item(), abs=1e-4)
        assert greedy == bool(is_max.all())

    # is_greedy holds exactly for the model's own argmax continuation
    ctx = enc.encode(texts[1])[:30]
    greedy_ids = student.generate(torch.tensor([ctx]), 4, temperature=0)[0, 30:].tolist()
    (ll, greedy), (_, other) = lm._loglikelihood_tokens([(None, ctx, greedy_ids), (None, ctx, greedy_ids[:3] + [11])])
    assert greedy and not other
    assert ll == pytest.approx(direct_logprobs(student, ctx, greedy_ids)[0].sum().item(), abs=1e-4)


@needs_lm_eval
def test_loglikelihood_rolling_sums_every_token_once(student, enc, texts):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    lm = lm_for(student, batch_size=2)
    got = lm.loglikelihood_rolling([request("loglikelihood_rolling", t) for t in texts])
    for text, total in zip(texts, got):
        ids = enc.encode(text)
        windows = list(map(make_disjoint_window, get_rolling_token_windows(ids, enc.eot_token, 64, 1)))
        assert sum(len(cont) for _, cont in windows) == len(ids)  # every token scored once
        direct = sum(direct_logprobs(student, ctx, cont)[0].sum().item() for ctx, cont in windows)
        assert total == pytest.approx(direct, abs=1e-3)
    short = enc.encode(texts[2])  # one window: log P(t_i | <|endoftext|>, t_<i) summed, one plain forward
    assert len(short) < 64 and got[2] == pytest.approx(direct_logprobs(student, [enc.eot_token], short)[0].sum().item(),
                                                       abs=1e-4)


@needs_lm_eval
def test_generate_until_stops_at_the_stop_string(student, enc, texts, monkeypatch):
    ctx = texts[1][:80]
    ids = torch.tensor([enc.encode(ctx)])
    full = student.generate(ids, 20, temperature=0)[0, ids.shape[1]:].tolist()
    k = next(k for k in range(2, 20) if enc.decode(full[k:k + 1]).strip()
             and enc.decode(full[k:k + 1]) not in enc.decode(full[:k]))
    stop = enc.decode(full[k:k + 1])
    lengths = []
    generate = student.generate
    monkeypatch.setattr(student, "generate", lambda *a, **kw: lengths.append(len(out := generate(*a, **kw)[0])) or
                        out[None])
    lm = lm_for(student, batch_size=2)
    got = lm.generate_until([request("generate_until", ctx, {"until": [stop], "max_gen_toks": 20}),
                             request("generate_until", ctx, {"until": ["\x00"], "max_gen_toks": 5})])
    assert got[0] == enc.decode(full).split(stop)[0] and stop not in got[0]
    assert got[1] == enc.decode(full[:5])  # no stop string: max_gen_toks tokens
    assert sorted(lengths) == sorted([ids.shape[1] + 5, ids.shape[1] + k + 1])  # the first stopped right after its stop
    with pytest.raises(ValueError, match="top_p"):
        lm.generate_until([request("generate_until", ctx, {"until": ["."], "top_p": 0.9})])


def tiny_task(folder, name, records, **fields):
    """A task YAML + JSONL in folder, data by absolute path."""
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = [f"task: {name}", "dataset_path: json", f"dataset_kwargs:\n  data_files:\n    test: {data}", "test_split: test"]
    lines += [f"{k}: {v}" for k, v in fields.items()]
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")


@needs_lm_eval
def test_eval_py_tasks_end_to_end(student, enc, texts, tmp_path, capsys):
    passages = [{"text": t.replace("\n", " ").strip()} for t in texts]
    tiny_task(tmp_path, "tiny_lambada", passages, output_type="loglikelihood",
              doc_to_text="\"{{text.split(' ')[:-1]|join(' ')}}\"", doc_to_target="\"{{' '+text.split(' ')[-1]}}\"",
              metric_list="\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false"
                          "\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true")
    student.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "eval.json"
    ev.main(["--ckpt", str(tmp_path / "ckpt"), "--tasks", "tiny_lambada", "--include-path", str(tmp_path),
             "--tokenizer", str(TOKENIZER), "--json", str(out), "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-3] == "| model | context | tiny_lambada perplexity | tiny_lambada acc |"
    result = json.loads(out.read_text())["results"][0]
    got = result["tasks"]["tiny_lambada"]
    lls = lm_for(GPTNeoX.from_pretrained(tmp_path / "ckpt")).loglikelihood(
        [request("loglikelihood", " ".join(p["text"].split(" ")[:-1]), " " + p["text"].split(" ")[-1]) for p in passages])
    assert got["perplexity"] == pytest.approx(math.exp(-np.mean([ll for ll, _ in lls])), rel=1e-6)
    assert got["acc"] == np.mean([g for _, g in lls])
    assert lines[-1].startswith(f"| {tmp_path / 'ckpt'} | {result['context']} | {got['perplexity']:.4f} ± ")


def test_tasks_without_lm_eval_names_the_install(tmp_path, monkeypatch):
    GPTNeoX(Config(**TINY)).save_pretrained(tmp_path / "ckpt")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "harness.adapter", raising=False)
    with pytest.raises(ValueError, match=r"pip install lm-eval"):
        ev.main(["--ckpt", str(tmp_path / "ckpt"), "--tasks", "wikitext2_offline"])


@needs_lm_eval
def test_protocol_harness_reproduces_the_harness_wikitext_metrics(student, enc, texts, tmp_path):
    """lm-eval's word perplexity and bits per byte (loglikelihood_rolling, per document) == eval.py --protocol
    harness on the same documents; eval.py's own stream protocol scores other windows and counts."""
    from harness.adapter import evaluate_tasks, task_manager
    docs = [texts[0], " " + texts[1] + "\n", texts[2]]  # leading/trailing whitespace: lm-eval counts an empty word
    tiny_task(tmp_path, "tiny_wiki", [{"text": d} for d in docs], output_type="loglikelihood_rolling",
              doc_to_text='""', doc_to_target="text",
              metric_list="\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte")
    lm = lm_for(student, batch_size=3, max_length=32)
    harness = evaluate_tasks(lm, ["tiny_wiki"], task_manager(["tiny_wiki"], tmp_path))["tiny_wiki"]
    tokens = np.array([t for d in docs for t in enc.encode_ordinary(d) + [enc.eot_token]], dtype=np.uint16)
    ours = ev.evaluate(student, tokens, 32, batch_size=2, to_text=ev.text_decoder(enc), protocol="harness",
                       eot=enc.eot_token)
    assert ours["word_ppl"] == pytest.approx(harness["word_perplexity"], rel=1e-6)
    assert ours["bits_per_byte"] == pytest.approx(harness["bits_per_byte"], rel=1e-6)
    stream = ev.evaluate(student, tokens, 32, to_text=ev.text_decoder(enc))
    assert stream["tokens"] == len(tokens) - 1 and ours["tokens"] == len(tokens) - len(docs)  # eots not scored
    with pytest.raises(ValueError, match="no --stride"):
        ev.evaluate(student, tokens, 32, stride=16, protocol="harness", eot=enc.eot_token)
    with pytest.raises(SystemExit):
        ev.parse_args(["--ckpt", "x", "--data", "y", "--protocol", "harness", "--stride", "16"])


def test_harness_windows_score_each_document_token_once():
    tokens = np.array([5, 6, 7, 8, 9, 10, 11, 0, 12, 13, 0], dtype=np.uint16)  # two documents, eot = 0
    got = [(x[0].tolist(), y[0].tolist()) for x, y in ev.harness_windows(tokens, 0, 3)]
    assert got == [([0, 5, 6], [5, 6, 7]), ([7, 8, 9], [8, 9, 10]), ([8, 9, 10], [-1, -1, 11]),  # a full last window
                   ([0, 12], [12, 13])]


def test_build_is_deterministic_and_well_formed(tmp_path):
    raw = " \n = A = \n \n one two . \n \n = = Sub = = \n \n three . \n \n = B = \n \n four . \n"
    pages = build.wikitext_pages(raw)
    assert pages == [" = A = \n \n one two . \n \n = = Sub = = \n \n three . \n ", " = B = \n \n four . \n"]
    assert "\n".join([" "] + pages) == raw  # nothing but the blank first line is left out
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    rng = np.random.default_rng(0)
    book = "\n\n".join(" ".join(rng.choice(words, 12)).capitalize() + " lambda. The " + " ".join(rng.choice(words, 8))
                       + " lambda." for _ in range(200))
    lam = build.lambada_passages([book])
    assert lam and all(p["text"].split(" ")[-1] == "lambda" and "lambda" in p["text"][:-7] for p in lam)
    assert all(50 <= len(p["text"].split(" ")) <= 150 for p in lam)
    items = build.next_sentence_items([book], np.random.default_rng(1))
    assert items == build.next_sentence_items([book], np.random.default_rng(1))
    for it in items[:20]:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4 and 0 <= it["label"] < 4
        assert book.replace("\n\n", " ").find(it["context"] + " " + it["choices"][it["label"]]) >= 0  # the true one
    assert build.sentences("Mr. Smith came. He left!") == ["Mr. Smith came.", "He left!"]


def test_prepare_harness_writes_the_same_files_twice(tmp_path):
    import tarfile

    import prepare
    shared = tmp_path / "shared"
    (shared / "wikitext" / "wikitext-2-raw").mkdir(parents=True)
    for name in ("valid", "test"):
        (shared / "wikitext" / "wikitext-2-raw" / f"wiki.{name}.raw").write_text(" \n = A = \n \n x . \n = B = \n y . \n")
    books = tmp_path / "gutenberg"
    books.mkdir()
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    for name in ("val_book.txt", "train_book.txt"):
        (books / name).write_text("\n\n".join(" ".join(rng.choice(words, 30)).capitalize() + " alpha. And " +
                                                " ".join(rng.choice(words, 6)) + " beta." for _ in range(300)))
    (shared / "corpus").mkdir()
    with tarfile.open(shared / "corpus" / "gutenberg.tar.xz", "w:xz") as tar:
        tar.add(books, arcname="gutenberg")
    (shared / "corpus" / "VAL.txt").write_text("gutenberg/val_book.txt\n")
    runs = []
    for out in ("a", "b"):
        prepare.main(["harness", "--shared", str(shared), "--out-dir", str(tmp_path / out), "--lambada", "5",
                      "--next-sentence", "7"])
        runs.append({p.relative_to(tmp_path / out): p.read_bytes() for p in sorted((tmp_path / out).rglob("*.jsonl"))})
    assert runs[0] == runs[1] and len(runs[0]) == 4
    gut = Path("gutenberg")
    assert [len(runs[0][gut / f].splitlines()) for f in ("lambada.jsonl", "next_sentence.jsonl")] == [5, 7]
    assert all(json.loads(line)["text"].split(" ")[-1] in ("alpha", "beta")  # a sentence's last word, bare
               for line in runs[0][gut / "lambada.jsonl"].splitlines())
    pages = [json.loads(line)["page"] for line in runs[0][Path("wikitext2") / "test.jsonl"].splitlines()]
    assert pages == [" = A = \n \n x . ", " = B = \n y . \n"]


@needs_lm_eval
def test_registered_for_the_cli(tmp_path):
    """lm-eval's CLI builds its model as get_model(--model).create_from_arg_string(--model_args, {...})."""
    from lm_eval.api.registry import get_model

    from harness.adapter import HyenaLM
    GPTNeoX(Config(**TINY)).save_pretrained(tmp_path / "ckpt")
    lm = get_model("hyena").create_from_arg_string(f"pretrained={tmp_path / 'ckpt'},dtype=bf16,tokenizer={TOKENIZER}",
                                                   {"batch_size": "4", "max_batch_size": None, "device": "cpu"})
    assert isinstance(lm, HyenaLM) and lm.batch_size == 4 and lm.max_length == 64
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype=float16: expected one of"):
        HyenaLM(str(tmp_path / "ckpt"), dtype="float16", tokenizer=str(TOKENIZER))
