# One command each: `make demo` sets up and runs the offline demo; `make test` sets up and runs
# lint and the tests. Both create .venv on first use (PyTorch 2.13.0, CPU build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test test-all setup setup-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Install PyTorch first, pinned: an unpinned `torch` would pull a multi-gigabyte CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

demo: setup
	$(BIN)/aiayn demo

test: setup-test
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/pytest -q

# Everything, including the tests marked slow (minutes on a CPU).
test-all: setup-test
	$(BIN)/pytest -q -m ""

clean:
	rm -rf $(VENV) runs
