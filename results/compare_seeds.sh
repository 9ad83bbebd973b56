#!/usr/bin/env bash
# One process per training seed (one thread each) of `compare --budget BUDGET --out OUT`, then the gathering call,
# whose report, results, budget, plots and grids are copied into DEST. Each call does what it can and exits; a seed
# whose next step waits on another seed's work (the stage-2 sweep and its extensions, a guidance grid's extension)
# calls again a few minutes later (a resumed call replays its cached steps in about a minute), so no core idles
# while one seed lags. Rerunning resumes. Used by the run.sh of each comparison folder; from the repository root,
# venv active:  bash results/compare_seeds.sh BUDGET OUT DEST  (LOGS, WAIT and SEEDS from the environment)
set -euo pipefail
BUDGET=$1
OUT=$2
DEST=$3
LOGS=${LOGS:-$OUT.logs}  # beside the comparison: its folder holds only what compare makes
SEEDS=${SEEDS:-"0 1 2"}
mkdir -p "$LOGS"
run_seed() {  # until the seed's own work is done: "this process's seeds are done" ends its log
  for _ in $(seq 1 40); do
    OMP_NUM_THREADS=1 perceptual-diffusion compare --out "$OUT" --budget "$BUDGET" --seeds "$1" \
      >> "$LOGS/seed$1.log" 2>&1 || return 1
    tail -n 1 "$LOGS/seed$1.log" | grep -q "this process's seeds are done" && return 0
    sleep "${WAIT:-240}"  # it waits on another seed's sweep or grid points
  done
  return 1
}
for s in $SEEDS; do run_seed "$s" & done
for s in $SEEDS; do
  wait -n || { echo "error: a seed's compare failed, or its work was not done after 40 calls: see $LOGS/seed*.log" >&2; exit 1; }
done
OMP_NUM_THREADS=2 perceptual-diffusion compare --out "$OUT" --budget "$BUDGET" 2>&1 | tee "$LOGS/gather.log"
mkdir -p "$DEST"
cp "$OUT"/{report.md,results.json,budget.json,*.png} "$DEST"/
cp -r "$OUT/grids" "$DEST"/
