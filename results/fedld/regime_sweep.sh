#!/usr/bin/env bash
# The regime grid (issue 16): ImageNet-pretrained EfficientNet-Lite0 at 64 px on RetinaMNIST, 5 clients,
# beta in {100, 1, 0.5}, methods FedAvg, FedAvg unweighted, FedLD, FedAvg with FedLD's server step, PG
# aggregation only, margin only, seeds 0-2, with the lr and rounds frozen in results/fedld/regime.json
# (choose_regime.py, from the FedAvg pilot's validation curves). One folder per beta.
#
# Job order (a partial grid is still informative): FedLD, FedAvg and FedAvg with FedLD's server step at every
# beta, seed 0, then seed 1, then seed 2 (the 3-seed answer to the shorter-server-step question comes first);
# then the other three methods, all three seeds, one method at a time. Lanes (one CPU each, LANES=2 default); a lane takes the first pending job whose beta folder the other lane is not using (one process per
# folder at a time). A job's --methods lists every method its folder has run so far plus the new one, so
# config.yaml names them all; only unfinished cells run. Resumable: finished cells are skipped, a killed cell
# continues from its last round.
# Usage (repo root): results/fedld/regime_sweep.sh [DATA_DIR]
#   LANES=2 (parallel jobs), FEDLD_SRC=DIR (the robustlab sources to run; default this checkout's src/)
set -u
cd "$(dirname "$0")/../.."
data_dir=$(cd "${1:-../shared/data/medmnist}" && pwd)
src=${FEDLD_SRC:-$PWD/src}
lr=$(.venv/bin/python -c 'import json; print(json.load(open("results/fedld/regime.json"))["lr"])')
rounds=$(.venv/bin/python -c 'import json; print(json.load(open("results/fedld/regime.json"))["rounds"])')
jobs() {  # "beta methods seeds", in priority order
  local order=(fedld fedavg fedavg-slr fedavg-unweighted fedld-pg fedld-margin)
  local core
  core=$(IFS=,; echo "${order[*]:0:3}")
  for s in 1 2 3; do  # the three methods of the shorter-server-step question, seed by seed
    for b in 1 0.5 100; do echo "$b $core $s"; done
  done
  for m in 3 4 5; do  # then the other three, all seeds at once
    for b in 1 0.5 100; do
      echo "$b $(IFS=,; echo "${order[*]:0:$((m + 1))}") 3"
    done
  done
}
job() {
  local b=$1 m=$2 s=$3 out=results/fedld/regime_retinamnist_lite0_64_beta$1
  mkdir -p "$out"
  OMP_NUM_THREADS=1 PYTHONPATH="$src" .venv/bin/python -c \
    'from robustlab.cli import main; main()' fedld run --dataset retinamnist --data-dir "$data_dir" \
    --clients 5 --beta "$b" --methods "$m" --rounds "$rounds" --seeds "$s" --seed 0 --lr "$lr" --num-cpus 1 \
    --model efficientnet-lite0 --pretrained --image-size 64 --out "$out" >> "$out.log" 2>&1
  echo "$(date -u +%T) beta=$b methods=$m seeds=$s rc=$?"
}
export -f job
export data_dir src lr rounds
jobs | LANES=${LANES:-2} .venv/bin/python -c '
import os, subprocess, sys, threading
jobs = [line.split() for line in sys.stdin if line.strip()]
busy, lock = set(), threading.Condition()
def lane():
    while True:
        with lock:
            while True:
                free = [j for j in jobs if j[0] not in busy]
                if not jobs or free:
                    break
                lock.wait()
            if not jobs:
                return
            j = free[0]
            jobs.remove(j)
            busy.add(j[0])
        subprocess.run(["bash", "-c", "job \"$0\" \"$1\" \"$2\"", *j], check=False)
        with lock:
            busy.discard(j[0])
            lock.notify_all()
lanes = [threading.Thread(target=lane) for _ in range(int(os.environ["LANES"]))]
for t in lanes: t.start()
for t in lanes: t.join()
'
echo "$(date -u +%T) regime grid finished"
