#!/bin/bash
# One device call for issue 30 (about 9 minutes): the fused decoding step's tiles swept (step-sweep-2026-12-07e.py,
# its fastest to sweep/best.json), then bench.py's serve section with them (with-tiles-2026-12-07g.py), long enough
# for the teacher's rows at 64k up to its memory limit.   usage: bash THIS   (OUT set by the call)
# After it: put best.json's tiles into fast/step.py and fast/decode.py, merge $OUT/bench/bench.json into
# results/bench/, redraw with bench/bench_report.py.
export PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 260 python experiment/plans/step-sweep-2026-12-07e.py "$OUT/sweep" > "$OUT/sweep.log" 2>&1
echo "sweep rc=$?"; grep -n "fastest" "$OUT/sweep/sweep.md"
mkdir -p "$OUT/bench" && cp results/bench/bench.json "$OUT/bench/"
timeout 300 python experiment/plans/with-tiles-2026-12-07g.py "$OUT/sweep/best.json" bench/bench.py --quick \
  --only serve --out "$OUT/bench" > "$OUT/serve.log" 2>&1
echo "serve rc=$?"
rm -f "$OUT/bench/bench.png" "$OUT/bench/bench.md"
tail -20 "$OUT/serve.log"
