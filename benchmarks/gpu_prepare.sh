#!/usr/bin/env bash
# Prepare what benchmarks/gpu_compare.sh needs on a device machine that can download nothing: the wheels the
# machine's image lacks (diffusers, prdc, peft) into .whl/, Fashion-MNIST's IDX files into .fmnist/ (both git-ignored).
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
grep -qx '/.fmnist/' .git/info/exclude || echo /.fmnist/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 prdc==0.2 peft==0.21.2
mkdir -p .fmnist
cp /usr/share/datasets/fashion-mnist/*ubyte* .fmnist/
du -sh .whl .fmnist
