# The two commands: `make demo` and `make test`. Both create the virtualenv when it is absent and install
# (torch pinned first, then the package with its dev extras under constraints.txt) only when pyproject.toml,
# constraints.txt or this file changed since the last install. `.ci/run` is `make test`.
#
#   make demo       set up, then the offline vision demo (mmrl train configs/vision/demo.yaml)
#   make demo-gen   set up, then the offline image-generation demo (configs/image_gen/demo.yaml)
#   make test       set up, then `ruff check .` and the test suite (python -m pytest -q tests)
#   make lint       set up, then `ruff check .` only
#   make setup      only create/refresh the virtualenv
#   make clean      remove the demos' outputs (runs/demo, runs/image_gen_demo) and the pytest/ruff caches;
#                   the virtualenv and every other run under runs/ are kept
#
# Variables: PYTHON (interpreter that creates the venv), VENV (its folder), TORCH_VERSION (the one place the
# torch pin lives), DEMO_ARGS (extra key=value overrides for the demos), PYTEST_ARGS (extra pytest flags).

PYTHON ?= python3
VENV ?= .venv
# Pinned and installed first: a looser torch requirement pulls gigabytes of CUDA wheels.
TORCH_VERSION ?= 2.13.0
DEMO_ARGS ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip --quiet

.DEFAULT_GOAL := help
.PHONY: help setup demo demo-gen test lint clean

help:
	@sed -n 's/^#   make /make /p' $(firstword $(MAKEFILE_LIST))

# The interpreter exists once the venv does: order-only below, so an existing venv is never recreated.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(STAMP): pyproject.toml constraints.txt Makefile | $(BIN)/python
	$(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e ".[dev]" -c constraints.txt
	@touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/mmrl train configs/vision/demo.yaml $(DEMO_ARGS)

demo-gen: $(STAMP)
	$(BIN)/mmrl train configs/image_gen/demo.yaml $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# Make stops at the first failing command, and pytest exits 5 when it collects no test: so does `make test`.
test: $(STAMP)
	@$(BIN)/python -c "import torch, transformers, trl; print('torch', torch.__version__, '| transformers', \
	transformers.__version__, '| trl', trl.__version__)"
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf runs/demo runs/image_gen_demo .pytest_cache .ruff_cache
