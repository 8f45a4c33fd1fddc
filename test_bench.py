"""bench.py on the CPU at tiny sizes (--cpu-smoke): its sections run, its files are written, its report redraws.
The numbers themselves come from the GPU (results/bench/); here only the machinery is checked."""
import json

import pytest

import bench
import bench_report


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
    target = next(t for t in saved["targets"] if t["target"].startswith("student / teacher decode tok/s, ctx=64, B=1 (eager)"))
    assert target["ok"] in ("PASS", "FAIL") and target["measured"] > 0
    assert "## decode" in (tmp_path / "bench.md").read_text()
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    # --only reruns a part and keeps the other sections of the last run at the same sizes
    res2 = bench.main(["--cpu-smoke", "--out", str(tmp_path), "--only", "kd"])
    assert res2["decode"] == saved["decode"] and set(res2["env"]["kept"]) == {"check", "mixer", "model", "train", "decode"}
    bench_report.main([str(tmp_path)])  # the report redraws from bench.json alone
    assert "## issue-7 targets" in (tmp_path / "bench.md").read_text()


def test_unknown_section_is_named():
    with pytest.raises(SystemExit):
        bench.main(["--cpu-smoke", "--only", "decode,warp"])
