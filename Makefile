# One entry point for people and CI. Every target builds .venv itself, so a fresh
# clone needs nothing but python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench scan clean sysdeps

# tpm2-pytss builds from source against libtss2 (pkg-config), hence sysdeps first.
$(STAMP): pyproject.toml | sysdeps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,tpm]'
	touch $(STAMP)

# Debian tools the tests and benchmarks use: openssl is the benchmark reference; swtpm
# (swtpm-tools: swtpm_setup) is the software TPM the TPM anti-rollback tests run against;
# tpm2-tools to inspect it by hand; libtss2-dev and pkg-config to build tpm2-pytss (it has
# no wheel); gcc and python3-dev for that build; nginx (nginx-light) is the TLS-terminating
# proxy of the production-topology tests. A TPM-held device key (ADR 0006) needs
# tpm2-openssl (the OpenSSL provider that presents it in TLS), tpm2-abrmd and its TCTI
# (libtss2-tcti-tabrmd0: several TPM clients at once) and D-Bus (abrmd's bus; dbus-send
# tells when abrmd is up). As root they are installed, otherwise listed (exit 1).
SYSDEPS_CMDS := openssl:openssl swtpm:swtpm swtpm_setup:swtpm-tools tpm2_nvread:tpm2-tools \
                pkg-config:pkg-config gcc:gcc nginx:nginx-light tpm2-abrmd:tpm2-abrmd \
                dbus-daemon:dbus-daemon dbus-send:dbus-bin
OSSL_MODULES := $(shell openssl version -m 2>/dev/null | sed -n 's/^MODULESDIR: "\(.*\)"/\1/p')
sysdeps:
	@missing=""; \
	for pair in $(SYSDEPS_CMDS); do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v "$${pair%%:*}" >/dev/null 2>&1 \
	    || missing="$$missing $${pair#*:}"; done; \
	pkg-config --exists tss2-esys 2>/dev/null || missing="$$missing libtss2-dev"; \
	[ -n "$(OSSL_MODULES)" ] && [ -f "$(OSSL_MODULES)/tpm2.so" ] || missing="$$missing tpm2-openssl"; \
	{ ldconfig -p 2>/dev/null || /sbin/ldconfig -p; } | grep -q libtss2-tcti-tabrmd || missing="$$missing libtss2-tcti-tabrmd0"; \
	[ -f "$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
	  || missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (apt-get install$$missing)"; exit 1; fi; fi

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

# sslyze in a venv of its own: it pins an older `cryptography` than otaguard needs. The scan
# enrolls a device and presents its certificate: it covers the mutual-TLS device API.
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
