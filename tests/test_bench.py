"""bench.py on the CPU at tiny sizes (--cpu-smoke): its sections run, its files are written, its report redraws.
The numbers themselves come from the GPU (results/bench/); here only the machinery is checked."""
import json

import pytest

from bench import bench, bench_conv, bench_report
from fast import toeplitz


def check_serve_section(res):
    """generate against the raw step at the short context; the serving sweep per model; no row failed."""
    rows = res["serve"]
    assert not [r for r in rows if "error" in r]
    assert {(r["model"], r["run"], r["B"]) for r in rows} == {
        *((m, run, B) for m in ("modal", "teacher") for run in ("step", "generate") for B in (1, 2)),
        *((m, "serve", B) for m in ("modal", "teacher") for B in (1, 4))}
    for r in rows:
        assert r["tok_s"] > 0
        if r["run"] == "generate":
            step = next(s for s in rows if (s["model"], s["run"], s["B"]) == (r["model"], "step", r["B"]))
            assert r["share_of_step"] == pytest.approx(r["tok_s"] / step["tok_s"])
    serve = {(r["model"], r["B"]): r["cache_gb"] for r in rows if r["run"] == "serve"}
    assert serve["teacher", 4] > 3 * serve["teacher", 1] and serve["modal", 1] < serve["teacher", 1]


def test_cpu_smoke_writes_rows_targets_and_report(tmp_path):
    res = bench.main(["--cpu-smoke", "--out", str(tmp_path), "--only", "decode,kd,conv,serve", "--conv-tiles"])
    assert not res["errors"]
    check_conv_section(res, tmp_path)
    check_serve_section(res)
    rows = res["decode"]
    assert {(r["model"], r["ctx"], r["B"]) for r in rows} == {(m, c, b) for m in ("student", "teacher", "modal")
                                                              for c in (16, 64, 256) for b in (1, 2)}
    assert all(r["tok_s"] > 0 and "error" not in r for r in rows)
    modal = {r["ctx"]: r["cache_bytes_per_seq"] for r in rows if r["model"] == "modal" and r["B"] == 1}
    student = {r["ctx"]: r["cache_bytes_per_seq"] for r in rows if r["model"] == "student" and r["B"] == 1}
    assert len(set(modal.values())) == 1 and student[256] > student[64] > student[16]  # constant vs growing
    assert res["kd"][0]["ms"] > 0 and res["kd"][0]["share"] is None  # the share needs this run's train section
    saved = json.loads((tmp_path / "bench.json").read_text())
    # each decode target is the ratio of this run's rows, judged against its goal; the CUDA-graph ones were not run
    tok_s = {(r["model"], r["B"]): r["tok_s"] for r in rows if r["ctx"] == 64 and not r["graph"]}
    for B in (1, 2):
        eager, graph = (next(t for t in saved["targets"]
                             if t["target"] == f"student / teacher decode tok/s, ctx=64, B={B} ({kind})")
                        for kind in ("eager", "CUDA graph"))
        assert eager["measured"] == pytest.approx(tok_s["student", B] / tok_s["teacher", B], rel=1e-12)
        assert eager["ok"] == ("PASS" if eager["measured"] >= 1 else "FAIL") and eager["goal"] == ">= 1"
        assert graph["measured"] is None and graph["ok"] == "n/a"
    assert "## decode" in (tmp_path / "bench.md").read_text()
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    # --only reruns a part and keeps the other sections of the last run at the same sizes
    res2 = bench.main(["--cpu-smoke", "--out", str(tmp_path), "--only", "kd"])
    assert res2["decode"] == saved["decode"] and set(res2["env"]["kept"]) == {"check", "mixer", "conv", "model", "train",
                                                                             "decode", "serve"}
    bench_report.main([str(tmp_path)])  # the report redraws from bench.json alone
    assert "## targets" in (tmp_path / "bench.md").read_text()
    # ... but never rows of another device, nor of other sizes (timings compare only within one machine)
    for field, value in (("device", "NVIDIA H200"), ("sizes", {**saved["env"]["sizes"], "decode_steps": 5})):
        other = json.loads((tmp_path / "bench.json").read_text())
        other["env"][field] = value
        (tmp_path / "bench.json").write_text(json.dumps(other))
        res3 = bench.main(["--cpu-smoke", "--out", str(tmp_path), "--only", "kd"])
        assert "kept" not in res3["env"] and res3["decode"] == [], field


def test_unknown_section_is_named(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--cpu-smoke", "--only", "decode,warp"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--only 'decode,warp': unknown section(s) ['warp']; choose from (" in err, err
    valid = err.split("choose from (")[1]
    assert all(f"'{name}'" in valid for name in ("check", "mixer", "conv", "model", "train", "decode", "kd")), err


def check_conv_section(res, tmp_path):
    """The conv section on the CPU (run by the smoke test above, which it shares to spare CI a run): FFTConv forward
    and forward+backward at every mixer length up to 8192, with useful TFLOP/s (B D L^2 FLOPs a product, 3 products
    forward+backward) and no peak share (no known GPU); the Toeplitz rows, and --conv-tiles' sweep (one row a sweep
    length), skipped with the reason (the kernels need CUDA and Triton); the TILES they would run with recorded."""
    rows, sizes = res["conv"], bench.SMOKE
    D, ls = sizes.model["hidden_size"], [L for L in sizes.ls if L <= bench_conv.CONV_MAX_L]
    assert {(r["op"], r["run"], r["L"]) for r in rows} == {(op, run, L) for op in ("fftconv", "toeplitz")
                                                          for run in ("fwd", "fwd+bwd") for L in ls} \
        | {("toeplitz", "sweep", L) for L in (sizes.ls[0], sizes.ls[2])}
    for r in rows:
        assert r["B"] == max(1, sizes.mixer_tokens // r["L"]) and r["D"] == D and "error" not in r, r
        if r["op"] == "fftconv":
            flops = r["B"] * D * r["L"] ** 2 * (1 if r["run"] == "fwd" else 3)
            assert r["ms"] > 0 and r["tflops"] == pytest.approx(flops / r["ms"] / 1e9) and r["peak_share"] is None
        else:
            assert r["skipped"] == bench_conv.UNSERVED and "ms" not in r, r
    assert res["env"]["conv_tiles"] == toeplitz.TILES
    assert "## conv" in (tmp_path / "bench.md").read_text()


def test_the_peak_share_is_of_the_device_s_dense_bf16_peak_and_empty_for_unknown_ones():
    """H100 SXM and H200: 989 dense bf16 TFLOP/s; a GPU not in the table gets no share."""
    class Fake:
        res = {"env": {"device": "NVIDIA H100 80GB HBM3"}}
    row = bench_conv.ConvCases.useful(Fake(), {"ms": 2.0}, 989e9 * 2)
    assert row["tflops"] == pytest.approx(989) and row["peak_share"] == pytest.approx(1.0)
    for device, share in (("NVIDIA H200", 0.5), ("NVIDIA A100-SXM4-80GB", None), ("cpu", None)):
        Fake.res = {"env": {"device": device}}
        assert bench_conv.ConvCases.useful(Fake(), {"ms": 2.0}, 989e9)["peak_share"] == (share and pytest.approx(share))
