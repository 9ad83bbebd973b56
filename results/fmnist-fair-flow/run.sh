#!/usr/bin/env bash
# The fair comparison for a rectified-flow U-Net on Fashion-MNIST 28px (issue 18, item 7): the v2 protocol of
# results/fmnist-fair-v2 (budget cpu-fair-fmnist-flow: 3 training seeds, the paired plateau rule with stage 1 at the
# swept 5e-3 then 5e-4, each stage-2 branch's learning-rate sweep extended past an end up to twice, every guidance
# method at its best setting on held-out seeds, CFG-Zero* among them, the external-perceptual arm, the headline rows
# in Inception features), Euler sampling on diffusers' FlowMatchEuler grid. Needs `make data` and `make inception`.
# One process per training seed, one thread each; each call does what it can and exits, a seed waiting on another's
# work calls again a few minutes later, and the last call gathers the report. Rerunning resumes. From the
# repository root, venv active.
# Across sessions on fresh machines the unfinished folder travels through the repository: at the end of a session
#   python results/carry_state.py pack runs/fmnist-fair-flow results/fmnist-fair-flow/state   (then commit it)
# and at the start of the next
#   python results/carry_state.py unpack results/fmnist-fair-flow/state runs/fmnist-fair-flow && bash results/fmnist-fair-flow/run.sh
set -euo pipefail
bash "$(dirname "$0")/../compare_seeds.sh" cpu-fair-fmnist-flow "${OUT:-runs/fmnist-fair-flow}" results/fmnist-fair-flow
