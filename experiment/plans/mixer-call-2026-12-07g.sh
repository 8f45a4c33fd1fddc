#!/bin/bash
# One device call for issue 29 (about 9 minutes): the backward gate kernel's candidates timed against the product's
# (gate-back-2026-12-07g.py), the winner installed on the device's copy, the compiled fused mixer profiled kernel by
# kernel at 2k, then bench.py's check, mixer and train sections with it.   usage: bash THIS   (OUT set by the call)
# Before the call, here: the candidates as whole files in .carry/cand (gate-back-2026-12-07g.py's docstring), and
# carry .carry/cand. After it: adopt the winner with its patch (winner.txt names it), merge $OUT/bench/bench.json
# into results/bench/ (bench.py keeps the other sections' rows), and redraw with bench/bench_report.py.
export PYTHONPATH=.
WT=experiment/plans/with-tiles-2026-12-07g.py
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python experiment/plans/gate-back-2026-12-07g.py "$OUT" dot=.carry/cand/mixer_dot.py \
  split=.carry/cand/mixer_split.py > "$OUT/log.txt" 2>&1
echo "gate-back rc=$?" >> "$OUT/log.txt"; tail -6 "$OUT/log.txt"
W=$(cat "$OUT/winner.txt" 2>/dev/null || echo fast/mixer.py)
[ "$W" = fast/mixer.py ] || cp "$W" fast/mixer.py
echo "winner: $W"
timeout 80 python $WT "$OUT/back_tiles.json" experiment/plans/profile-mixer-2026-12-07f.py "$OUT" >> "$OUT/log.txt" 2>&1
head -24 "$OUT/profile-mixer.md"
mkdir -p "$OUT/bench" && cp results/bench/bench.json "$OUT/bench/"
timeout 335 python $WT "$OUT/back_tiles.json" bench/bench.py --quick --only check,mixer,train --out "$OUT/bench" \
  > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
rm -f "$OUT/bench/bench.png" "$OUT/bench/bench.md"  # at most 8 files come back; both redraw from bench.json
grep -n "^== \|FAIL" "$OUT/bench.log" | head; tail -12 "$OUT/bench.log"
