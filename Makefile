# One entry point for people and CI. Every target builds .venv itself, so a fresh
# clone needs nothing but python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench scan clean sysdeps

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
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools
	$(BIN)/mypy src

bench: $(STAMP) sysdeps
	$(BIN)/python bench/verify_throughput.py
	$(BIN)/python bench/agent_rss.py

# sslyze in a venv of its own: it pins an older `cryptography` than otaguard needs.
SCAN_VENV := .venv-scan
$(SCAN_VENV)/.installed:
	$(PYTHON) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SCAN_VENV)/bin/python -m pip install --quiet 'sslyze>=6.1,<7'
	touch $@

scan: $(STAMP) $(SCAN_VENV)/.installed
	$(BIN)/python tools/tls_scan.py --sslyze-python $(SCAN_VENV)/bin/python

clean:
	rm -rf $(VENV) $(SCAN_VENV) .pytest_cache .mypy_cache .ruff_cache
