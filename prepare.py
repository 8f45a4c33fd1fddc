"""Tokenize a dataset into data/NAME/{train,val,test}.bin (flat uint16 token ids) + meta.json, nanoGPT style.

    python prepare.py shakespeare          # hub datasets: openwebtext, wikitext2, wikitext103, shakespeare
    python prepare.py text books/ more.tar.xz --val-list VAL.txt --name books      # local text
    python prepare.py text --val wiki.valid.raw --test wiki.test.raw --name wikitext2

Local text: a .txt file (or any file named on the command line that is not .jsonl or an archive) is one
document; a .jsonl holds one document per line in its "text" field; folders are searched recursively for .txt,
.jsonl and .tar.xz/.tar.gz/.tgz archives of them (read as a stream, never extracted), in sorted order. Documents
go to train, except those of --val/--test files and those picked by --val-list (basenames; a .jsonl's documents
take the .jsonl's name) or --val-fraction (HF datasets' train_test_split pick: the first ceil(F*n) of a seeded
permutation; a lone document is cut instead: its lines up to 1 - F of its text are train, the rest val, like
nanoGPT's shakespeare). Only splits that get documents are written.

Every document is followed by <|endoftext|> (nanoGPT's convention), so a window that starts mid-document
still sees the boundary token before the next one. Document order within a split is the source's order.
WikiText rows are the lines of the raw files, blank lines stored as "": they are joined back (blank -> " \\n"),
so each split is one document with the raw file's exact text and tokens (one <|endoftext|> at its end).
OpenWebText has only a train split; like nanoGPT, 0.05% of its documents (seed 2357) are held out as val.
"""
import argparse
import json
import math
import multiprocessing
import os
import re
import shlex
import sys
import tarfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

import hub
from data import SPLITS, tokenizer_sha256
from tokenizer import load_tokenizer

TASK_CHARS = 1 << 20  # text per worker task: amortizes inter-process copies, keeps memory small
ARCHIVES = (".tar.xz", ".tar.gz", ".tgz")
# Where text may be cut and the parts tokenized apart with the same ids as the whole: before a lone space that
# starts a word. GPT-2-style pre-tokenizers always begin a pre-token at " X", and a lone space is no part of the
# multi-space added tokens of GPT-NeoX.
_SAFE_CUT = re.compile(r"(?<! ) (?=\S)")


@dataclass(frozen=True)
class HubDataset:
    repo: str
    revision: str
    prefix: str  # the config's folder of parquet files, named by split: train*, validation*, test*
    val_fraction: float = 0.0  # held out of train into val, for datasets that have no validation split
    lines: bool = False  # rows are the lines of one text per split (WikiText)


HUB_SPLITS = {"train": "train", "validation": "val", "test": "test"}  # hub split name -> ours
HUB_DATASETS = {
    "openwebtext": HubDataset("Skylion007/openwebtext", "main", "plain_text/", val_fraction=0.0005),
    "wikitext2": HubDataset("Salesforce/wikitext", "main", "wikitext-2-raw-v1/", lines=True),
    "wikitext103": HubDataset("Salesforce/wikitext", "main", "wikitext-103-raw-v1/", lines=True),
    "shakespeare": HubDataset("karpathy/tiny_shakespeare", "refs/convert/parquet", "default/"),
}


def val_mask(n, fraction, seed):
    """Which of n documents are val: the first ceil(fraction * n) of a seeded permutation, the pick of HF datasets'
    train_test_split(test_size=fraction, seed=seed) that nanoGPT's openwebtext/prepare.py makes (seed 2357)."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:math.ceil(fraction * n)]] = True
    return mask


# -- local text ------------------------------------------------------------------------------------------------

def _text_files(args):
    """(file, split or None) for every input file, folders expanded; None: train unless --val-list/fraction pick it."""
    files = []
    for split, paths in ((None, args.paths), ("val", args.val), ("test", args.test)):
        for path in map(Path, paths):
            if path.is_dir():
                found = (p for p in path.rglob("*") if p.is_file() and p.name.endswith((".txt", ".jsonl") + ARCHIVES))
                files += [(p, split) for p in sorted(found)]
            elif path.is_file():
                files.append((path, split))
            else:
                raise ValueError(f"{path}: no such file or directory")
    return files


def _decode(data, where, offset, errors):
    try:
        return data.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 at byte offset {offset + e.start} (byte {data[e.start]:#04x}); fix the "
                         "file, or pass --errors replace to read bad bytes as U+FFFD") from None


def _read_val_list(path):
    names = {PurePosixPath(line.strip()).name for line in Path(path).read_text().splitlines() if line.strip()}
    if not names:
        raise ValueError(f"--val-list {path} names no documents")
    return names


def _file_documents(name, f, raw, where, errors):
    """(name, text, bytes of raw read so far) per document of a .txt or .jsonl file object f; raw is the file on
    disk, whose position shows progress even through decompression."""
    if not name.endswith(".jsonl"):
        yield name, _decode(f.read(), where, 0, errors), raw.tell()
        return
    offset = 0
    for number, line in enumerate(f, 1):
        if line.strip():
            try:
                record = json.loads(_decode(line, f"{where} line {number}", offset, errors))
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} line {number}: not JSON ({e})") from None
            if not (isinstance(record, dict) and isinstance(record.get("text"), str)):
                raise ValueError(f"{where} line {number}: expected an object with a string 'text' field")
            yield name, record["text"], raw.tell()
        offset += len(line)


def _documents(path, errors):
    """Every document of one input file: a text file, a .jsonl, or an archive of .txt/.jsonl files."""
    with open(path, "rb") as raw:
        if not path.name.endswith(ARCHIVES):
            yield from _file_documents(path.name, raw, raw, str(path), errors)
            return
        with tarfile.open(fileobj=raw, mode="r|*") as tar:  # stream mode: members in archive order, nothing on disk
            for member in tar:
                if member.isfile() and member.name.endswith((".txt", ".jsonl")):
                    yield from _file_documents(PurePosixPath(member.name).name, tar.extractfile(member), raw,
                                               f"{path}:{member.name}", errors)


def _text_source(files, val_names, args):
    """(input bytes, segments): every document with its split, and the input bytes read so far for the ETA."""
    picked, lone = None, False
    if args.val_fraction:  # the pick needs the number of documents first: count them
        n = sum(1 for path, forced in files if forced is None for _ in _documents(path, args.errors))
        picked, lone = iter(val_mask(n, args.val_fraction, args.seed)), n == 1 and args.val_fraction < 1

    def segments():
        done, seen = 0, set()
        for path, forced in files:
            for name, text, pos in _documents(path, args.errors):
                if lone and not forced:  # one document (tiny shakespeare): cut it, as nanoGPT does, keeping train
                    cut = text.find("\n", int(len(text) * (1 - args.val_fraction))) + 1 or len(text)
                    yield "train", text[:cut], True, done + pos
                    yield "val", text[cut:], True, done + pos
                    continue
                if forced:
                    split = forced
                elif val_names is not None:
                    split = "val" if name in val_names else "train"
                    seen.add(name)
                else:
                    split = "val" if picked is not None and next(picked) else "train"
                yield split, text, True, done + pos
            done += path.stat().st_size
        if val_names is not None and val_names - seen:  # checked before any output replaces the old one
            raise ValueError(f"--val-list {args.val_list}: no PATH input has a document named "
                             f"{', '.join(sorted(val_names - seen))}")
    return sum(path.stat().st_size for path, _ in files), segments()


# -- hub datasets (parquet) ------------------------------------------------------------------------------------

def _hub_files(spec):
    """[(parquet file, our split)] of the dataset's config, sorted."""
    files = [f for f in hub.list_repo_files(spec.repo, spec.revision, repo_type="dataset")
             if f.startswith(spec.prefix) and f.endswith(".parquet")]
    if not files:
        raise ValueError(f"dataset {spec.repo} at revision {spec.revision!r} has no parquet files under {spec.prefix}")
    out = []
    for f in files:
        rest = f[len(spec.prefix):]  # "train-00000-of-00001.parquet" or "train/0000.parquet"
        name = rest.split("/")[0] if "/" in rest else rest.split("-")[0]
        if name not in HUB_SPLITS:
            raise ValueError(f"{spec.repo}: {f}: split {name!r} is not one of {', '.join(HUB_SPLITS)}")
        out.append((f, HUB_SPLITS[name]))
    return out


def _hub_source(spec, files, seed):
    """Download the parquet files; (rows, segments) reading them a record batch at a time."""
    import pyarrow.parquet as pq  # only hub datasets need pyarrow

    parquet = []
    for f, split in files:
        pf = pq.ParquetFile(hub.hf_hub_download(spec.repo, f, spec.revision, repo_type="dataset"))
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"{spec.repo}: {f} has no 'text' column (it has {', '.join(pf.schema_arrow.names)})")
        parquet.append((pf, split))
    train_rows = [pf.metadata.num_rows if split == "train" else 0 for pf, split in parquet]
    held_out = val_mask(sum(train_rows), spec.val_fraction, seed)  # all False without a val_fraction
    starts = np.cumsum([0] + train_rows)  # each file's first index into held_out

    def segments():
        done = 0  # rows read
        for i, ((pf, split), row) in enumerate(zip(parquet, starts)):
            for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
                texts = batch.column(0).to_pylist()
                done += len(texts)
                if spec.lines:  # one document per split, fed in pieces that _tasks joins and cuts
                    yield split, "".join(t or " \n" for t in texts), False, done
                    continue
                for t in texts:
                    yield "val" if split == "train" and held_out[row] else split, t or "", True, done
                    row += 1
            if spec.lines and (i + 1 == len(parquet) or parquet[i + 1][1] != split):
                yield split, "", True, done
    return sum(pf.metadata.num_rows for pf, _ in parquet), segments()


# -- tokenizing ------------------------------------------------------------------------------------------------

def _tasks(segments, size=TASK_CHARS):
    """Group (split, text, ends document, input done) segments into (task, input done), a task being a list of
    (split, text, ends document) of about size characters. The text of one document collects until it ends or
    passes 2 * size, and is then cut at _SAFE_CUT points into pieces of about size."""
    task, task_chars, doc = [], 0, []
    for split, text, end, done in segments:
        doc.append(text)
        if not end and sum(map(len, doc)) < 2 * size:
            continue
        text, pieces, start = "".join(doc), [], 0
        while len(text) - start > size and (cut := _SAFE_CUT.search(text, start + size)):
            pieces.append(text[start:cut.start()])
            start = cut.start()
        pieces.append(text[start:])
        doc = [] if end else [pieces.pop()]  # an unfinished document keeps its tail for the next segments
        for i, piece in enumerate(pieces):
            task.append((split, piece, end and i == len(pieces) - 1))
            task_chars += len(piece)
            if task_chars >= size:
                yield task, done
                task, task_chars = [], 0
    if task:
        yield task, done


def _encode_task(enc, task):
    """({split: (uint16 ids, eot after each finished document; documents finished)}, UTF-8 bytes of the text)."""
    ids = enc.encode_ordinary_batch([text for _, text, _ in task], num_threads=1)  # threads: no faster than 1
    flat, docs = {}, {}
    for (split, _, end), piece_ids in zip(task, ids):
        flat.setdefault(split, []).extend(piece_ids + [enc.eot_token] if end else piece_ids)
        docs[split] = docs.get(split, 0) + end
    nbytes = sum(len(text.encode("utf-8", "replace")) for _, text, _ in task)
    return {split: (np.array(flat[split], dtype=np.uint16), docs[split]) for split in flat}, nbytes


_worker_enc = None  # the tokenizer of a worker process, loaded once by _init_worker


def _init_worker(tokenizer):
    global _worker_enc
    _worker_enc = load_tokenizer(tokenizer)


def _encode_in_worker(task):
    return _encode_task(_worker_enc, task)


def _encoded(enc, tokenizer, tasks, workers):
    """(_encode_task result, input done) per task, in order. Pool.imap would read the whole input ahead of slow
    workers; here at most 2 tasks per worker are in flight, so memory stays bounded however large the input."""
    if workers == 1:
        yield from ((_encode_task(enc, task), done) for task, done in tasks)
        return
    with multiprocessing.Pool(workers, _init_worker, (tokenizer,)) as pool:
        pending = deque()
        for task, done in tasks:
            pending.append((pool.apply_async(_encode_in_worker, (task,)), done))
            if len(pending) >= 2 * workers:
                result, done = pending.popleft()
                yield result.get(), done
        for result, done in pending:
            yield result.get(), done


class _Progress:
    """Documents, tokens/s, MB of text, input done and ETA on stderr: redrawn in place on a terminal, a line
    every 30 s in logs."""

    def __init__(self, total):
        self.total, self.t0, self.shown, self.tty = total, time.monotonic(), 0.0, sys.stderr.isatty()

    def show(self, counts, text_bytes, done, final=False):
        now = time.monotonic()
        if not final and now - self.shown < (0.5 if self.tty else 30):
            return
        self.shown, seconds = now, max(now - self.t0, 1e-9)
        docs, tokens = (sum(c[key] for c in counts.values()) for key in ("documents", "tokens"))
        eta = f", ETA {seconds * (self.total - done) / done:.0f} s" if done and not final else ""
        print(f"{docs:,} docs, {tokens:,} tokens, {tokens / seconds / 1e6:.2f}M tokens/s, {text_bytes / 1e6:.1f} MB "
              f"of text, {done / max(self.total, 1):.0%} of the input{eta}",
              end="\n" if final or not self.tty else "\r", file=sys.stderr, flush=True)


def _write(out, enc, tokenizer, segments, total, workers):
    """Stream token ids into out/SPLIT.bin.tmp files; returns {split: {"tokens", "documents"}}."""
    counts, files, text_bytes, progress = {}, {}, 0, _Progress(total)
    try:
        for (result, nbytes), done in _encoded(enc, tokenizer, _tasks(segments), workers):
            for split, (ids, docs) in result.items():
                if split not in files:
                    files[split] = open(out / f"{split}.bin.tmp", "wb")
                    counts[split] = {"tokens": 0, "documents": 0}
                ids.tofile(files[split])
                counts[split]["tokens"] += len(ids)
                counts[split]["documents"] += docs
            text_bytes += nbytes
            progress.show(counts, text_bytes, done)
    finally:
        for f in files.values():
            f.close()
    progress.show(counts, text_bytes, total, final=True)
    return {split: counts[split] for split in SPLITS if split in counts}


# -- command line ----------------------------------------------------------------------------------------------

def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=f"hub datasets: {', '.join(HUB_DATASETS)}")
    p.add_argument("dataset", help=f"one of {', '.join(HUB_DATASETS)}, or 'text' for local files")
    p.add_argument("paths", nargs="*", metavar="PATH", help="text: .txt/.jsonl files, folders, .tar.xz/.tar.gz/.tgz")
    for split in ("val", "test"):
        p.add_argument(f"--{split}", nargs="+", action="extend", default=[], metavar="PATH",
                       help=f"text: inputs whose documents are all {split}")
    pick = p.add_mutually_exclusive_group()
    pick.add_argument("--val-list", metavar="FILE", help="text: names (basenames) of the val documents, one a line")
    pick.add_argument("--val-fraction", type=float, metavar="F", help="text: put this fraction of documents in val")
    p.add_argument("--seed", type=int, default=2357, help="seed of the --val-fraction pick (and openwebtext's)")
    p.add_argument("--name", help="output folder name (default: the dataset, or for text the first input's stem)")
    p.add_argument("--out-dir", default="data", help="parent of the output folder")
    p.add_argument("--tokenizer", default="EleutherAI/pythia-70m", help="hub id, folder or tokenizer.json path")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes (1: in this process)")
    p.add_argument("--errors", choices=("strict", "replace"), default="strict", help="text that is not UTF-8")
    p.add_argument("--force", action="store_true", help="redo even when meta.json says the output is up to date")
    return p


def _default_name(path):  # "corpus/books.tar.xz" -> "books", "owt.jsonl" -> "owt", "corpus/" -> "corpus"
    return next((Path(path).name.removesuffix(s) for s in ARCHIVES if Path(path).name.endswith(s)), Path(path).stem)


def _up_to_date(out, fingerprint, sha):
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (FileNotFoundError, ValueError):
        return False
    return meta.get("fingerprint") == fingerprint and meta.get("tokenizer_sha256") == sha and all(
        (out / f"{s}.bin").is_file() and (out / f"{s}.bin").stat().st_size == 2 * c["tokens"]
        for s, c in meta["splits"].items())


def prepare(args, argv):
    inputs = args.paths + args.val + args.test
    if args.dataset != "text" and args.dataset not in HUB_DATASETS:
        raise ValueError(f"unknown dataset {args.dataset!r}; known: {', '.join(HUB_DATASETS)}, or 'text' for local "
                         "files")
    if args.dataset == "text" and not inputs:
        raise ValueError("text: name the input files or folders (PATH..., --val PATH, --test PATH)")
    if args.dataset != "text" and (inputs or args.val_list or args.val_fraction is not None):
        raise ValueError(f"{args.dataset} is a hub dataset with its own splits; PATH, --val, --test, --val-list and "
                         "--val-fraction are for 'text'")
    if args.val_fraction is not None and not 0 < args.val_fraction <= 1:
        raise ValueError(f"--val-fraction {args.val_fraction} must be in (0, 1]")
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers} must be at least 1")
    out = Path(args.out_dir) / (args.name or (_default_name(inputs[0]) if args.dataset == "text" else args.dataset))

    sha = tokenizer_sha256(args.tokenizer)
    if args.dataset == "text":
        files, val_names = _text_files(args), _read_val_list(args.val_list) if args.val_list else None
        source = "local text: " + ", ".join(args.paths + [f"{p} (val)" for p in args.val] +
                                            [f"{p} (test)" for p in args.test])
        fingerprint = {"files": [[str(p.resolve()), split, p.stat().st_size, p.stat().st_mtime_ns]
                                 for p, split in files],
                       "val_list": sorted(val_names) if val_names else None,
                       "val_fraction": args.val_fraction, "seed": args.seed, "errors": args.errors}
    else:
        spec = HUB_DATASETS[args.dataset]
        files = _hub_files(spec)
        source = f"hub dataset {spec.repo} at {spec.revision}, {spec.prefix}"
        fingerprint = {"repo": spec.repo, "revision": spec.revision, "files": [f for f, _ in files], "seed": args.seed}
    if not args.force and _up_to_date(out, fingerprint, sha):
        print(f"{out}: up to date (same inputs and tokenizer as its meta.json; --force redoes it)")
        return

    enc = load_tokenizer(args.tokenizer)
    if enc.n_vocab > 1 << 16:
        raise ValueError(f"tokenizer {args.tokenizer} has {enc.n_vocab} tokens: ids above 65535 do not fit the "
                         "uint16 .bin files; use a tokenizer with at most 65536 tokens")
    if args.dataset == "text":
        total, segments = _text_source(files, val_names, args)
    else:
        total, segments = _hub_source(spec, files, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        counts = _write(out, enc, args.tokenizer, segments, total, args.workers)
        where = ", ".join(inputs) if args.dataset == "text" else source
        if not counts:
            raise ValueError(f"no documents in {where} (text: .txt files, .jsonl lines, .tar.xz/.tar.gz/.tgz of them)")
        if all(c["tokens"] == c["documents"] for c in counts.values()):
            raise ValueError(f"no text in {where}: its {sum(c['documents'] for c in counts.values())} documents are "
                             "all empty")
        (out / "meta.json").unlink(missing_ok=True)  # the old meta.json must never vouch for the new files
        for split in SPLITS:  # nor may old splits this run does not make linger
            (out / f"{split}.bin").unlink(missing_ok=True)
        for split in counts:
            os.replace(out / f"{split}.bin.tmp", out / f"{split}.bin")
    finally:
        for tmp in out.glob("*.bin.tmp"):
            tmp.unlink()
    meta = {"source": source, "command": shlex.join(["python", "prepare.py", *argv]), "tokenizer": args.tokenizer,
            "tokenizer_sha256": sha, "vocab_size": enc.n_vocab, "eot_token": enc.eot_token, "dtype": "uint16",
            "splits": counts, "fingerprint": fingerprint}
    (out / "meta.json.tmp").write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(out / "meta.json.tmp", out / "meta.json")
    seconds, tokens = time.monotonic() - t0, sum(c["tokens"] for c in counts.values())
    print(f"{out}: " + ", ".join(f"{s} {c['tokens']:,} tokens ({c['documents']:,} docs)" for s, c in counts.items())
          + f" in {seconds:.1f} s ({tokens / seconds / 1e6:.2f}M tokens/s)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        prepare(_parser().parse_args(argv), argv)
    except (ValueError, OSError, tarfile.TarError, hub.HubError) as e:
        sys.exit(f"prepare.py: error: {e}")


if __name__ == "__main__":
    main()
