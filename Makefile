# fsrvpd — the two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := zfs-fuse samba samba-common-bin smbclient libsystemd-dev pkg-config lvm2 thin-provisioning-tools xfsprogs btrfs-progs
DEMO_DIR ?= /var/tmp/fsrvpd-demo
BACKEND ?= zfs

.PHONY: deps demo demo-samba test bench dist deb check-config clean

# Idempotent: Debian packages for the real peers and storage, a venv with fsrvpd installed.
deps: $(VENV)/.installed
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# A working demo: share `vms`, user backup/backup, embedded SMB on 127.0.0.1:1445, metrics on
# 127.0.0.1:9720, fsrvpctl on $(DEMO_DIR)/admin.sock; on a file-backed ZFS pool, or with BACKEND=lvm
# on a thin pool (needs device-mapper: see scripts/demo.sh).
demo: deps
	BACKEND=$(BACKEND) DEMO_DIR=$(DEMO_DIR) FSRVPD=$(VENV)/bin/fsrvpd scripts/demo.sh

# The production shape: the same pool and share behind a private smbd on 127.0.0.1:1446 (SMB3),
# fsrvpd in samba mode serving \PIPE\FssagentRpc for it; smbd is started and stopped here.
demo-samba: deps
	DEMO_DIR=$(DEMO_DIR) FSRVPD=$(VENV)/bin/fsrvpd scripts/demo-samba.sh

# The whole suite; .ci/run calls exactly this.
test: deps
	$(PY) -m pytest -ra $(PYTEST_ARGS)

# Not part of `make test`: fsrvpd against Samba's own FSRVP server on the same zfs-fuse pool and btrfs,
# with the same client (under 15 minutes on 2 cores); prints one table, writes bench/results/latest.*.
# BENCH_ARGS=--quick: a smoke run; BENCH_ARGS='--profile DIR': py-spy flame graphs of fsrvpd.
bench: deps $(VENV)/.bench-installed
	@$(MAKE) --no-print-directory deps APT_PACKAGES="btrfs-progs samba-vfs-modules"
	$(PY) -m bench $(BENCH_ARGS)

$(VENV)/.bench-installed: $(VENV)/.installed
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	touch $@

# The sdist and wheel in dist/ (with the venv's setuptools, no download).
dist: deps
	rm -rf dist/fsrvpd-*.tar.gz dist/fsrvpd-*.whl
	$(PY) -m build --no-isolation --outdir dist . >/dev/null
	@ls dist/fsrvpd-*

# The Debian package in dist/, built from the wheel (packaging/build-deb.sh says what goes where).
deb: dist
	packaging/build-deb.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
