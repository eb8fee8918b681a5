#!/usr/bin/env bash
# The fedld acceptance sweep for one dataset on two lanes (two cells side by side on 2 cores), seed by seed
# so that a partial sweep is balanced across methods and betas. Resumable: finished cells in
# results/fedld/<dataset>_beta<b>/cells are skipped, a killed cell continues from its last round.
# Usage (repo root): results/fedld/sweep.sh pneumoniamnist_balanced [DATA_DIR]
# Same cells as `robustlab reproduce --full --only fedld --out results/fedld`, which runs them one at a time.
set -u
cd "$(dirname "$0")/../.."
dataset=${1:?usage: results/fedld/sweep.sh DATASET [DATA_DIR]}
data_dir=$(cd "${2:-../shared/data/medmnist}" && pwd)
export dataset data_dir
export CORE=fedavg,fedavg-unweighted,fedld,fedavg-slr,fedld-margin,fedld-pg
export BASE=fedprox,fedbn,fedgh,scaffold,moon,fedpac
jobs() {  # one job = one (beta, method group) folder grown by one seed
  for s in 1 2 3 4 5; do
    for b in 100 1 0.5; do echo "$b core $s"; done
    if [ "$s" -le 3 ]; then for b in 100 1 0.5; do echo "$b base $s"; done; fi
  done
}
job() {
  local b=$1 g=$2 s=$3 m out
  if [ "$g" = core ]; then m=$CORE; else m=$BASE; fi
  out=results/fedld/${dataset}_beta$b
  mkdir -p "$out"
  # one job per folder at a time: both groups share the folder's config and cells
  flock "$out.lock" .venv/bin/robustlab fedld run --dataset "$dataset" --data-dir "$data_dir" --clients 5 \
    --beta "$b" --methods "$m" --rounds 100 --seeds "$s" --seed 0 --num-cpus 1 --out "$out" \
    >> "$out.log" 2>&1
  echo "$(date +%T) beta=$b $g seeds=$s rc=$?"
}
export -f job
jobs | xargs -P 2 -L 1 bash -c 'job "$0" "$1" "$2"'
echo "$(date +%T) sweep finished"
