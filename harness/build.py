"""The offline harness tasks' data, built deterministically from ../shared/data (`python prepare.py harness`).

    python prepare.py harness                      # -> data/harness/{wikitext2,gutenberg}/*.jsonl
    python prepare.py harness --shared /path/to/shared/data --out-dir data/harness --seed 1234

wikitext2/{validation,test}.jsonl  WikiText-2 raw split into articles exactly as EleutherAI/wikitext_document_level
    (the official `wikitext` task's data) does: a line that reads "= Title =" (after "= =" -> "==") starts a page;
    pages are the raw lines joined by "\\n" (62 test pages, 60 validation). Fields: page (what the official task's
    functions read) and text (the same string, for `prepare.py text --test wikitext2/test.jsonl`).
gutenberg/lambada.jsonl  LAMBADA-style passages from the 12 validation books (corpus/VAL.txt): consecutive
    paragraphs (whitespace collapsed, _italics_ marks dropped, paragraphs with [notes] skipped) joined until they
    reach 50 words (over 150: dropped), ending a sentence whose last word is alphabetic, 3+ letters, and occurs in
    the passage before. Field text = the passage without the final punctuation: the target is its last
    space-separated word, as in lambada_openai.
gutenberg/next_sentence.jsonl  multiple choice: context = 40+ words of consecutive sentences, choices = the true
    next sentence and three sentences (5-40 words, like it) of the same book at least 20 sentences away, picked as
    the nearest in length among 30 drawn at random, so length gives nothing away. Fields context, choices, label.
Sentences: split after . ! ? (and a closing quote) before a capital or an opening quote; abbreviations like
"Mr." stay unsplit. Passages and items are drawn with numpy's default_rng(seed) and kept in book order.
"""
import argparse
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from cli import write_atomic
from corpora.sources import read_val_list, text_source

SENTENCE_END = re.compile(r"""(?:(?<=[.!?])|(?<=[.!?]["'\u2019\u201d]))\s+(?=["'\u2018\u201c]?[A-Z])""")
ABBREVIATIONS = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|St|Mt|Jr|Sr|Capt|Col|Gen|Lt|Rev|Prof|No|vs)\.$")
LAST_WORD = re.compile(r"([A-Za-z]{3,})[.!?][\"'\u2019\u201d]*")
WORD = re.compile(r"[A-Za-z]+")


def wikitext_pages(text):
    """EleutherAI/wikitext_document_level's pages of a raw WikiText file."""
    pages, lines = [], []
    for line in text.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def paragraphs(book):
    """A book's paragraphs, each on one line with single spaces; [notes] and headings-only lines skipped."""
    out = []
    for block in re.split(r"\n\s*\n", book.replace("\r\n", "\n")):
        para = " ".join(block.replace("_", "").split())
        if para and "[" not in para and "]" not in para and re.search(r"[.!?][\"'\u2019\u201d]*$", para):
            out.append(para)
    return out


def sentences(para):
    parts, out = SENTENCE_END.split(para), []
    for part in parts:  # rejoin the cuts after an abbreviation ("Mr. Smith")
        if out and ABBREVIATIONS.search(out[-1]):
            out[-1] += " " + part
        else:
            out.append(part)
    return out


def lambada_passages(books):
    """Every LAMBADA-style passage of the books, in order (see the module docstring)."""
    out = []
    for book in books:
        words = []
        for para in paragraphs(book):
            words += para.split(" ")
            if len(words) < 50:
                continue
            last = LAST_WORD.fullmatch(words[-1])
            seen = {w.lower() for w in WORD.findall(" ".join(words[:-1]))}
            if len(words) <= 150 and last and last.group(1).lower() in seen:
                out.append({"text": " ".join(words[:-1] + [last.group(1)])})
            words = []
    return out


def next_sentence_items(books, rng):
    """Every next-sentence item of the books, in order (see the module docstring)."""
    out = []
    for book in books:
        sents = [s for para in paragraphs(book) for s in sentences(para)]
        nwords = np.array([len(s.split()) for s in sents])
        ok = np.flatnonzero((nwords >= 5) & (nwords <= 40))  # sentences fit to be a choice
        i = 1
        while i < len(sents):
            j = i
            while j > 0 and nwords[j:i].sum() < 40:
                j -= 1
            far = ok[np.abs(ok - i) > 20]
            if nwords[j:i].sum() < 40 or not 5 <= nwords[i] <= 40 or len(far) < 30:
                i += 1
                continue
            pool = [k for k in rng.choice(far, 30, replace=False) if sents[k] != sents[i]]
            pool.sort(key=lambda k: (abs(len(sents[k]) - len(sents[i])), k))
            choices = [sents[k] for k in pool[:3]]
            label = int(rng.integers(4))
            choices.insert(label, sents[i])
            out.append({"context": " ".join(sents[j:i]), "choices": choices, "label": label})
            i += 8  # items do not share sentences
    return out


def pick(items, n, rng):
    """n of the items (all if fewer), drawn at random and kept in their order."""
    return items if len(items) <= n else [items[k] for k in sorted(rng.choice(len(items), n, replace=False))]


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    print(f"{path}: {len(records):,} records")


def val_books(shared):
    """The text of the validation books (corpus/VAL.txt) of corpus/gutenberg.tar.xz, read as prepare.py reads it."""
    archive, val_list = shared / "corpus" / "gutenberg.tar.xz", shared / "corpus" / "VAL.txt"
    args = SimpleNamespace(val_fraction=None, errors="strict", val_list=str(val_list))
    _, segments = text_source([(archive, None)], read_val_list(val_list), args)
    return [text for split, text, _, _ in segments if split == "val"]


def build(shared, out, seed=1234, lambada=2000, next_sentence=2000):
    shared, out = Path(shared), Path(out)
    for split, name in (("validation", "valid"), ("test", "test")):
        raw = shared / "wikitext" / "wikitext-2-raw" / f"wiki.{name}.raw"
        if not raw.is_file():
            raise FileNotFoundError(f"{raw} not found: pass --shared with the shared data folder")
        write_jsonl(out / "wikitext2" / f"{split}.jsonl",
                    [{"page": p, "text": p} for p in wikitext_pages(raw.read_text(encoding="utf-8"))])
    books = val_books(shared)
    write_jsonl(out / "gutenberg" / "lambada.jsonl", pick(lambada_passages(books), lambada, np.random.default_rng(seed)))
    write_jsonl(out / "gutenberg" / "next_sentence.jsonl",
                pick(next_sentence_items(books, np.random.default_rng(seed)), next_sentence,
                     np.random.default_rng(seed + 1)))


def main(argv=None):
    p = argparse.ArgumentParser(prog="prepare.py harness", description=__doc__.split("\n\n")[0])
    p.add_argument("--shared", default="../shared/data", help="the shared offline data folder")
    p.add_argument("--out-dir", default="data/harness", help="where the JSONL files go (the task YAMLs read here)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lambada", type=int, default=2000, help="passages to keep")
    p.add_argument("--next-sentence", type=int, default=2000, help="items to keep")
    args = p.parse_args(argv)
    build(args.shared, args.out_dir, args.seed, args.lambada, args.next_sentence)
