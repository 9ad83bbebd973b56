#!/usr/bin/env bash
# The fair comparison on the procedural shapes (budget cpu-fair-v1, named cpu-fair when it ran: 3 training seeds), as run for results/shapes-fair/.
# One process per training seed, one thread each; round 1 trains the teachers and the stage-2 sweep, round 2 (after
# every seed's sweep is done, so the learning rates are chosen) trains the rest and evaluates; the last call gathers
# the cached evaluations into report.md. Rerunning any line resumes it. From the repository root, venv active.
set -euo pipefail
OUT=${OUT:-runs/shapes-fair}
LOGS=${LOGS:-$OUT.logs}  # beside the comparison: its folder holds only what compare makes
mkdir -p "$LOGS"
for round in 1 2; do
  for s in 0 1 2; do
    OMP_NUM_THREADS=1 perceptual-diffusion compare --out "$OUT" --budget cpu-fair-v1 --seeds "$s" \
      > "$LOGS/round$round-seed$s.log" 2>&1 &
  done
  wait
done
perceptual-diffusion compare --out "$OUT" --budget cpu-fair-v1 2>&1 | tee "$LOGS/gather.log"
mkdir -p results/shapes-fair
cp "$OUT"/{report.md,results.json,budget.json,*.png} results/shapes-fair/
cp -r "$OUT/grids" results/shapes-fair/
