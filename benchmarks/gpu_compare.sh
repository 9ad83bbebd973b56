#!/usr/bin/env bash
# A time-boxed fair comparison on one GPU: Fashion-MNIST, the medium U-Net, 3 training seeds in parallel processes
# on the one GPU, then the report; everything packed into $OUT/gpu-compare.tar.gz (report.md, results.json, plots,
# grids, logs, timings). Sized by estimate to end inside ~7 minutes on an H100/H200 (not yet measured on one);
# `timeout` stops it at $TIME_BOX seconds and whatever exists is packed.
#
# On the device machine (nothing can be downloaded there), prepare here first: bash benchmarks/gpu_prepare.sh,
# then run with carry [".whl", ".fmnist"]:
#   bash benchmarks/gpu_compare.sh
# On the CPU, with tiny sizes (the project's test of this script):
#   OUT=/tmp/gpu-out DATA=shapes PRESET=tiny BATCH=8 STEPS=4 FINETUNE=2 SAMPLES=12 CURVE=12 SEEDS=2 DEVICE=cpu \
#     bash benchmarks/gpu_compare.sh
#   EXTRA_ARGS: more compare options (the CPU test passes --no-inception --no-guidance-grids: plumbing only)
#   ARCH=dit PRESET=small: the pixel DiT (issue 19); SCHEDULE=flow: the rectified-flow family (issue 18), e.g.
#     ARCH=dit PRESET=base SCHEDULE=flow bash benchmarks/gpu_compare.sh   (the DiT's GPU preset, unmeasured)
set -uo pipefail
OUT=${OUT:-gpu-out}
RUN=${RUN:-runs/gpu-compare}
PRESET=${PRESET:-medium}
ARCH=${ARCH:-unet}          # unet or dit (then PRESET is a DiT preset: tiny, small, small-p2, base)
SCHEDULE=${SCHEDULE:-ddpm}  # ddpm (the paper's zero-SNR v-prediction) or flow (rectified flow)
STEPS=${STEPS:-3000}        # step cap of each stage-1 phase (chunks of 1000 steps, or fewer)
FINETUNE=${FINETUNE:-500}   # stage-2 steps of each branch
SAMPLES=${SAMPLES:-2000}    # samples per headline row
CURVE=${CURVE:-1000}        # samples per curve / sweep point
SEEDS=${SEEDS:-3}
BATCH=${BATCH:-256}
BOOTSTRAP=${BOOTSTRAP:-1000}
DATA=${DATA:-fashion-mnist}
DEVICE=${DEVICE:-cuda}
TIME_BOX=${TIME_BOX:-420}

if [ -d .whl ]; then  # the device machine: carried wheels and this checkout on PYTHONPATH
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
fi
[ -d .fmnist ] && export FASHION_MNIST_DIR=$PWD/.fmnist
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
PD="$PY -m perceptual_diffusion.cli"
# The device first, in one line: without it all 7 processes would fail and the reason would sit in their logs only.
if [ "${DEVICE%%:*}" = cuda ]; then
  why=$("$PY" -c 'import torch
print("" if torch.cuda.is_available() else f"PyTorch {torch.__version__} sees no CUDA GPU")' 2>&1) \
    || why="its Python cannot import torch (${why##*$'\n'})"
  if [ -n "$why" ]; then
    echo "error: gpu_compare.sh needs a CUDA GPU for DEVICE=$DEVICE, but $why; run it on a GPU machine, or with" \
      "DEVICE=cpu and tiny sizes (see its header)" >&2
    exit 2
  fi
fi
# The logs live beside the comparison, not in it: its folder holds only what compare makes (ownership markers).
mkdir -p "$OUT/logs" "$RUN"
[ "$DEVICE" = cpu ] && export OMP_NUM_THREADS=1  # one thread per seed's process
ARGS=(compare --out "$RUN" --budget gpu --data "$DATA" --arch "$ARCH" --preset "$PRESET" --schedule "$SCHEDULE"
      --batch-size "$BATCH" --steps "$STEPS"
      --finetune-steps "$FINETUNE" --eval-samples "$SAMPLES" --curve-samples "$CURVE" --training-seeds "$SEEDS"
      --bootstrap "$BOOTSTRAP" ${EXTRA_ARGS:-}
      --device "$DEVICE")
start=$(date +%s)
{
  echo "command: $PD ${ARGS[*]}"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
} > "$OUT/timing.log"
export PD RUN OUT SEEDS start
export ARGS_TEXT="${ARGS[*]}"
# Round 1 (teachers and the stage-2 sweep) and round 2 (the rest and every evaluation), one process per seed,
# then the report. timeout signals the whole process group, the seeds' processes included.
timeout "$TIME_BOX" bash -c '
  for round in 1 2; do
    for s in $(seq 0 $((SEEDS - 1))); do
      PYTHONUNBUFFERED=1 $PD $ARGS_TEXT --seeds "$s" > "$OUT/logs/round$round-seed$s.log" 2>&1 &
    done
    wait
    echo "round $round done at $(( $(date +%s) - start )) s" >> "$OUT/timing.log"
  done
  PYTHONUNBUFFERED=1 $PD $ARGS_TEXT > "$OUT/logs/gather.log" 2>&1
'
status=$?
echo "exit $status after $(( $(date +%s) - start )) s (124: stopped by the time box)" >> "$OUT/timing.log"
tar -czf "$OUT/gpu-compare.tar.gz" -C "$RUN" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.npz' \
  --exclude='checkpoints' --exclude='snapshots' . -C "$OUT" logs 2>/dev/null
cp "$RUN/report.md" "$OUT/" 2>/dev/null
cat "$OUT/timing.log"
exit $status
