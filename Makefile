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
	$(PY) -m compileall -q qwenmlx quantize scripts tests
