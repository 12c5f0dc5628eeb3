# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv clean

$(BIN)/spade-batch: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,efficientnet]'
	touch $(BIN)/spade-batch

venv: $(BIN)/spade-batch

demo: venv
	$(BIN)/spade-batch demo --out demo-output

test: venv
	$(BIN)/ruff check spade_batch tests benchmarks jobs scripts
	$(BIN)/python -m pytest -q
