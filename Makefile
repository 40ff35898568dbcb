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

DEMO := demo/tiny-qwen3-moe
DEMO_PROMPT := Explain in one paragraph how a mixture-of-experts layer routes a token.

# The whole pipeline offline on a tiny random-weight model: build, convert (experts-4), summarise, generate.
demo:
	@echo "== The demo model has RANDOM weights: everything it writes is noise. Only the pipeline is shown. =="
	$(PY) scripts/make_tiny_checkpoint.py $(DEMO) --max-position-embeddings 1024 --force
	$(PY) -m qwenmlx convert $(DEMO) $(DEMO)-experts-4 --recipe experts-4 --group-size 32 --force
	$(PY) -m qwenmlx summarize tests/fixtures/documents/qwen3-moe-architecture.md --model $(DEMO)-experts-4 --max-tokens 48
	cat tests/fixtures/documents/*.md | $(PY) -m qwenmlx summarize - --model $(DEMO)-experts-4 --style bullets --max-tokens 48
	$(PY) -m qwenmlx generate --model $(DEMO)-experts-4 --prompt "$(DEMO_PROMPT)" --max-tokens 48
	@echo "== Random weights: the words above are noise. The strategies, progress and figures are the real pipeline. =="
