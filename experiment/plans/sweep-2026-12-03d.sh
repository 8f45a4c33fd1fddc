#!/bin/bash
# One GPU call of this session's plan (issue 17's one-GPU sweep): idempotent, resumes where the last call stopped.
# usage: bash experiment/plans/sweep-2026-12-03d.sh SECONDS CALL    (carry: .carry/small.tar.xz .carry/gutenberg.tar.xz)
T0=$(date +%s); BUDGET=${1:-560}; CALL=${2:-x}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
mkdir -p data runs "$OUT"
if [ ! -d data/shared ]; then
  mkdir -p data/shared/corpus && tar xJf .carry/small.tar.xz -C data/shared && cp .carry/gutenberg.tar.xz data/shared/corpus/
fi
if [ ! -f runs/check.done ]; then  # the two check-section rows redefined last session, rerun once
  mkdir -p runs/bench && cp -n results/bench/bench.json runs/bench/ 2>/dev/null
  timeout 170 python bench/bench.py --quick --only check --out runs/bench > runs/check.log 2>&1; touch runs/check.done
  grep -E "^check|FAIL|Error" runs/check.log | cut -c1-220 | tail -20
fi
SWEEP="--shared data/shared --runs runs/exp --results runs/results --teacher-tokens 100e6 --sweep 14m,31m,70m
       --sweep-minutes 0.5,1 --sweep-recipes best,scratch"
if [ ! -f runs/sweep.done ] && [ "$(left)" -gt 60 ]; then
  timeout -s INT $(( $(left) - 30 )) python experiment/experiment.py $SWEEP > runs/sweep-$CALL.log 2>&1 && touch runs/sweep.done
  echo "sweep rc=$?"
fi
grep -E "^\[[0-9:]+\]|rror|Traceback" runs/sweep-$CALL.log 2>/dev/null | tail -25 | cut -c1-160
find runs/exp \( -name "*.json" -o -name "*.jsonl" \) ! -name tokenizer.json ! -path "*/ckpt*" > runs/files.txt
tar czf "$OUT/out.tgz" runs/*.log runs/*.done runs/bench runs/results runs/exp/logs -T runs/files.txt 2>/dev/null
ls -la "$OUT"
