"""Where prepare.py's documents come from: local text (.txt, .jsonl, .tar.xz/.tar.gz/.tgz archives of them) and
hub datasets (parquet files of a dataset repo, fetched with hub.py).

A source is (input total, segments): segments yields (split, text, ends document, input done so far), the input
measured in bytes (local text) or rows (parquet), so prepare.py can show an ETA. Split rules: see prepare.py.
"""
import json
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

import hub

ARCHIVES = (".tar.xz", ".tar.gz", ".tgz")


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

def text_files(args):
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


def read_val_list(path):
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


def text_source(files, val_names, args):
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

def hub_files(spec):
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


def hub_source(spec, files, seed):
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
                if spec.lines:  # one document per split, fed in pieces that prepare._tasks joins and cuts
                    yield split, "".join(t or " \n" for t in texts), False, done
                    continue
                for t in texts:
                    yield "val" if split == "train" and held_out[row] else split, t or "", True, done
                    row += 1
            if spec.lines and (i + 1 == len(parquet) or parquet[i + 1][1] != split):
                yield split, "", True, done
    return sum(pf.metadata.num_rows for pf, _ in parquet), segments()
