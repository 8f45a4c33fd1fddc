"""bench.py on the CPU at tiny sizes (--cpu-smoke): its sections run, its files are written, its report redraws.
The numbers themselves come from the GPU (results/bench/); here only the machinery is checked."""
import json

import pytest

from bench import bench, bench_report


def test_cpu_smoke_writes_rows_targets_and_report(tmp_path):
    res = bench.main(["--cpu-smoke", "--out", str(tmp_path), "--only", "decode,kd"])
    assert not res["errors"]
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
    assert res2["decode"] == saved["decode"] and set(res2["env"]["kept"]) == {"check", "mixer", "model", "train", "decode"}
    bench_report.main([str(tmp_path)])  # the report redraws from bench.json alone
    assert "## targets" in (tmp_path / "bench.md").read_text()


def test_unknown_section_is_named(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--cpu-smoke", "--only", "decode,warp"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--only 'decode,warp': unknown section(s) ['warp']; choose from (" in err, err
    valid = err.split("choose from (")[1]
    assert all(f"'{name}'" in valid for name in ("check", "mixer", "model", "train", "decode", "kd")), err
