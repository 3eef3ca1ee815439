# Two commands do all set-up (see README):
#   make run   - create/refresh the environment, then run the main job on the embedded default
#   make test  - create/refresh the environment, then run the test suite
# The environment (.venv, ~5 GB with torch) is rebuilt only when requirements.lock changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lock-installed
UV_VERSION := 0.13.8

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export AWS_REQUEST_CHECKSUM_CALCULATION := when_required
# sam2 is an sdist: build it without its optional CUDA extension (no compiler work, any machine).
export SAM2_BUILD_CUDA := 0
# dvc.yaml stages call `python -m gara.cli`: make that the environment's python.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: env run test bench lint lock clean-env

env: $(STAMP)

# The stamp records the lock's hash, so a changed lock re-syncs and an unchanged one costs nothing.
# Build constraints = the lock: sam2's build needs torch, and gets the pinned one (already cached).
$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip sync --python $(BIN)/python --build-constraints requirements.lock requirements.lock
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	@sha256sum requirements.lock pyproject.toml > $(STAMP)

# The main job on the embedded default: fetch the versioned sample from the in-repo DVC
# store (no credentials, no network), then run the pipeline's stages (dvc.yaml; the full
# comparison, pipelines/comparison/dvc.yaml, is `dvc repro pipelines/comparison/dvc.yaml`).
run: env
	$(BIN)/dvc pull data.dvc
	$(BIN)/dvc repro
	$(BIN)/dvc status dvc.yaml data.dvc

# The demo page test drives Chromium through Playwright (which downloads no browser): Debian's
# package, installed when missing (root, or sudo), or the binary GARA_CHROMIUM names.
CHROMIUM := $(or $(GARA_CHROMIUM),/usr/bin/chromium)
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
$(CHROMIUM):
	@command -v apt-get > /dev/null || { echo "no $(CHROMIUM) and no apt-get: install Chromium" \
	  "and set GARA_CHROMIUM to its binary (the demo page test drives it)"; exit 1; }
	$(SUDO) apt-get install -y -qq chromium > /dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium > /dev/null)

# Whole modules per worker, one worker per core (at most 4: each holds its own servers):
# most of the suite waits on servers and subprocesses (2 workers: 18:42 where 1 took 27:53,
# README). TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= auto
# The sample data (in-repo DVC store, no network) lets the tests check the committed dataset.
test: env $(CHROMIUM)
	$(BIN)/dvc pull -q data.dvc
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile --no-loadscope-reorder

bench: env
	$(BIN)/python bench/bench_adapters.py
	$(BIN)/python bench/bench_corruptions.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_ray_stages.py
	$(BIN)/python bench/bench_allocator.py

lint: env
	$(BIN)/ruff check .

# Re-pin every dependency (needs the package registry).
lock: env
	$(BIN)/uv pip compile --python-version 3.11 --build-constraints requirements.lock requirements.in \
	  -o requirements.lock

clean-env:
	rm -rf $(VENV)

# Local stack (infra/README.md): S3 (moto, in memory), MLflow, Prefect and a Ray head on
# 127.0.0.1; `source .stack/env.sh` afterwards. `down` stops exactly what `up` started.
.PHONY: stack-up stack-down stack-status image
stack-up: env
	$(BIN)/python infra/local/stack.py up --state-dir .stack
stack-down:
	$(BIN)/python infra/local/stack.py down --state-dir .stack
stack-status:
	$(BIN)/python infra/local/stack.py status --state-dir .stack

# The one cluster image (infra/docker/Dockerfile; name and tag from infra/contract.yaml).
IMAGE ?= ghcr.io/example-org/gara-sam:0.1.0
image:
	docker build -f infra/docker/Dockerfile -t $(IMAGE) .
