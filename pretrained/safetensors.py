"""safetensors read and write by hand: the weights format of every checkpoint here and of the hub's models.

Nothing read is ever unpickled: weights come only as safetensors (an 8-byte little-endian header length, a JSON
header naming each tensor's dtype, shape and byte range, then the raw little-endian bytes), and every header
field is checked before a byte of tensor data is touched. Reading maps the file (mmap) and takes zero-copy views.
"""
import json
import math
import mmap
import os
import struct
from pathlib import Path

import torch

from cli import write_atomic

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def _read_header(path):
    """Validate the whole header; return (data_start, {name: (dtype, shape, begin, end)}, metadata)."""
    size = os.path.getsize(path)
    if size < 8:
        raise ValueError(f"{path}: file is {size} bytes, shorter than the 8-byte header length: not safetensors")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, 100_000_000):  # the package's cap too: never read gigabytes hoping for JSON
            raise ValueError(f"{path}: header length {n} runs past the end of the file ({size} bytes) or over "
                             "100 MB: truncated, or not a safetensors file (a pickled torch.save file looks like this)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError(f"{path}: __metadata__ must map strings to strings, got {metadata!r:.200}")
    data_len = size - 8 - n
    entries = {}
    for name, info in header.items():
        at = f"{path}: tensor {name!r}"
        if not (isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}):
            raise ValueError(f"{at} must have exactly dtype, shape and data_offsets, got {info!r:.200}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{at} has unknown dtype {dtype!r} (known: {', '.join(SAFETENSORS_DTYPES)})")
        # type() is int, not isinstance: JSON true/false would otherwise pass as 1/0.
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"{at} shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{at} data_offsets {offsets!r} are not [begin, end] integers with 0 <= begin <= end")
        begin, end = offsets
        if end > data_len:
            raise ValueError(f"{at} data_offsets {offsets} run past the end of the data section "
                             f"({data_len} bytes): the file is truncated or the offsets are out of range")
        need = SAFETENSORS_DTYPES[dtype].itemsize * math.prod(shape)
        if end - begin != need:
            raise ValueError(f"{at} data_offsets {offsets} hold {end - begin} bytes but {dtype} shape {shape} "
                             f"needs {need}")
        entries[name] = (SAFETENSORS_DTYPES[dtype], shape, begin, end)
    # Like the safetensors package: the tensors must tile the data section exactly, with no overlap
    # (two tensors aliasing bytes) and no gaps or trailing bytes (data that no tensor accounts for).
    end, prev = 0, None
    for name, (_, _, b, e) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if b < end:
            raise ValueError(f"{path}: tensors {prev!r} and {name!r} overlap (bytes {b}..{end} of the data section)")
        if b > end:
            raise ValueError(f"{path}: gap of {b - end} bytes before tensor {name!r} in the data section")
        end, prev = e, name
    if end != data_len:
        raise ValueError(f"{path}: {data_len - end} trailing bytes after the last tensor in the data section")
    return 8 + n, entries, metadata


def read_safetensors(path):
    """Load every tensor of a .safetensors file, validated, memory-mapped (pages are read only when used)."""
    start, entries, _ = _read_header(path)
    with open(path, "rb") as f:
        # ACCESS_COPY is a private copy-on-write mapping: the tensors are writable (no torch warning), and
        # writing to one never changes the file. The mapping lives as long as any tensor made from it.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for name, (dtype, shape, begin, end) in entries.items():
        if begin == end:  # torch.frombuffer refuses empty buffers
            out[name] = torch.empty(shape, dtype=dtype)
        elif (start + begin) % dtype.itemsize:  # a misaligned view is unsafe for some kernels: copy instead
            out[name] = torch.frombuffer(bytearray(mm[start + begin:start + end]), dtype=dtype).reshape(shape)
        else:
            out[name] = torch.frombuffer(mm, dtype=dtype, count=math.prod(shape), offset=start + begin).reshape(shape)
    return out


def read_safetensors_metadata(path):
    """The __metadata__ block (str -> str) of a .safetensors file; {} when it has none."""
    return _read_header(path)[2]


def write_safetensors(path, tensors, metadata=None):
    """Write tensors (name -> Tensor) and optional str -> str metadata; atomically (cli.write_atomic)."""
    path = Path(path)
    header = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"{path}: metadata must map str to str, got {metadata!r:.200}")
        header["__metadata__"] = dict(metadata)
    for name, t in tensors.items():
        if not (isinstance(name, str) and isinstance(t, torch.Tensor)):
            raise TypeError(f"{path}: expected str -> torch.Tensor, got {type(name).__name__} -> {type(t).__name__}")
        if t.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors here cannot store "
                             f"(storable: {', '.join(map(str, SAFETENSORS_DTYPES.values()))})")
    # Widest dtypes first: with the header padded to 8 bytes, every tensor then starts aligned to its itemsize,
    # so readers can map it in place instead of copying.
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    offset = 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.numel() * t.element_size()]}
        offset += t.numel() * t.element_size()
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:  # one tensor at a time to the CPU, so a GPU model is never copied whole
            f.write(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # raw bytes
    write_atomic(path, write)
