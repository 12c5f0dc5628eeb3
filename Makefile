# The commands of the README: `make demo`, `make test` and `make test-fast`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast venv browser clean

$(BIN)/spade-batch: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(BIN)/spade-batch

venv: $(BIN)/spade-batch

demo: venv
	$(BIN)/spade-batch demo --out demo-output

# The run report's test opens it in Debian's headless chromium through chromedriver.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
		echo "chromium/chromedriver not installed (needs apt-get as root): the browser test will be skipped"

# Both lanes: tests/unit, then tests/integration (a local Ray, an S3 server on loopback, command-line
# processes, the browser). CI runs this (.ci/run). Two processes, a test file each: while one waits on Ray or a
# process starting, the other computes.
test: venv browser
	$(BIN)/ruff check spade_batch tests benchmarks jobs scripts
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

# The unit lane alone: no Ray, S3 server, subprocess or browser; two pytest processes, under a minute on 2 idle cores.
test-fast: venv
	$(BIN)/ruff check spade_batch tests benchmarks jobs scripts
	$(BIN)/python -m pytest -q -n 2 tests/unit
