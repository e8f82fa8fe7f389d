# The README's two commands: `make demo` runs the whole pipeline, `make test` runs the tests.
# Each creates .venv (Python >= 3.10) and installs what it needs on first use.
#
# PyTorch: TORCH_SPEC is installed first. On a machine with a GPU, pip's default index gives the
# ordinary CUDA build. On a CPU-only machine, make pip see a CPU build first (a local wheel via
# PIP_FIND_LINKS, or PyTorch's CPU wheel index via PIP_EXTRA_INDEX_URL); otherwise the CUDA
# build is installed, which also runs on a CPU but is several GB.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0 torchvision==0.28.0
BIN := $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/vlsae demo $(ARGS)

test: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/pytest -q $(ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) vlsae-demo
