# One entry point for people and CI. Every target builds .venv itself, so a fresh
# clone needs nothing but python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench scan soak schema-check conformance conformance-checkout clean sysdeps postgres db-revision fuzz vboard vboard-sysdeps vboard-test

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
# tells when abrmd is up). Keys in a PKCS#11 token (ADR 0013) are tested against SoftHSM2
# (softhsm2: softhsm2-util and its module libsofthsm2.so); opensc's pkcs11-tool inspects a
# token by hand. The install benchmark's reference is RAUC (rauc; its bundles need
# mksquashfs from squashfs-tools), run on a private session D-Bus. Block-device slots and
# bootloader environments (ADR 0023) are tested on partitioned loop devices: sfdisk
# (fdisk) writes the GPT, losetup/partx/blkid (util-linux) attach it and register its
# partitions (this kernel parses no partition tables itself), mkfs.ext4 (e2fsprogs) makes
# the file system a mounted-slot test mounts; fw_printenv/fw_setenv (libubootenv-tool),
# grub-editenv (grub-common) and mkenvimage (u-boot-tools) cross-check the environment
# formats; systemd-analyze (systemd) verifies the shipped units. Fleet monitoring's MQTT
# tests start their own broker (mosquitto, /usr/sbin/mosquitto) with the shipped
# deploy/mosquitto config (ADR 0026). The dashboard's tests drive Debian's headless
# Chromium (chromium) through its chromedriver (chromium-driver) with selenium (ADR 0035).
# tuf-conformance (make conformance) runs the client under faketime (faketime) for its
# expiry tests (ADR 0037). As root they are installed, otherwise listed (exit 1).
SYSDEPS_CMDS := openssl:openssl swtpm:swtpm swtpm_setup:swtpm-tools tpm2_nvread:tpm2-tools \
                pkg-config:pkg-config gcc:gcc nginx:nginx-light tpm2-abrmd:tpm2-abrmd \
                dbus-daemon:dbus-daemon dbus-send:dbus-bin softhsm2-util:softhsm2 \
                pkcs11-tool:opensc rauc:rauc mksquashfs:squashfs-tools \
                sfdisk:fdisk losetup:util-linux partx:util-linux blkid:util-linux \
                mkfs.ext4:e2fsprogs fw_printenv:libubootenv-tool grub-editenv:grub-common \
                mkenvimage:u-boot-tools systemd-analyze:systemd mosquitto:mosquitto \
                chromium:chromium chromedriver:chromium-driver \
                faketime:faketime
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

# The virtual board (ADR 0033) is opt-in and not part of `make test`: its Debian tools are
# installed here, not by sysdeps. mmdebstrap builds the root file system from this machine's
# apt sources; qemu-system-x86 (TCG: KVM does not work on this machine) and ovmf (UEFI
# firmware) boot it; grub-efi-amd64-bin is GRUB's EFI image for grub-mkstandalone;
# dosfstools (mkfs.vfat) and mtools (mcopy) make the ESP without mounting it (no vfat in
# this kernel).
VBOARD_CMDS := mmdebstrap:mmdebstrap qemu-system-x86_64:qemu-system-x86 mkfs.vfat:dosfstools \
               mcopy:mtools grub-editenv:grub-common sfdisk:fdisk partx:util-linux mke2fs:e2fsprogs
vboard-sysdeps:
	@missing=""; \
	for pair in $(VBOARD_CMDS); do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v "$${pair%%:*}" >/dev/null 2>&1 \
	    || missing="$$missing $${pair#*:}"; done; \
	[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || missing="$$missing ovmf"; \
	[ -d /usr/lib/grub/x86_64-efi ] || missing="$$missing grub-efi-amd64-bin"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (apt-get install$$missing)"; exit 1; fi; fi

# Built under .cache/vboard: the Debian base (base-<key>/, or in $VBOARD_BASE_CACHE: CI
# keeps it outside the clone) is rebuilt only when what builds it changes, the slot images
# and the disk when the agent or the board's files change.
VBOARD_DIR      ?= .cache/vboard
VBOARD_VERSIONS := 1.0.0 2.0.0 3.0.0-fail
VBOARD_INPUTS   := $(shell find vboard src deploy/systemd -type f -not -path '*/__pycache__/*' 2>/dev/null) pyproject.toml
$(VBOARD_DIR)/disk.img: $(VBOARD_INPUTS) | vboard-sysdeps $(STAMP)
	vboard/build.sh $(VBOARD_DIR) $(VBOARD_VERSIONS)

vboard: $(VBOARD_DIR)/disk.img

# Boots the board in QEMU against a real server on the host: four power-ons, about 100 s
# each on TCG here, the two that install a release about 250 s more (ADR 0033).
vboard-test: vboard
	OTAGUARD_VBOARD_DIR=$(VBOARD_DIR) $(BIN)/python -m pytest -m vboard -p no:xdist tests/vboard -v -s

demo: $(STAMP)
	$(BIN)/otaguard demo

# The tests run the storage, registry, check-in and publication tests on SQLite and on
# the PostgreSQL at 127.0.0.1:5432 (pytest --database-url; under CI=true a missing one
# fails them). As root, a stopped Debian cluster is started first.
postgres:
	@PATH="$$PATH:/usr/lib/postgresql/15/bin"; \
	if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then \
	    pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | head -n1) main start || true; \
	  fi; \
	  pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null \
	    || echo "PostgreSQL is not answering at 127.0.0.1:5432: its tests fail under CI=true, skip otherwise"; \
	fi

# Two workers by default (the machine CI runs on has 2 cores; the suite spends most of its
# time waiting on server processes, TLS and swtpm): whole files per worker, so a module's
# shared server stays in one process. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP) sysdeps postgres
	$(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# Every fuzz harness (tests/fuzz) for FUZZ_SECONDS each with fresh random inputs; make
# test runs them too, as a short derandomized round (the same inputs every run).
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest -q tests/fuzz \
	  --timeout=$$(( $(FUZZ_SECONDS) * 2 + 120 ))

# Installs against a real server process, the agent or (one run in ten) the server
# SIGKILLed at a random moment of each, then power-on, update again, and every device and
# the served repository checked (src/otaguard/sim/soak.py). One summary line; exit 1 if any
# run ended unsafe. make test runs 50 (tests/integration/test_soak.py).
SOAK_RUNS ?= 1000
SOAK_SEED ?= 1
soak: $(STAMP)
	$(BIN)/python tools/soak.py --runs $(SOAK_RUNS) --seed $(SOAK_SEED)

# The server against its own OpenAPI schema, longer than make test's bounded run (which
# uses 8 examples per operation): schemathesis --checks all, SCHEMA_EXAMPLES per operation.
SCHEMA_EXAMPLES ?= 100
schema-check: $(STAMP)
	SCHEMATHESIS_EXAMPLES=$(SCHEMA_EXAMPLES) $(BIN)/python -m pytest -q -s \
	  tests/integration/test_schemathesis.py --timeout=3600

# A new schema revision autogenerated from the models (review it, then run the migration
# tests): make db-revision MSG="add rollouts"
db-revision: $(STAMP)
	@test -n "$(MSG)" || { echo 'usage: make db-revision MSG="what changes"'; exit 2; }
	@new=$$($(BIN)/python -c 'import sys; from otaguard.server.storage.migrate import new_revision; print(new_revision(sys.argv[1]))' "$(MSG)" | tail -n1) \
	  && $(BIN)/ruff check -q --fix "$$new" && $(BIN)/ruff format -q "$$new" && echo "wrote $$new: review it, then run the migration tests"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools
	$(BIN)/mypy src

# checkin_throughput needs nginx and the PostgreSQL at 127.0.0.1:5432 (see README).
# Every benchmark runs even when an earlier one misses its target; the summary names those
# that missed and the exit status is non-zero if any did.
BENCHES := verify_throughput hybrid_metadata agent_rss install_throughput checkin_throughput \
	delta serve_metadata
bench: $(STAMP) sysdeps postgres
	@failed=""; for b in $(BENCHES); do \
	  echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || failed="$$failed $$b"; \
	done; \
	if [ -n "$$failed" ]; then echo "bench: targets missed by:$$failed"; exit 1; fi; \
	echo "bench: every target met"

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

# The TUF conformance suite (theupdateframework/tuf-conformance) against the agent's TUF
# client (otaguard-conformance, docs/conformance.md). It is not on PyPI, so it is run from a
# checkout at the pinned commit named by TUF_CONFORMANCE_DIR, in a venv of its own (it pins
# its own tuf, securesystemslib and pytest). Not part of make test: CI machines cannot fetch it.
TUF_CONFORMANCE_REPO   := https://github.com/theupdateframework/tuf-conformance
TUF_CONFORMANCE_COMMIT := eec841c186f81f2d9d8d30460c7e7deefa615f9e
TUF_CONFORMANCE_DIR    ?=
CONFORMANCE_VENV       := .venv-conformance
CONFORMANCE_GET := git clone $(TUF_CONFORMANCE_REPO) DIR && git -C DIR checkout $(TUF_CONFORMANCE_COMMIT)
conformance-checkout:
	@test -n "$(TUF_CONFORMANCE_DIR)" || { echo "conformance: set TUF_CONFORMANCE_DIR to a tuf-conformance checkout ($(CONFORMANCE_GET); make conformance TUF_CONFORMANCE_DIR=DIR)"; exit 2; }
	@test -f "$(TUF_CONFORMANCE_DIR)/tuf_conformance/conftest.py" || { echo "conformance: $(TUF_CONFORMANCE_DIR) is not a tuf-conformance checkout ($(CONFORMANCE_GET))"; exit 2; }
	@at=$$(git -C "$(TUF_CONFORMANCE_DIR)" rev-parse HEAD 2>/dev/null); \
	  [ "$$at" = "$(TUF_CONFORMANCE_COMMIT)" ] || { echo "conformance: $(TUF_CONFORMANCE_DIR) is at $${at:-no git commit}, not the pinned $(TUF_CONFORMANCE_COMMIT) (git -C $(TUF_CONFORMANCE_DIR) checkout $(TUF_CONFORMANCE_COMMIT))"; exit 2; }; \
	  git -C "$(TUF_CONFORMANCE_DIR)" diff --quiet HEAD || { echo "conformance: $(TUF_CONFORMANCE_DIR) has local changes (git -C $(TUF_CONFORMANCE_DIR) checkout .)"; exit 2; }

$(CONFORMANCE_VENV)/.installed-$(TUF_CONFORMANCE_COMMIT): | conformance-checkout
	rm -rf $(CONFORMANCE_VENV)
	$(PYTHON) -m venv $(CONFORMANCE_VENV)
	$(CONFORMANCE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CONFORMANCE_VENV)/bin/python -m pip install --quiet "$(TUF_CONFORMANCE_DIR)"
	touch $@

# No .xfails file: every test must pass. -c /dev/null: neither otaguard's pytest settings
# nor any other ini file above the checkout apply to the suite.
conformance: conformance-checkout $(STAMP) sysdeps $(CONFORMANCE_VENV)/.installed-$(TUF_CONFORMANCE_COMMIT)
	cd "$(TUF_CONFORMANCE_DIR)" && $(abspath $(CONFORMANCE_VENV))/bin/python -m pytest -c /dev/null \
	  -p no:cacheprovider -q -rfE tuf_conformance \
	  --entrypoint "$(abspath $(BIN))/otaguard-conformance --insecure-http"

clean:
	rm -rf $(VENV) $(SCAN_VENV) $(CONFORMANCE_VENV) .pytest_cache .mypy_cache .ruff_cache
