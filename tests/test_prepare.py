"""prepare.py, corpora/sources.py and data.py: text and hub datasets in, uint16 tokens with <|endoftext|> after each
document out."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch

import data
import prepare
import cli
from corpora import sources
from evaluation.windows import eval_windows
from cli import out_dir_lock
from fakehub import FakeHub
from tokenizer import load_tokenizer

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"  # beside the repository
TOKENIZER = SHARED / "tokenizer" / "20B_tokenizer.json"
WIKI_VALID = SHARED / "wikitext" / "wikitext-2-raw" / "wiki.valid.raw"
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer(str(TOKENIZER))


def run(tmp_path, *argv, workers=1, min_tokens=2):
    """prepare.py on these tiny texts: --min-tokens 2 (min_tokens None: the default) lets their splits through."""
    more = [] if min_tokens is None else ["--min-tokens", str(min_tokens)]
    prepare.main([*map(str, argv), "--tokenizer", str(TOKENIZER), "--out-dir", str(tmp_path / "data"),
                  "--workers", str(workers), *more])


def files(folder):
    """The folder's files but the .lock prepare.py holds while writing it (left behind empty)."""
    return [p for p in sorted(folder.iterdir()) if p.name != ".lock"]


def decoded(enc, folder, split):
    return enc.decode(np.fromfile(folder / f"{split}.bin", dtype=np.uint16).tolist())


def error(tmp_path, *argv):
    """The message prepare.py exits with (cli.run prints it)."""
    with pytest.raises((ValueError, OSError)) as e:
        run(tmp_path, *argv)
    assert not list((tmp_path / "data").rglob("*.tmp")), "temporary files left behind"
    return str(e.value)


# -- local text ------------------------------------------------------------------------------------------------

def make_tree(root):
    """Every input kind: .txt in nested folders, a .jsonl, a .tar.xz of .txt, and a file prepare.py ignores."""
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("Alpha book.\n\nIt ends here.\n")
    (root / "sub" / "b.txt").write_text("Beta  book,  with   spaces\tand tabs.")
    (root / "notes.md").write_text("not a document")
    web = [json.dumps({"text": "Web one."}), "", json.dumps({"text": "Wéb twö ✓"})]  # a blank line is no document
    (root / "web.jsonl").write_text("\n".join(web) + "\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, text in (("books/c.txt", "Gamma, archived."), ("books/d.txt", "Delta, archived and val.")):
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    (root / "books.tar.xz").write_bytes(buf.getvalue())
    # folder order is sorted: a.txt, books.tar.xz (c, d), sub/b.txt, web.jsonl (2 documents)
    (root.parent / "VAL.txt").write_text("corpus/sub/b.txt\nd.txt\n")  # like shared/data/corpus/VAL.txt: folder/name
    return (["Alpha book.\n\nIt ends here.\n", "Gamma, archived.", "Web one.", "Wéb twö ✓"],
            ["Delta, archived and val.", "Beta  book,  with   spaces\tand tabs."])


def test_text_tree_with_val_list_round_trips_and_skips_when_up_to_date(tmp_path, enc, capsys):
    train, val = make_tree(tmp_path / "in")
    run(tmp_path, "text", tmp_path / "in", "--val-list", tmp_path / "VAL.txt", "--name", "tree", workers=2)
    out = tmp_path / "data" / "tree"
    assert decoded(enc, out, "train") == "".join(doc + EOT for doc in train)
    assert decoded(enc, out, "val") == "".join(doc + EOT for doc in val)
    assert not (out / "test.bin").exists()
    meta = json.loads((out / "meta.json").read_text())
    for split, docs in (("train", train), ("val", val)):
        assert meta["splits"][split] == {"documents": len(docs),
                                         "tokens": sum(len(enc.encode_ordinary(d)) + 1 for d in docs)}
    assert meta["vocab_size"] == enc.n_vocab and meta["eot_token"] == enc.eot_token == 0
    assert meta["tokenizer_sha256"] == "56ac4821e129d2c520fdaba60abd920fa852ada51b45c0dd52bbb6bd8c985ade"
    assert meta["command"].startswith("python prepare.py text ")

    stamps = {p.name: p.stat().st_mtime_ns for p in files(out)}
    capsys.readouterr()
    run(tmp_path, "text", tmp_path / "in", "--val-list", tmp_path / "VAL.txt", "--name", "tree")
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in files(out)} == stamps

    (tmp_path / "in" / "a.txt").write_text("Alpha, revised.")
    run(tmp_path, "text", tmp_path / "in", "--val-list", tmp_path / "VAL.txt", "--name", "tree")
    assert "up to date" not in capsys.readouterr().out
    assert decoded(enc, out, "train").startswith("Alpha, revised." + EOT + "Gamma")


def test_val_and_test_files_and_val_fraction(tmp_path, enc):
    docs = [f"Document number {i}." for i in range(40)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "held.txt").write_text("Held out for test.")
    run(tmp_path, "text", tmp_path / "docs.jsonl", "--test", tmp_path / "held.txt", "--val-fraction", "0.1")
    out = tmp_path / "data" / "docs"  # the name comes from the first input
    picked = sources.val_mask(40, 0.1, 2357)
    assert picked.sum() == 4
    assert decoded(enc, out, "val") == "".join(d + EOT for d, v in zip(docs, picked) if v)
    assert decoded(enc, out, "train") == "".join(d + EOT for d, v in zip(docs, picked) if not v)
    assert decoded(enc, out, "test") == "Held out for test." + EOT
    # one document (tiny shakespeare): cut at a line start, the first 1 - F of its text for train
    lines = [f"Line {i} of the play.\n" for i in range(100)]
    (tmp_path / "play.txt").write_text("".join(lines))
    run(tmp_path, "text", tmp_path / "play.txt", "--val-fraction", "0.1")
    assert decoded(enc, tmp_path / "data" / "play", "train") == "".join(lines[:91]) + EOT
    assert decoded(enc, tmp_path / "data" / "play", "val") == "".join(lines[91:]) + EOT
    # eval-only data: everything in val, no train.bin
    run(tmp_path, "text", "--val", tmp_path / "docs.jsonl", "--name", "evalonly")
    assert [p.name for p in files(tmp_path / "data" / "evalonly")] == ["meta.json", "val.bin"]


def test_cutting_long_documents_keeps_the_tokens_of_the_whole(enc):
    """Long documents (and WikiText's one document per split, fed line by line) are tokenized in pieces; the
    pieces must give exactly the ids of the whole text, with one <|endoftext|> at the end."""
    web = [json.loads(line)["text"] for line in (SHARED / "openwebtext" / "owt10k_val500.jsonl").open()][:40]
    tricky = "x  \n  y \t z   w\n\n\n  end   . Cafe\u0301 \u0301a 'll 's  's \u00a0 word \u3000 ok " * 50
    text = WIKI_VALID.read_text()[:200_000] + "\n\n".join(web) + tricky
    expected = enc.encode_ordinary(text) + [enc.eot_token]
    whole = list(prepare._tasks([("val", text, True, 0)], size=3_000))
    lines = list(prepare._tasks([("val", line, False, 0) for line in text.splitlines(keepends=True)]
                                + [("val", "", True, 0)], size=3_000))
    for tasks in (whole, lines):
        assert len(tasks) > 50
        result = [prepare._encode_task(enc, task)[0]["val"] for task, _ in tasks]
        assert np.concatenate([ids for ids, _ in result]).tolist() == expected
        assert sum(docs for _, docs in result) == 1


# -- hub datasets ----------------------------------------------------------------------------------------------

def parquet(texts):
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=100)
    return buf.getvalue()


@pytest.fixture
def fakehub(tmp_path, monkeypatch):
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        yield hub


def test_wikitext2_from_the_hub_gives_the_raw_files_tokens(tmp_path, enc, fakehub):
    """HF's WikiText rows are the raw file's lines with blank lines (" \\n") as "": joined back, each split is one
    document whose tokens are those of the raw file."""
    lines = WIKI_VALID.read_text().splitlines(keepends=True)
    raw = {"train": lines[:1500], "validation": lines[1500:2500], "test": lines[2500:]}
    for split, part in raw.items():
        rows = ["" if line == " \n" else line for line in part]
        fakehub.add_file("Salesforce/wikitext", f"wikitext-2-raw-v1/{split}-00000-of-00001.parquet", parquet(rows),
                         repo_type="dataset")
    fakehub.add_file("Salesforce/wikitext", "wikitext-103-raw-v1/train-00000-of-00002.parquet", parquet(["other"]),
                     repo_type="dataset")
    fakehub.add_file("Salesforce/wikitext", "README.md", b"# card", repo_type="dataset")
    run(tmp_path, "wikitext2")
    out = tmp_path / "data" / "wikitext2"
    for split, ours in (("train", "train"), ("validation", "val"), ("test", "test")):
        ids = np.fromfile(out / f"{ours}.bin", dtype=np.uint16).tolist()
        assert ids == enc.encode_ordinary("".join(raw[split])) + [enc.eot_token]
    assert not any("wikitext-103" in path for _, path in fakehub.requests)


def test_openwebtext_holds_out_a_seeded_val_and_shakespeare_uses_the_parquet_branch(tmp_path, enc, fakehub):
    docs = [f"Web page {i} says hello." for i in range(2100)]  # 0.05% of 2100 -> 2 val documents
    fakehub.add_file("Skylion007/openwebtext", "plain_text/train-00000-of-00002.parquet", parquet(docs[:1000]),
                     repo_type="dataset")
    fakehub.add_file("Skylion007/openwebtext", "plain_text/train-00001-of-00002.parquet", parquet(docs[1000:]),
                     repo_type="dataset")
    run(tmp_path, "openwebtext")
    picked = np.random.default_rng(2357).permutation(2100)[:2]  # HF train_test_split(test_size=0.0005, seed=2357)
    out = tmp_path / "data" / "openwebtext"
    assert decoded(enc, out, "val") == "".join(docs[i] + EOT for i in sorted(picked))
    assert decoded(enc, out, "train") == "".join(d + EOT for i, d in enumerate(docs) if i not in picked)

    for split, text in (("train", "First Citizen:\nBefore we proceed"), ("validation", "ROMEO:\nSoft!"),
                        ("test", "JULIET:\nO Romeo")):
        fakehub.add_file("karpathy/tiny_shakespeare", f"default/{split}/0000.parquet", parquet([text]),
                         revision="refs/convert/parquet", repo_type="dataset")
    run(tmp_path, "shakespeare")
    assert decoded(enc, tmp_path / "data" / "shakespeare", "val") == "ROMEO:\nSoft!" + EOT


# -- errors ----------------------------------------------------------------------------------------------------

def test_errors_name_the_problem_and_the_fix(tmp_path, monkeypatch):
    msg = error(tmp_path, "nope")
    assert "unknown dataset 'nope'" in msg and "openwebtext, wikitext2, wikitext103, shakespeare" in msg
    assert "missing.txt: no such file" in error(tmp_path, "text", tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    assert "no documents in" in error(tmp_path, "text", tmp_path / "empty")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    assert "no text in" in error(tmp_path, "text", tmp_path / "blank")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    msg = error(tmp_path, "text", tmp_path / "bad.txt")
    assert "bad.txt: not UTF-8 at byte offset 3" in msg and "--errors replace" in msg
    assert not (tmp_path / "data" / "bad").exists() or not files(tmp_path / "data" / "bad")
    jsonl = b'{"text": "fine"}\n{"text": "caf\xe9"}\n'
    (tmp_path / "bad.jsonl").write_bytes(jsonl)  # the offset is the bad byte's within the file
    msg = error(tmp_path, "text", tmp_path / "bad.jsonl")
    assert f"bad.jsonl line 2: not UTF-8 at byte offset {jsonl.index(0xE9)}" in msg
    (tmp_path / "good.txt").write_text("Fine.")
    (tmp_path / "VAL.txt").write_text("good.txt\nnot-there.txt\n")
    assert "no PATH input has a document named not-there.txt" in error(
        tmp_path, "text", tmp_path / "good.txt", "--val-list", tmp_path / "VAL.txt")
    assert "are for 'text'" in error(tmp_path, "shakespeare", tmp_path / "bad.txt")

    def huge_vocab(name_or_path):  # ids up to 70000 cannot be stored as uint16
        return tiktoken.Encoding("huge", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                                 special_tokens={EOT: 70_000})
    monkeypatch.setattr(prepare, "load_tokenizer", huge_vocab)
    assert "70001 tokens" in error(tmp_path, "text", tmp_path / "blank")


def test_errors_replace_reads_bad_bytes_and_a_failed_run_keeps_the_old_data(tmp_path, enc):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    run(tmp_path, "text", tmp_path / "bad.txt", "--errors", "replace")
    out = tmp_path / "data" / "bad"
    assert decoded(enc, out, "train") == "caf\ufffd au lait" + EOT
    before = {p.name: p.read_bytes() for p in files(out)}
    with pytest.raises(ValueError, match="not UTF-8"):  # same output folder, strict this time: it fails ...
        run(tmp_path, "text", tmp_path / "bad.txt")
    assert {p.name: p.read_bytes() for p in files(out)} == before  # ... and leaves the old data as it was


# -- data.py ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stride", [None, 32, 7, 1])
def test_eval_windows_score_every_token_once(stride):
    tokens = np.arange(1000, dtype=np.uint16)  # token value == position, so scored positions are easy to read
    scored = []
    for i, (x, y) in enumerate(eval_windows(tokens, 32, stride=stride, max_tokens=500)):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and 1 <= x.shape[1] <= 32
        assert torch.equal(x[0], x[0, 0] + torch.arange(x.shape[1]))  # a contiguous run of the tokens
        keep = y[0] != -1
        assert torch.equal((x[0] + 1)[keep], y[0][keep])  # targets are the next tokens
        if i > 0:  # after the first window, only the last `stride` tokens are new; the rest is context
            assert keep.sum() <= (stride or 32) and not keep[:32 - (stride or 32)].any()
        scored += y[0][keep].tolist()
    assert scored == list(range(1, 500))


def test_random_batch_is_windows_and_their_next_tokens():
    tokens = np.arange(100, dtype=np.uint16)
    for rng in (np.random.default_rng(0), torch.Generator().manual_seed(0)):
        x, y = data.random_batch(tokens, 4, 16, rng)
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x, x[:, :1] + torch.arange(16)) and torch.equal(y, x + 1)
    a = data.random_batch(tokens, 4, 16, np.random.default_rng(1))[0]
    assert torch.equal(a, data.random_batch(tokens, 4, 16, np.random.default_rng(1))[0])
    with pytest.raises(ValueError, match="too few"):
        data.random_batch(tokens, 4, 100, np.random.default_rng(0))


def test_loading_prepared_data_and_its_errors(tmp_path, enc):
    assert data.resolve_data_dir("gutenberg") == Path("data/gutenberg")
    assert data.resolve_data_dir("gutenberg", root="/d") == Path("/d/gutenberg")
    assert data.resolve_data_dir("./gutenberg") == Path("gutenberg")
    with pytest.raises(FileNotFoundError, match=r"python prepare.py owt --out-dir .*python prepare.py text PATH"):
        data.load_split(tmp_path / "owt", "val")

    (tmp_path / "owt.jsonl").write_text(json.dumps({"text": "A page."}) + "\n")
    run(tmp_path, "text", "--val", tmp_path / "owt.jsonl")
    folder = tmp_path / "data" / "owt"
    assert data.load_split(folder, "val").tolist() == enc.encode_ordinary("A page.") + [enc.eot_token]
    with pytest.raises(ValueError, match=r"no 'train' split \(it has: val\)"):
        data.load_split(folder, "train")

    meta = data.load_meta(folder)
    sha = data.tokenizer_sha256(str(TOKENIZER))
    data.check_compatible(meta, tokenizer_sha256=sha, vocab_size=50304)
    with pytest.raises(ValueError, match="python prepare.py text --val .* --tokenizer set to the model's tokenizer"):
        data.check_compatible(folder, tokenizer_sha256="0" * 64)
    with pytest.raises(ValueError, match="model has vocab_size 1000"):
        data.check_compatible(meta, vocab_size=1000)


# -- concurrent runs, splits too small to score, names that leave --out-dir (issue 28) -------------------------

def refused(tmp_path, capsys, *argv):
    """prepare.py's one error line (cli.run: exit 2, no traceback)."""
    with pytest.raises(SystemExit) as e:
        cli.run(prepare.main, [*map(str, argv), "--tokenizer", str(TOKENIZER), "--out-dir", str(tmp_path / "data"),
                               "--workers", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("prepare.py: error: "), err
    return lines[0]


def test_a_second_writer_of_a_dataset_folder_is_refused_and_a_killed_ones_leftovers_go(tmp_path, enc, capsys):
    (tmp_path / "a.txt").write_text("First input. " * 1000)  # 3000 tokens: over the default --min-tokens
    run(tmp_path, "text", tmp_path / "a.txt", "--name", "books", min_tokens=None)
    out = tmp_path / "data" / "books"
    before = {p.name: p.read_bytes() for p in files(out)}
    (tmp_path / "b.txt").write_text("Other input. " * 1000)
    with out_dir_lock(out):  # another prepare.py is writing books/ now
        err = refused(tmp_path, capsys, "text", tmp_path / "b.txt", "--name", "books")
    assert f"dataset folder {out} is in use by another run (pid {os.getpid()}" in err and "--name" in err, err
    assert {p.name: p.read_bytes() for p in files(out)} == before  # nothing of the other run's lost

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(f"{dead.pid}\n")  # left by a prepare.py killed mid-write, with its temp file ...
    (out / f"train.bin.{dead.pid}.tmp").write_bytes(b"half")
    (out / f"train.bin.{os.getppid()}.tmp").write_bytes(b"live")  # ... and one of a live process: not this run's
    run(tmp_path, "text", tmp_path / "b.txt", "--name", "books", min_tokens=None)
    err = capsys.readouterr().err
    assert f"taking over the stale lock of pid {dead.pid}" in err and f"left by a killed run (pid {dead.pid})" in err
    assert decoded(enc, out, "train") == "Other input. " * 1000 + EOT
    assert sorted(p.name for p in out.glob("*.tmp")) == [f"train.bin.{os.getppid()}.tmp"]


def test_a_split_too_small_to_score_is_refused_naming_it_its_size_and_the_fix(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("A single line of text with no newline at all, which goes to train whole.")
    err = refused(tmp_path, capsys, "text", tmp_path / "one.txt", "--val-fraction", "0.1")
    assert "the train split would hold" in err and "fewer than --min-tokens 2049" in err, err
    err = refused(tmp_path, capsys, "text", tmp_path / "one.txt", "--val-fraction", "0.1", "--min-tokens", "8")
    assert "the val split would hold 1 tokens" in err and "--val-fraction than 0.1" in err, err
    assert not (tmp_path / "data" / "one").exists() or not files(tmp_path / "data" / "one")
    assert "--min-tokens 1 must be at least 2" in refused(tmp_path, capsys, "text", tmp_path / "one.txt",
                                                          "--min-tokens", "1")


@pytest.mark.parametrize("name", ["../escaped", "ABSOLUTE", "a/../../escaped", "..", ""])
def test_a_name_that_would_leave_out_dir_is_refused(tmp_path, capsys, name):
    name = str(tmp_path / "escaped") if name == "ABSOLUTE" else name
    (tmp_path / "a.txt").write_text("Some text. " * 10)
    err = refused(tmp_path, capsys, "text", tmp_path / "a.txt", "--name", name)
    assert f"--name {name!r}: a dataset's name is one folder name" in err and "--out-dir" in err, err
    assert not (tmp_path / "escaped").exists() and not list(tmp_path.glob("data/**/*.bin"))
