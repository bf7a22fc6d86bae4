# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The lower bounds of pyproject.toml's ranges, in a virtualenv of their own.
MIN_VENV ?= .venv-min

.PHONY: demo test test-min test-deepspeed bench gpu-check install clean

# The exact versions CI tests (constraints/lock.txt); pyproject.toml itself gives ranges.
$(STAMP): pyproject.toml constraints/lock.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints/lock.txt -e ".[test]"
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

# The oldest version of every dependency (constraints/min.txt), then the fast tests.
test-min:
	test -d $(MIN_VENV) || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install -q -c constraints/min.txt -e ".[test]"
	$(MIN_VENV)/bin/python -m pytest -q -m "not slow and not cuda" --durations=5

# DeepSpeed ZeRO-2/3 on CPU (2 processes against 1 with GA, and resume); the first run compiles one
# DeepSpeed op (a C++ compiler is needed, a few minutes, cached in ~/.cache/torch_extensions).
test-deepspeed: $(STAMP)
	$(BIN)/pip install -q -c constraints/lock.txt -e ".[test,deepspeed]"
	$(BIN)/python -m pytest -q tests/test_deepspeed.py

bench: $(STAMP)
	$(BIN)/pip install -q -c constraints/lock.txt -e ".[test,bench]"
	$(BIN)/python bench/vs_trl.py
	$(BIN)/python bench/loss_memory.py
	$(BIN)/python bench/plan_accuracy.py

# The GPU check: the `cuda` tests, a QLoRA step, bench/vs_trl.py --gpu, bench/attention.py --gpu, bench/compile.py
# (stages in bench/gpu_check.py). On a bare CUDA image (no .venv, no network) it runs on python3 with the wheels of
# bench/fetch_wheels.sh: `make gpu-check WHEELS=.whl`; bench/README.md gives every step. Without CUDA (or with
# DRY=1) the same stages run on CPU at their smallest: wiring, not figures.
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) bench/gpu_check.py $(if $(DRY),--dry) $(if $(WHEELS),--wheels $(WHEELS))

clean:
	rm -rf $(VENV) $(MIN_VENV) runs
