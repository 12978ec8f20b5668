# InstructEdit developer commands. `make run` starts the stack, `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# MODEL=tiny runs fully offline with a generated tiny model; any hub id or directory works.
MODEL ?=
HOST ?= 127.0.0.1
PORT ?= 8000

export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run test lint format tiny-model clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The CPU build of torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install
	MODEL='$(MODEL)' HOST='$(HOST)' PORT='$(PORT)' VENV='$(VENV)' bash scripts/run-local.sh

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check services tests bench

format: install
	$(BIN)/ruff format services tests bench
	$(BIN)/ruff check --fix .

tiny-model: install
	$(BIN)/python -m services.gpu_worker.tiny_model var/models/tiny

clean:
	rm -rf var .pytest_cache .ruff_cache

# Load test a running stack (e.g. `make run MODEL=tiny` in another terminal): LOADTEST_USERS
# users submit, poll and download jobs for LOADTEST_TIME; CSV statistics in LOADTEST_DIR.
LOADTEST_HOST ?= http://$(HOST):$(PORT)
LOADTEST_USERS ?= 4
LOADTEST_SPAWN_RATE ?= 2
LOADTEST_TIME ?= 60s
LOADTEST_DIR ?= var/loadtest

.PHONY: loadtest
loadtest: install
	mkdir -p $(LOADTEST_DIR)
	$(BIN)/locust -f tests/load/locustfile.py --headless --only-summary \
		--host '$(LOADTEST_HOST)' --users $(LOADTEST_USERS) \
		--spawn-rate $(LOADTEST_SPAWN_RATE) --run-time $(LOADTEST_TIME) --stop-timeout 30 \
		--csv $(LOADTEST_DIR)/locust --csv-full-history

# Wheels for bench/gpu_session.sh on a lent GPU machine (Python 3.12, x86-64, no internet):
# what its image lacks, pinned in bench/gpu_requirements.txt, downloaded into .whl/.
GPU_PYTHON_VERSION ?= 3.12
.PHONY: gpu-wheels
gpu-wheels: install
	rm -rf .whl
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: \
		--python-version $(GPU_PYTHON_VERSION) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl -r bench/gpu_requirements.txt
