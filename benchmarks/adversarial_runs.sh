#!/usr/bin/env bash
# PGD-AT and TRADES with the small CNN on MNIST (eps 0.3) and Fashion-MNIST (eps 0.1), then
# clean / PGD-20 / CW-20 / AutoAttack on the first N test samples. Results and timings:
# benchmarks/adversarial_results.md. One torch thread (the 2-core machine was shared).
# Every step resumes: run the same command again after an interruption.
# Usage: bash benchmarks/adversarial_runs.sh [RUNS_DIR] [N_EVAL] [DATASETS]
set -euo pipefail
RUNS=${1:-runs/adv}
N=${2:-500}
DATASETS=${3:-"mnist fashion-mnist"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
MEMTOOL=${MEMTOOL:-.venv/bin/memtool}
# eps ramps over the first 40 % of training (2 of 5 epochs); lr 0.05 one-cycle
COMMON="--model cnn --limit 15000 --epochs 5 --eps-warmup 0.4 --batch-size 128 --lr 0.05 --schedule onecycle --quiet"
declare -A EPS=([mnist]=0.3 [fashion-mnist]=0.1)
for dataset in $DATASETS; do
  set -- "$dataset" "${EPS[$dataset]}"
  for method in pgd-at trades; do
    out=$RUNS/$1-$method
    /usr/bin/time -f "train $1 $method: %e s wall, %U s user CPU" $MEMTOOL train --method $method --dataset $1 --eps $2 $COMMON --out $out
    /usr/bin/time -f "evaluate $1 $method: %e s wall, %U s user CPU" $MEMTOOL evaluate $out --attacks clean,pgd20,cw20,autoattack \
      --n-samples $N --out $out/eval --quiet
  done
done
