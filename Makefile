VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint demo bench

install:
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"

test:
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check qwenmlx quantize scripts tests

bench:
	$(PY) scripts/bench.py
