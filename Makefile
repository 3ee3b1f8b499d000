# The README's two commands: `make demo` (main job on the built-in samples) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv clean

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: venv
	$(BIN)/wsiseg demo --out demo_output

# One torch thread per test process: two processes on two cores beat two threads each.
test: venv
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto

clean:
	rm -rf $(VENV) demo_output .pytest_cache
