# InstructEdit developer commands. `make run` starts the stack, `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# MODEL=tiny runs fully offline with a generated tiny model; any hub id or directory works.
MODEL ?=
HOST ?= 127.0.0.1
PORT ?= 8000

export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install lock run test test-slow lint format tiny-model clean

# ------------------------------------------------------------------------- dependencies
# The virtualenv holds exactly what the lock files pin, and is built anew from them whenever
# pyproject.toml or a lock changes: first torch, the CPU build (requirements/torch-cpu.txt),
# then everything else (requirements/dev.txt, which locks pip and setuptools too), both
# hash-checked and with --no-deps, so that pip resolves nothing outside the lock (an unpinned
# torch would pull a multi-GB CUDA build), then the project itself, built with the locked
# setuptools. TORCH_INDEX_URL is the index torch comes from, e.g.
# https://download.pytorch.org/whl/cpu; unset, pip's own configuration must find the wheel
# (on this project's machines it is in a local wheel directory).
TORCH_INDEX_URL ?=
PIP_LOCKED = $(BIN)/python -m pip install --quiet --require-hashes --no-deps
NO_TORCH_HINT = make: no torch as requirements/torch-cpu.txt pins it \
	$(if $(TORCH_INDEX_URL),at TORCH_INDEX_URL=$(TORCH_INDEX_URL) (unreachable? a mirror of \
	the PyTorch CPU index does too),where pip looks: \
	set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)

$(VENV)/.installed: pyproject.toml requirements/torch-cpu.txt requirements/dev.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP_LOCKED) $(if $(TORCH_INDEX_URL),--index-url '$(TORCH_INDEX_URL)') \
		-r requirements/torch-cpu.txt || { echo '$(NO_TORCH_HINT)' >&2; exit 1; }
	$(PIP_LOCKED) -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

install: $(VENV)/.installed

# `make lock` re-resolves requirements/*.txt after a change to pyproject.toml, keeping every
# pin it can; `make lock UPGRADE=1` moves all of them to the newest releases allowed. uv
# (UV_VERSION, installed into var/uv) resolves for Linux, macOS and Windows and every Python
# >= 3.11 at once (--universal) and writes the hashes of the files on PyPI. dev.txt is
# resolved first and every image lock is constrained to it, so that the images ship the
# versions the tests ran with. torch is left out of the locks (torch-cpu.txt pins it, by
# hand: the PyTorch index's hashes), but its dependencies are in, resolved from the
# metadata of the CPU wheel, which uv reads from TORCH_FIND_LINKS: TORCH_INDEX_URL's torch
# page when that is set, else pip's find-links (PIP_FIND_LINKS), else the PyTorch CPU index.
UV_VERSION ?= 0.13.8
UV := var/uv/bin/uv
TORCH_FIND_LINKS ?= $(if $(TORCH_INDEX_URL),$(TORCH_INDEX_URL)/torch/,$(or \
	$(PIP_FIND_LINKS),https://download.pytorch.org/whl/cpu/torch/))
UV_COMPILE = $(UV) pip compile --quiet --universal --generate-hashes \
	--custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade)
LOCK_PROJECT = $(UV_COMPILE) pyproject.toml requirements/build.in \
	--find-links '$(TORCH_FIND_LINKS)' --override requirements/torch-cpu.txt \
	--no-emit-package torch

$(UV):
	$(PYTHON) -m venv var/uv
	var/uv/bin/python -m pip install --quiet uv==$(UV_VERSION)

lock: $(UV)
	$(LOCK_PROJECT) --extra dev -o requirements/dev.txt
	$(LOCK_PROJECT) --extra api -c requirements/dev.txt -o requirements/api.txt
	$(LOCK_PROJECT) --extra worker -c requirements/dev.txt -o requirements/worker.txt
	$(LOCK_PROJECT) --extra worker --extra gpu -c requirements/dev.txt \
		-o requirements/worker-gpu.txt
	$(LOCK_PROJECT) --extra datagen -c requirements/dev.txt -o requirements/datagen.txt
	$(LOCK_PROJECT) --extra datagen --extra gpu -c requirements/dev.txt \
		-o requirements/datagen-gpu.txt
	$(UV_COMPILE) requirements/bake.in -c requirements/dev.txt -o requirements/bake.txt

run: install
	MODEL='$(MODEL)' HOST='$(HOST)' PORT='$(PORT)' VENV='$(VENV)' bash scripts/run-local.sh

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
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
# what its image lacks, pinned in bench/gpu_requirements.txt at the versions of the lock
# (tests/bench/test_gpu_session.py), downloaded into .whl/.
GPU_PYTHON_VERSION ?= 3.12
.PHONY: gpu-wheels
gpu-wheels: install
	rm -rf .whl
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: \
		--python-version $(GPU_PYTHON_VERSION) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl -r bench/gpu_requirements.txt
