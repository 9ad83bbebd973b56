#!/usr/bin/env bash
# The fair comparison on Fashion-MNIST 28px (budget cpu-fair-fmnist-v1, named cpu-fair-fmnist when it ran: 3 training seeds), as run for
# results/fmnist-fair/. Needs the Debian package dataset-fashion-mnist (`make data`). One process per training seed,
# one thread each; round 1 trains the teachers and the stage-2 sweep, round 2 (after every seed's sweep is done, so
# the learning rates are chosen) trains the rest and evaluates; the last call gathers the cached evaluations into
# report.md. Rerunning any line resumes it. From the repository root, venv active.
set -euo pipefail
OUT=${OUT:-runs/fmnist-fair}
LOGS=${LOGS:-$OUT.logs}  # beside the comparison: its folder holds only what compare makes
mkdir -p "$LOGS"
for round in 1 2; do
  for s in 0 1 2; do
    OMP_NUM_THREADS=1 perceptual-diffusion compare --out "$OUT" --budget cpu-fair-fmnist-v1 --seeds "$s" \
      > "$LOGS/round$round-seed$s.log" 2>&1 &
  done
  wait
done
perceptual-diffusion compare --out "$OUT" --budget cpu-fair-fmnist-v1 2>&1 | tee "$LOGS/gather.log"
mkdir -p results/fmnist-fair
cp "$OUT"/{report.md,results.json,budget.json,*.png} results/fmnist-fair/
cp -r "$OUT/grids" results/fmnist-fair/
