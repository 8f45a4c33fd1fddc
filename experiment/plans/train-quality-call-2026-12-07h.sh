#!/bin/bash
# One device call for issues 29 and 30 (about 9 minutes): generate's rows with the draw split over the vocabulary
# (generate-2026-12-07h.py); bench.py's train section with the split backward gate kernel
# (adopted in fast/mixer.py, its tiles from results/gpu-logs-2026-12-07h/gate-back.md, commit 404516a), then the quality check:
# the Hyena student trained from scratch on 10M tokens of a 14M-token Gutenberg slice (carried in .carry/q) with fast.install on
# and off, same seed, and fast off with a second seed for the seed-to-seed spread.   usage: bash THIS  (OUT set)
export PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 70 python experiment/plans/generate-2026-12-07h.py "$OUT" > "$OUT/generate.log" 2>&1
echo "generate rc=$?"; tail -9 "$OUT/generate.log"; rm -f "$OUT/generate/bench.md" "$OUT/generate/bench.json"  # at most 8 files come back
mkdir -p "$OUT/bench" && cp results/bench/bench.json "$OUT/bench/"
timeout 230 python bench/bench.py --quick --only train --out "$OUT/bench" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"; rm -f "$OUT/bench/bench.png" "$OUT/bench/bench.md"; grep "^train\|== " "$OUT/bench.log"
for run in on:1 off:1 off:2; do
  f=${run%:*}; s=${run#*:}
  timeout 100 python finetune.py --init scratch --mixer hyena --config pythia-70m --data .carry/q/gutenberg \
    --fast $f --seed $s --compile on --max-tokens 10000000 --eval-interval 300 --eval-batches 40 \
    --out-dir /root/q-$f-$s > "$OUT/q-$f-$s.log" 2>&1
  echo "q $f seed $s rc=$?"; python - "$f" "$s" <<'PY'
import json, sys
f, s = sys.argv[1:]
d = json.load(open(f"/root/q-{f}-{s}/summary.json"))
print(f"fast {f} seed {s}: val {d['val']['loss']:.4f} train {d['train']['loss']:.4f} tokens {d['tokens']} "
      f"tok/s {d['tokens_per_s']:.0f} compile {d['compile_s']:.0f} s")
PY
  grep "\"val" /root/q-$f-$s/log.jsonl | cut -c1-200 >> "$OUT/q-$f-$s.log"
done
