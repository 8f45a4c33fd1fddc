#!/bin/bash
# One GPU call of this session's plan (issue 17's one-GPU sweep): idempotent, resumes where the last call stopped.
# usage: bash experiment/plans/sweep-2026-12-05.sh SECONDS CALL    (carry: .carry)
# Sizes in order of interest (70m is the reference), budgets 0.5 and 1 GPU-minute, best and scratch; then a second
# seed of the 70m points if time is left.
T0=$(date +%s); BUDGET=${1:-570}; CALL=${2:-x}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
mkdir -p data runs "$OUT"
if [ ! -d data/shared ]; then
  mkdir -p data/shared/corpus && tar xJf .carry/small.tar.xz -C data/shared && cp .carry/gutenberg.tar.xz data/shared/corpus/
fi
SWEEP="--shared data/shared --runs runs/exp --results runs/results --teacher-tokens 100e6 --sweep 70m,14m,31m
       --sweep-minutes 0.5,1 --sweep-recipes best,scratch"
if [ ! -f runs/sweep.done ] && [ "$(left)" -gt 60 ]; then
  PYTHONUNBUFFERED=1 timeout -s INT $(( $(left) - 30 )) python experiment/experiment.py $SWEEP > runs/sweep-$CALL.log 2>&1 && touch runs/sweep.done
  echo "sweep rc=$?"
fi
if [ -f runs/sweep.done ] && [ ! -f runs/seed2.done ] && [ "$(left)" -gt 90 ]; then
  PYTHONUNBUFFERED=1 timeout -s INT $(( $(left) - 30 )) python experiment/experiment.py $SWEEP --sweep-seeds 1337,1338 \
    --sweep-repeat 70m:0.5,1 > runs/seed2-$CALL.log 2>&1 && touch runs/seed2.done
  echo "seed2 rc=$?"
fi
grep -hE "^\[[0-9:]+\]|rror|Traceback|val loss" runs/sweep-$CALL.log runs/seed2-$CALL.log 2>/dev/null | grep -v "step [0-9]* |.*tok/s" | tail -30 | cut -c1-200
find runs/exp \( -name "*.json" -o -name "*.jsonl" \) ! -name tokenizer.json ! -path "*/ckpt*" > runs/files.txt
tar czf "$OUT/out.tgz" runs/*.log runs/*.done runs/results runs/exp/logs -T runs/files.txt 2>/dev/null
ls -la "$OUT"
