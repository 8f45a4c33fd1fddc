#!/bin/bash
# One GPU call of this session's plan: idempotent, resumes where the last call stopped. usage: bash experiment/plans/experiment-2026-12-03b.sh SECONDS
T0=$(date +%s); BUDGET=${1:-560}; CALL=${2:-x}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
mkdir -p data runs "$OUT"
if [ ! -d data/shared ]; then
  mkdir -p data/shared/corpus && tar xJf .carry/small.tar.xz -C data/shared && cp .carry/gutenberg.tar.xz data/shared/corpus/
fi
if [ ! -d runs/site/lm_eval ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target runs/site .carry/whl/*.whl > runs/pip.log 2>&1
fi
export PYTHONPATH=$PWD/runs/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python -c "import lm_eval, datasets; print('lm_eval', lm_eval.__version__)" 2>&1 | tail -1
if [ ! -f runs/bench.done ]; then
  mkdir -p runs/bench && cp -n results/bench/bench.json runs/bench/ 2>/dev/null
  timeout 300 python bench/bench.py --quick --only check,decode --out runs/bench > runs/bench.log 2>&1 && touch runs/bench.done
  grep -E "^check|== |65536, B=16|FAIL|Error" runs/bench.log | cut -c1-220
fi
EXP=${EXP:-"--shared data/shared --runs runs/exp --results runs/results --students paper,best,scratch --modal 16 --no-dtype-study --teacher-tokens 100e6 --long-context 16384 --long-minutes 1.5 --harness gutenberg_lambada,gutenberg_next_sentence,wikitext2_offline"}
if [ ! -f runs/exp.done ] && [ "$(left)" -gt 90 ]; then
  timeout -s INT $(( $(left) - 45 )) python experiment/experiment.py $EXP > runs/exp-$CALL.log 2>&1 && touch runs/exp.done
  echo "experiment rc=$?"
fi
grep -E "^\[[0-9:]+\]|rror|Traceback|compiled|val loss" runs/exp-$CALL.log 2>/dev/null | grep -v "step [0-9]* |.*tok/s" | tail -40 | cut -c1-200
tar czf "$OUT/out.tgz" runs/*.log runs/*.done runs/bench runs/results runs/exp/eval runs/exp/longctx runs/exp/logs runs/exp/*/summary.json runs/exp/*/*/summary.json 2>/dev/null
ls -la "$OUT"
