"""Tokenize a dataset into data/NAME/{train,val,test}.bin (flat uint16 token ids) + meta.json, nanoGPT style.

    python prepare.py shakespeare          # hub datasets: openwebtext, wikitext2, wikitext103, shakespeare
    python prepare.py text books/ more.tar.xz --val-list VAL.txt --name books      # local text
    python prepare.py text --val wiki.valid.raw --test wiki.test.raw --name wikitext2
    python prepare.py harness              # data/harness/: the offline lm-eval tasks' data (harness/build.py)

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
Reading the documents (local text, hub parquet) is corpora/sources.py; this file tokenizes, writes and keeps meta.json.
One run at a time writes a dataset folder (it holds NAME/.lock); a split of fewer than --min-tokens is refused.
"""
import argparse
import json
import multiprocessing
import os
import re
import shlex
import sys
import tarfile
import time
from collections import deque
from pathlib import Path

import numpy as np

from cli import Progress, integer, out_dir_lock, write_atomic
from data import SPLITS, tokenizer_sha256
from corpora.sources import ARCHIVES, HUB_DATASETS, hub_files, hub_source, read_val_list, text_files, text_source
from tokenizer import load_tokenizer

TASK_CHARS = 1 << 20  # text per worker task: amortizes inter-process copies, keeps memory small
# Where text may be cut and the parts tokenized apart with the same ids as the whole: before a lone space that
# starts a word. GPT-2-style pre-tokenizers always begin a pre-token at " X", and a lone space is no part of the
# multi-space added tokens of GPT-NeoX.
_SAFE_CUT = re.compile(r"(?<! ) (?=\S)")
# A split needs one window of the scripts' default context (train.py's --block-size, eval.py's --context: 2048)
# plus the token it predicts; smaller ones are refused unless --min-tokens says what the user will use.
MIN_TOKENS = 2049


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


def _progress_line(counts, text_bytes, done, total, t0):
    """Documents, tokens/s, MB of text and input done, for cli.Progress (which adds the ETA)."""
    docs, tokens = (sum(c[key] for c in counts.values()) for key in ("documents", "tokens"))
    seconds = max(time.monotonic() - t0, 1e-9)
    return lambda rate, eta: (f"{docs:,} docs, {tokens:,} tokens, {tokens / seconds / 1e6:.2f}M tokens/s, "
                              f"{text_bytes / 1e6:.1f} MB of text, {done / max(total, 1):.0%} of the input{eta}")


def _write(tmps, enc, tokenizer, segments, total, workers):
    """Stream token ids into the files tmps[split]; returns {split: {"tokens", "documents"}}."""
    counts, files, text_bytes, progress, t0 = {}, {}, 0, Progress(total), time.monotonic()
    try:
        for (result, nbytes), done in _encoded(enc, tokenizer, _tasks(segments), workers):
            for split, (ids, docs) in result.items():
                if split not in files:
                    files[split] = open(tmps[split], "wb")
                    counts[split] = {"tokens": 0, "documents": 0}
                ids.tofile(files[split])
                counts[split]["tokens"] += len(ids)
                counts[split]["documents"] += docs
            text_bytes += nbytes
            progress.update(done, _progress_line(counts, text_bytes, done, total, t0))
    finally:
        for f in files.values():
            f.close()
    progress.update(total, _progress_line(counts, text_bytes, total, total, t0), final=True)
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
    p.add_argument("--min-tokens", type=integer, default=MIN_TOKENS, metavar="N",
                   help=f"refuse a split of fewer tokens (default {MIN_TOKENS}: one window of the default context "
                        "2048 plus the token it predicts; use your --block-size/--context + 1)")
    return p


def _default_name(path):  # "corpus/books.tar.xz" -> "books", "owt.jsonl" -> "owt", "corpus/" -> "corpus"
    return next((Path(path).name.removesuffix(s) for s in ARCHIVES if Path(path).name.endswith(s)), Path(path).stem)


def _dataset_folder(out_dir, name):
    """out_dir/name; a name that would write elsewhere (a path, "..", an absolute path, empty) is refused."""
    if name in ("", ".", "..") or "/" in name or (os.altsep and os.altsep in name):
        raise ValueError(f"--name {name!r}: a dataset's name is one folder name, made under --out-dir {out_dir} (no "
                         "'/', '..' or absolute path); to write elsewhere, pass that folder's parent as --out-dir and "
                         "its last part as --name")
    return Path(out_dir) / name


def _remove_stale_tmp(out):
    """The temporary .bin files of runs killed mid-write (kill -9), which would hold their space for ever. Only
    under the folder's lock (no live run writes here) and only those whose pid is gone."""
    for tmp in out.glob("*.bin.*.tmp"):
        pid = tmp.name.split(".")[-2]
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            print(f"{out}: removing {tmp.name}, left by a killed run (pid {pid})", file=sys.stderr)
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError):  # no pid in the name; another user's live process
            pass


def _check_sizes(out, counts, args):
    """Refuse a split too small to train or score on (fewer than --min-tokens), before it replaces anything."""
    for split, c in counts.items():
        if c["tokens"] < args.min_tokens:
            more = f" (a larger --val-fraction than {args.val_fraction:g})" if split == "val" and args.val_fraction \
                else ""
            raise ValueError(f"{out}: the {split} split would hold {c['tokens']:,} tokens, fewer than --min-tokens "
                             f"{args.min_tokens} (default: one window of the default context 2048, plus the token "
                             f"it predicts), too few to train or score on. Give it more text{more}, or set "
                             "--min-tokens to the context you will use plus one (e.g. 513 for --block-size 512)")


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
    if args.min_tokens < 2:
        raise ValueError(f"--min-tokens {args.min_tokens} must be at least 2 (one token scored from the one before)")
    name = args.name if args.name is not None else _default_name(inputs[0]) if args.dataset == "text" else args.dataset
    out = _dataset_folder(args.out_dir, name)

    sha = tokenizer_sha256(args.tokenizer)
    files, val_names, source, fingerprint = _inputs(args)
    # One writer per dataset folder: a second prepare.py on it is refused by pid (each would replace the other's
    # files). Taken before the up-to-date check, which must not read a folder mid-swap.
    with out_dir_lock(out, what=f"dataset folder {out}", fix="choose another --name (or --out-dir)"):
        if not args.force and _up_to_date(out, fingerprint, sha):
            print(f"{out}: up to date (same inputs and tokenizer as its meta.json; --force redoes it)")
            return
        _make(out, args, argv, files, val_names, source, fingerprint, sha)


def _inputs(args):
    """(input files, --val-list names, source line, fingerprint): the fingerprint decides "up to date"."""
    if args.dataset == "text":
        files, val_names = text_files(args), read_val_list(args.val_list) if args.val_list else None
        source = "local text: " + ", ".join(args.paths + [f"{p} (val)" for p in args.val] +
                                            [f"{p} (test)" for p in args.test])
        fingerprint = {"files": [[str(p.resolve()), split, p.stat().st_size, p.stat().st_mtime_ns]
                                 for p, split in files],
                       "val_list": sorted(val_names) if val_names else None,
                       "val_fraction": args.val_fraction, "seed": args.seed, "errors": args.errors}
        return files, val_names, source, fingerprint
    spec = HUB_DATASETS[args.dataset]
    files = hub_files(spec)
    source = f"hub dataset {spec.repo} at {spec.revision}, {spec.prefix}"
    return files, None, source, {"repo": spec.repo, "revision": spec.revision, "files": [f for f, _ in files],
                                 "seed": args.seed}


def _make(out, args, argv, files, val_names, source, fingerprint, sha):
    """Tokenize into out (locked by prepare), swapping the new files in only when complete and checked."""
    enc = load_tokenizer(args.tokenizer)
    if enc.n_vocab > 1 << 16:
        raise ValueError(f"tokenizer {args.tokenizer} has {enc.n_vocab} tokens: ids above 65535 do not fit the "
                         "uint16 .bin files; use a tokenizer with at most 65536 tokens")
    if args.dataset == "text":
        total, segments = text_source(files, val_names, args)
    else:
        total, segments = hub_source(HUB_DATASETS[args.dataset], files, args.seed)
    _remove_stale_tmp(out)
    tmps = {split: out / f"{split}.bin.{os.getpid()}.tmp" for split in SPLITS}  # this run's own: only these go
    t0 = time.monotonic()
    try:
        counts = _write(tmps, enc, args.tokenizer, segments, total, args.workers)
        where = ", ".join(args.paths + args.val + args.test) if args.dataset == "text" else source
        if not counts:
            raise ValueError(f"no documents in {where} (text: .txt files, .jsonl lines, .tar.xz/.tar.gz/.tgz of them)")
        if all(c["tokens"] == c["documents"] for c in counts.values()):
            raise ValueError(f"no text in {where}: its {sum(c['documents'] for c in counts.values())} documents are "
                             "all empty")
        _check_sizes(out, counts, args)
        (out / "meta.json").unlink(missing_ok=True)  # the old meta.json must never vouch for the new files
        for split in SPLITS:  # nor may old splits this run does not make linger
            (out / f"{split}.bin").unlink(missing_ok=True)
        for split in counts:
            os.replace(tmps[split], out / f"{split}.bin")
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    meta = {"source": source, "command": shlex.join(["python", "prepare.py", *argv]), "tokenizer": args.tokenizer,
            "tokenizer_sha256": sha, "vocab_size": enc.n_vocab, "eot_token": enc.eot_token, "dtype": "uint16",
            "splits": counts, "fingerprint": fingerprint}
    write_atomic(out / "meta.json", json.dumps(meta, indent=1) + "\n")
    seconds, tokens = time.monotonic() - t0, sum(c["tokens"] for c in counts.values())
    print(f"{out}: " + ", ".join(f"{s} {c['tokens']:,} tokens ({c['documents']:,} docs)" for s, c in counts.items())
          + f" in {seconds:.1f} s ({tokens / seconds / 1e6:.2f}M tokens/s)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["harness"]:  # the offline lm-evaluation-harness tasks' data: harness/build.py
            from harness.build import main as build_harness_data
            return build_harness_data(argv[1:])
        prepare(_parser().parse_args(argv), argv)
    except tarfile.TarError as e:  # cli.run reports ValueErrors, OSErrors and HubErrors as they are
        raise ValueError(f"an input archive cannot be read ({e}); check the .tar.xz/.tar.gz/.tgz files") from e


if __name__ == "__main__":
    import cli  # the one error path: exit 2 and one line, no traceback (--debug shows it)
    cli.run(main)
