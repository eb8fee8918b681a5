#!/usr/bin/env bash
# Regime pilot (issue 16): FedAvg with an ImageNet-pretrained EfficientNet-Lite0 at 64 px on RetinaMNIST,
# 5 clients, beta 1, pilot seed 100 (not one of the grid's seeds 0-2), 12 rounds (started at 20, cut to 12 at round
# 10: a round costs 2.5-3.5 min on the shared 2 cores, so 20-round grid cells could not run), at two client learning
# rates side by side (one CPU each). results/fedld/choose_regime.py then picks lr and rounds from FedAvg's
# validation curves alone and writes results/fedld/regime.json, which the grid (regime_sweep.sh) reads.
# Resumable: a finished cell is skipped, a killed one continues from its last round.
# Usage (repo root): results/fedld/regime_pilot.sh [DATA_DIR]
set -u
cd "$(dirname "$0")/../.."
data_dir=$(cd "${1:-../shared/data/medmnist}" && pwd)
export data_dir
pilot() {
  local lr=$1 out=results/fedld/regime_pilot_lr$1
  mkdir -p "$out"
  # this checkout's sources, whatever the venv's editable install points at
  OMP_NUM_THREADS=1 PYTHONPATH="$PWD/src" .venv/bin/python -c 'from robustlab.cli import main; main()' fedld run --dataset retinamnist --data-dir "$data_dir" --clients 5 \
    --beta 1 --methods fedavg --rounds 12 --seeds 1 --seed 100 --lr "$lr" --num-cpus 1 \
    --model efficientnet-lite0 --pretrained --image-size 64 --out "$out" >> "$out.log" 2>&1
  echo "$(date +%T) pilot lr=$lr rc=$?"
}
export -f pilot
printf '%s\n' 0.01 0.001 | xargs -P 2 -L 1 bash -c 'pilot "$0"'
