"""pretrained/safetensors.py: safetensors by hand (round trips, the safetensors package as oracle, every corrupt header
refused naming the file and the defect, pickles never loaded)."""
import json
import struct

import pytest
import torch

from pretrained import safetensors as sio


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "f16": torch.randn(4, generator=g).half(),
        "f32": torch.randn(2, 3, 4, generator=g),
        "f64": torch.randn(7, generator=g, dtype=torch.float64),
        "i64": torch.arange(-5, 5),
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "i16": torch.tensor([-300, 300], dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous: written as its contiguous copy
    }


def assert_same(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), k


def test_round_trip_every_dtype_with_metadata(tmp_path):
    assert set(sio.SAFETENSORS_DTYPES) == {"BF16", "F16", "F32", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL"}
    path = tmp_path / "model.safetensors"
    sio.write_safetensors(path, sample_tensors(), metadata={"format": "pt", "step": "10"})
    assert_same(sio.read_safetensors(path), sample_tensors())
    assert sio.read_safetensors_metadata(path) == {"format": "pt", "step": "10"}
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left behind
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0  # header padded so tensors start aligned


def test_loaded_tensors_are_writable_and_the_file_is_not(tmp_path):
    path = tmp_path / "model.safetensors"
    sio.write_safetensors(path, {"w": torch.ones(4)})
    before = path.read_bytes()
    sio.read_safetensors(path)["w"].add_(1)  # copy-on-write mapping: fine in memory, never reaches the file
    assert path.read_bytes() == before


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.safetensors"
    sio.write_safetensors(path, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="complex64"):
        sio.write_safetensors(path, {"w": torch.zeros(2, dtype=torch.complex64)})
    assert_same(sio.read_safetensors(path), {"w": torch.ones(2)})
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_safetensors_package_reads_ours_and_we_read_its(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    want = {k: v.contiguous() for k, v in sample_tensors().items()}
    sio.write_safetensors(ours, want, metadata={"format": "pt"})
    assert_same(st.load_file(ours), want)
    st.save_file(want, theirs, metadata={"format": "pt"})
    assert_same(sio.read_safetensors(theirs), want)
    assert sio.read_safetensors_metadata(theirs) == {"format": "pt"}


def safetensors_bytes(header, data):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


F32x4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
CORRUPT = {
    "short": (b"\x01\x02", "shorter than the 8-byte header"),
    "header_past_eof": (struct.pack("<Q", 10**6) + b"{}", "header length 1000000 runs past the end"),
    "bad_json": (struct.pack("<Q", 5) + b"{nope", "not valid JSON"),
    "not_object": (safetensors_bytes([1, 2], b""), "expected an object"),
    "unknown_dtype": (safetensors_bytes({"x": {**F32x4, "dtype": "F7"}}, bytes(16)), "unknown dtype 'F7'"),
    "bad_shape": (safetensors_bytes({"x": {**F32x4, "shape": [-4]}}, bytes(16)), r"shape \[-4\] is not a list"),
    "bad_offsets": (safetensors_bytes({"x": {**F32x4, "data_offsets": [16, 0]}}, bytes(16)), "begin <= end"),
    "out_of_range": (safetensors_bytes({"x": {**F32x4, "data_offsets": [64, 80]}}, bytes(16)),
                     r"\[64, 80\] run past the end of the data section \(16 bytes\)"),
    "truncated_data": (safetensors_bytes({"x": F32x4}, bytes(12)), "run past the end of the data section"),
    "size_mismatch": (safetensors_bytes({"x": {**F32x4, "shape": [4, 4]}}, bytes(16)),
                      r"hold 16 bytes but F32 shape \[4, 4\] needs 64"),
    "overlap": (safetensors_bytes({"a": F32x4, "b": {**F32x4, "data_offsets": [8, 24]}}, bytes(24)),
                "tensors 'a' and 'b' overlap"),
    "gap": (safetensors_bytes({"a": {**F32x4, "data_offsets": [4, 20]}}, bytes(20)), "gap of 4 bytes"),
    "trailing": (safetensors_bytes({"a": F32x4}, bytes(20)), "4 trailing bytes"),
    "bad_metadata": (safetensors_bytes({"__metadata__": {"step": 10}}, b""), "__metadata__ must map strings"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_file_is_refused_naming_file_and_defect(tmp_path, case):
    blob, message = CORRUPT[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=message) as err:
        sio.read_safetensors(path)
    assert "model.safetensors" in str(err.value)


def test_pickled_checkpoint_is_refused_not_unpickled(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(2)}, path)  # a zip of pickles: its first 8 bytes make no sane header length
    with pytest.raises(ValueError, match="not a safetensors file"):
        sio.read_safetensors(path)
