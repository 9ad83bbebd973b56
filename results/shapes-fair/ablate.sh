#!/usr/bin/env bash
# The ablation under the fair protocol (budget cpu-fair-v1, named cpu-fair when it ran; 3 training seeds), as run for results/shapes-fair/ablation.md.
# Run after run.sh in the same folder: it reuses that run's teachers, its stage-2 runs and the learning rates its
# sweep chose (results.json). One process per training seed, one thread each; the last call gathers the cached
# evaluations into ablation.md. Rerunning any line resumes it. From the repository root, venv active.
set -euo pipefail
OUT=${OUT:-runs/shapes-fair}
LOGS=${LOGS:-$OUT.logs}  # beside the comparison: its folder holds only what compare makes
mkdir -p "$LOGS"
for s in 0 1 2; do
  OMP_NUM_THREADS=1 perceptual-diffusion ablate --out "$OUT" --budget cpu-fair-v1 --seeds "$s" \
    > "$LOGS/ablate-seed$s.log" 2>&1 &
done
wait
perceptual-diffusion ablate --out "$OUT" --budget cpu-fair-v1 2>&1 | tee "$LOGS/ablate-gather.log"
cp "$OUT"/{ablation.md,ablation.json} results/shapes-fair/
