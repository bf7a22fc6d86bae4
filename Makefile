# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench gpu-check install clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sftkit demo

# Lint first (settings in pyproject.toml): formatting, ruff's rules, then mypy over src/sftkit.
test: $(STAMP)
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -x --durations=15

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[test,bench]"
	$(BIN)/python bench/vs_trl.py
	$(BIN)/python bench/loss_memory.py
	$(BIN)/python bench/plan_accuracy.py

# On a CUDA machine: the `cuda` tests, bench/vs_trl.py --gpu, bench/attention.py --gpu and bench/compile.py (needs the
# bench extra: `make bench` once, or offline see bench/README.md). Without CUDA (or with DRY=1) the
# same stages run on CPU at their smallest: wiring, not figures.
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py $(if $(DRY),--dry)

clean:
	rm -rf $(VENV) runs
