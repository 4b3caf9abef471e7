# One entry point for people and CI. Every target builds .venv itself, so a fresh
# clone needs nothing but python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean sysdeps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian tools the tests and benchmarks use (openssl is the benchmark reference).
sysdeps:
	@if ! command -v openssl >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq openssl; \
	  else echo "openssl is missing: install it (apt-get install openssl)"; exit 1; fi; fi

demo: $(STAMP)
	$(BIN)/otaguard demo

test: $(STAMP) sysdeps
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src

bench: $(STAMP) sysdeps
	$(BIN)/python bench/verify_throughput.py
	$(BIN)/python bench/agent_rss.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
