#!/bin/bash
# One GPU call of this session's plan: idempotent, resumes where the last call stopped. usage: bash experiment/plans/experiment-sweep-2026-12-03c.sh SECONDS CALL
T0=$(date +%s); BUDGET=${1:-560}; CALL=${2:-x}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
mkdir -p data runs "$OUT"
if [ ! -d data/shared ]; then
  mkdir -p data/shared/corpus && tar xJf .carry/small.tar.xz -C data/shared && cp .carry/gutenberg.tar.xz data/shared/corpus/
fi
if [ ! -f runs/bench.done ]; then
  mkdir -p runs/bench && cp -n results/bench/bench.json runs/bench/ 2>/dev/null
  timeout 330 python bench/bench.py --quick --only check,decode --out runs/bench > runs/bench.log 2>&1 && touch runs/bench.done
  grep -E "^check|== |65536, B=16|FAIL|Error|prefill" runs/bench.log | cut -c1-220 | tail -40
fi
EXP="--shared data/shared --runs runs/exp --results runs/results --students best --modal 16 --no-dtype-study --teacher-tokens 100e6 --long-context 16384 --long-minutes 1.5"
if [ ! -f runs/exp.done ] && [ "$(left)" -gt 90 ]; then
  timeout -s INT $(( $(left) - 40 )) python experiment/experiment.py $EXP > runs/exp-$CALL.log 2>&1 && touch runs/exp.done
  echo "experiment rc=$?"
fi
grep -E "^\[[0-9:]+\]|rror|Traceback|val loss" runs/exp-$CALL.log 2>/dev/null | grep -v "step [0-9]* |.*tok/s" | tail -25 | cut -c1-200
if [ -f runs/exp.done ] && [ ! -f runs/sweep.done ] && [ "$(left)" -gt 150 ]; then
  M=${SWEEP_MIN:-1,2}
  [ -f runs/sweep.minutes ] && M=$(cat runs/sweep.minutes) || echo $M > runs/sweep.minutes
  timeout -s INT $(( $(left) - 35 )) python experiment/experiment.py --shared data/shared --runs runs/exp --results runs/results --teacher-tokens 100e6 --sweep 70m --sweep-minutes $M --sweep-recipes best,scratch > runs/sweep-$CALL.log 2>&1 && touch runs/sweep.done
  echo "sweep rc=$?"
  grep -E "^\[[0-9:]+\]|rror|Traceback|branch|val loss" runs/sweep-$CALL.log | grep -v "step [0-9]* |.*tok/s" | tail -25 | cut -c1-200
fi
find runs/exp \( -name "*.json" -o -name "*.jsonl" \) ! -name tokenizer.json ! -path "*/ckpt*" > runs/files.txt
tar czf "$OUT/out.tgz" runs/*.log runs/*.done runs/bench runs/results runs/exp/logs -T runs/files.txt 2>/dev/null
ls -la "$OUT"
