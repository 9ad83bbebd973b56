#!/usr/bin/env bash
# The stage-1 learning-rate sweep for a model family the cpu-fair-fmnist protocol has not trained before (issue 18
# item 7: "stage 1's learning rates may not suit flow: sweep them"; issue 19 item 5: the DiT's own lr sweep). Stage
# 1's first phase is `train` at a constant lr after the default warm-up, batch 64, on Fashion-MNIST 28px; this runs
# that phase for each lr in LRS to STEPS steps (a snapshot every 500, as the protocol's chunks) and scores each
# snapshot by FID in the domain classifier's features on 1,000 held-out sampling seeds (the curve's seeds,
# 1,000,000 on), so the lr the budget's first phase uses is the one whose curve is lowest. One process per lr, one
# thread each; rerunning resumes the runs and skips scored snapshots. From the repository root, venv active:
#
#   SCHEDULE=flow bash results/stage1-lr-sweep/run.sh                    # the flow U-Net (tiny preset)
#   ARCH=dit PRESET=small bash results/stage1-lr-sweep/run.sh            # the pixel DiT (DDPM family)
#
# Then: python results/stage1-lr-sweep/table.py runs/stage1-lr-sweep-$TAG  (a markdown table of FID by lr and step)
set -euo pipefail
ARCH=${ARCH:-unet}
PRESET=${PRESET:-tiny}
SCHEDULE=${SCHEDULE:-ddpm}
LRS=${LRS:-"5e-3 2e-3 1e-3 5e-4"}
STEPS=${STEPS:-2000}
SNAP=${SNAP:-500}        # snapshot and checkpoint interval (the protocol's chunk)
SAMPLES=${SAMPLES:-1000}  # held-out samples per score
TAG=${TAG:-$ARCH-$PRESET-$SCHEDULE}
OUT=${OUT:-runs/stage1-lr-sweep-$TAG}
mkdir -p "$OUT"
for lr in $LRS; do
  (
    run="$OUT/lr$lr"
    OMP_NUM_THREADS=1 perceptual-diffusion train --run-dir "$run" --data fashion-mnist --image-size 28 \
      --arch "$ARCH" --preset "$PRESET" --schedule "$SCHEDULE" --batch-size 64 --lr "$lr" --steps "$STEPS" \
      --snapshot-every "$SNAP" --checkpoint-every "$SNAP" --seed 0 --no-progress > "$run.log" 2>&1
    for snap in "$run"/snapshots/ema-*.safetensors; do
      json="$run/score-$(basename "$snap" .safetensors).json"
      [ -f "$json" ] && continue
      OMP_NUM_THREADS=1 perceptual-diffusion evaluate "$snap" -n "$SAMPLES" --seed 1000000 --steps 25 --features domain \
        --json "$json" --no-progress >> "$run.log" 2>&1
    done
  ) &
done
wait
python "$(dirname "$0")/table.py" "$OUT" | tee "$OUT/table.md"
