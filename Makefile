# Two commands from a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench-download clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# This exact torch pair is on the local disk of these machines (see shared/GUIDE.md §4):
	# asking for it first keeps the install offline and avoids a multi-GB download.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pipeline.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench-download: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/download.py

clean:
	rm -rf demo-data demo-output bench-work
