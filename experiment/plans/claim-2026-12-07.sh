#!/bin/bash
# One device call of issue 27's plan (the paper's claim on the fixed code, priced in the teacher's GPU-time):
# idempotent, resumes where the last call stopped.   usage: bash experiment/plans/claim-2026-12-07.sh SECONDS CALL
# Carried: .carry/ (small.tar.xz: tokenizer, VAL.txt, WikiText-2, the OpenWebText sample; gutenberg.tar.xz).
# A 70m teacher on ~4 epochs of Gutenberg (160M tokens); best, paper and scratch at 1/8, 1/4, 1/2 and 1x its
# training GPU-minutes (one wsd run per recipe, branches finished in-process); a second seed of best and scratch
# at 1/4; then every point scored on 1M Gutenberg-val tokens.
T0=$(date +%s); BUDGET=${1:-570}; CALL=${2:-x}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
mkdir -p data runs "$OUT"
if [ ! -d data/shared ]; then
  mkdir -p data/shared/corpus && tar xJf .carry/small.tar.xz -C data/shared && cp .carry/gutenberg.tar.xz data/shared/corpus/
fi
SWEEP="--shared data/shared --runs runs/exp --results runs/results --teacher-tokens 160e6 --sweep 70m
       --sweep-minutes 0.125x,0.25x,0.5x,1x --sweep-align-minutes 0.0625x --sweep-recipes best,paper,scratch
       --sweep-seeds 1337,1338 --sweep-repeat 70m:0.25x --sweep-repeat-recipes best,scratch --eval-interval 250"
if [ ! -f runs/sweep.done ] && [ "$(left)" -gt 60 ]; then
  PYTHONUNBUFFERED=1 timeout -s INT $(( $(left) - 35 )) python experiment/experiment.py $SWEEP > runs/sweep-$CALL.log 2>&1 \
    && touch runs/sweep.done
  echo "sweep rc=$?"
fi
grep -hE "^\[[0-9:]+\]|rror|Traceback|branch|val loss" runs/sweep-$CALL.log 2>/dev/null | grep -v "step [0-9]* |.*tok/s" \
  | tail -40 | cut -c1-220
find runs/exp \( -name "*.json" -o -name "*.jsonl" -o -name "*.log" \) ! -name tokenizer.json ! -path "*/ckpt*" \
  ! -path "*/final/*" > runs/files.txt
tar czf "$OUT/out.tgz" runs/*.log runs/*.done runs/results -T runs/files.txt 2>/dev/null
ls -la "$OUT"
