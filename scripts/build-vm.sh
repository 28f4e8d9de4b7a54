#!/usr/bin/env bash
# Build (or reuse from .cache/vm/) the QEMU test bed of tests/vm/, from the working tree as it is.
#   scripts/build-vm.sh                 build only; prints the kernel and disk paths
#   scripts/build-vm.sh --boot NAME     then boot scenario NAME with the console on stdout
#                                       (smoke, switch-busybox, switch-systemd, recovery, none)
#   scripts/build-vm.sh --variant NAME  another bed: arm64, x86_64-bios, x86_64-uefi (the last two
#                                       boot through their firmware and GRUB, tests/vm/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
export DBOOT_REHEARSAL_ONLY=1 # this host's lab mode; the guest unsets it for itself
exec .venv/bin/python -m tests.vm.build "$@"
