#!/usr/bin/env bash
# The regime grid (issue 16): ImageNet-pretrained EfficientNet-Lite0 at 64 px on RetinaMNIST, 5 clients,
# beta in {0.5, 100, 1}, methods FedAvg, FedAvg unweighted, FedLD, FedAvg with FedLD's server step, PG
# aggregation only, margin only, seeds 0-2, with the lr and rounds frozen in results/fedld/regime.json
# (choose_regime.py, from the FedAvg pilot's validation curves). Two lanes (one CPU each), one folder per
# beta (the two lanes work on different betas); jobs ordered so that a partial grid has FedLD (whose cell
# logs its update ratio and cosine against FedAvg every round), then FedAvg, first. Resumable: finished cells are skipped, a killed cell continues from its last round.
# Usage (repo root): results/fedld/regime_sweep.sh [DATA_DIR]
set -u
cd "$(dirname "$0")/../.."
data_dir=$(cd "${1:-../shared/data/medmnist}" && pwd)
lr=$(.venv/bin/python -c 'import json; print(json.load(open("results/fedld/regime.json"))["lr"])')
rounds=$(.venv/bin/python -c 'import json; print(json.load(open("results/fedld/regime.json"))["rounds"])')
export data_dir lr rounds
jobs() {  # one job = one (beta, methods) step of a folder, grown seed by seed
  for s in 1 2 3; do
    # FedLD first (its cell alone logs the update ratio and cosine against FedAvg on the same deltas), then
    # FedAvg; beta 0.5 and 100 side by side, then beta 1
    echo "0.5 fedld $s"; echo "100 fedld $s"; echo "0.5 fedavg,fedld $s"; echo "100 fedavg,fedld $s"
    echo "1 fedld $s"; echo "1 fedavg,fedld $s"
    for b in 0.5 100 1; do echo "$b fedavg,fedld,fedavg-slr,fedavg-unweighted,fedld-pg,fedld-margin $s"; done
  done
}
job() {
  local b=$1 m=$2 s=$3 out=results/fedld/regime_retinamnist_lite0_64_beta$1
  mkdir -p "$out"
  flock "$out.lock" env OMP_NUM_THREADS=1 PYTHONPATH="$PWD/src" .venv/bin/python -c \
    'from robustlab.cli import main; main()' fedld run --dataset retinamnist --data-dir "$data_dir" \
    --clients 5 --beta "$b" --methods "$m" --rounds "$rounds" --seeds "$s" --seed 0 --lr "$lr" --num-cpus 1 \
    --model efficientnet-lite0 --pretrained --image-size 64 --out "$out" >> "$out.log" 2>&1
  echo "$(date +%T) beta=$b methods=$m seeds=$s rc=$?"
}
export -f job
jobs | xargs -P 2 -L 1 bash -c 'job "$0" "$1" "$2"'
echo "$(date +%T) regime grid finished"
