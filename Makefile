# The README's two commands: `make demo` and `make test`. Both set everything up first.
VENV    := .venv
PY      := $(VENV)/bin/python
export DBOOT_REHEARSAL_ONLY := 1

.PHONY: setup demo test test-fast test-vm test-pythons lint bench rescue-image dist

setup:
	./scripts/setup.sh

# The preflight of a real switch of this machine, then the wizard, which only rehearses here.
# `check` exits 3 when something blocks a real switch (some VMs forbid ptrace of PID 1):
# that is a finding to read, not a reason to stop the demo.
demo: setup
	-$(VENV)/bin/dboot check tinybox /sbin/init
	$(VENV)/bin/dboot-tui --rehearse

# Every tier, the QEMU one included; then the unit and sandbox tiers on the oldest and the
# newest supported Python (3.9, 3.13), each in its venv under .cache/py, made first so that a
# missing interpreter fails at once. pytest exits 5 when no test ran: that fails too.
test: setup
	./scripts/python-matrix.sh setup
	$(PY) -m pytest -p no:cacheprovider
	./scripts/python-matrix.sh test

# The unit and sandbox tiers on Python 3.9 and 3.13 alone (scripts/python-matrix.sh).
test-pythons: setup
	./scripts/python-matrix.sh test

# The tiers without QEMU, for a quick loop.
test-fast: setup
	$(PY) -m pytest -p no:cacheprovider -m "not vm"

test-vm: setup
	$(PY) -m pytest -p no:cacheprovider -m vm

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) tests/bench/bench_copyin.py
	$(PY) tests/bench/bench_dryrun.py

# dboot-rescue:latest, the image to switch a remote machine to: Debian 12 minbase, systemd, sshd and
# the disk tools, by debootstrap and `docker import` (no registry). Cached under .cache/rescue/.
rescue-image:
	./scripts/build-rescue-image.sh

# dist/: a wheel and an sdist, and dist/dboot, the single file to copy onto a server (it runs on
# the host's own python3, CPython 3.9-3.13 on x86_64 or aarch64). Its wheels come from PyPI the
# first time and are cached under .cache/onefile/: later builds need no network.
dist: setup
	$(PY) -m build --no-isolation --sdist --wheel --outdir dist .
	$(PY) scripts/build-onefile.py --out dist/dboot
