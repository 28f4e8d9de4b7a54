#!/usr/bin/env bash
# Base layer of the VM test bed: a Debian 12 tree made by debootstrap, holding its own kernel and
# initramfs. Slow (a minute or two), so tests/vm/build.py caches it by the hash of this script, the
# package list, the suite and the mirror; the fast final layer is rebuilt on top of a copy of it.
#
# Usage: base.sh TREE PACKAGES_FILE SUITE MIRROR DEB_ARCH KERNEL_PACKAGE
# Only Debian's own packages, fetched from MIRROR by debootstrap and apt. A foreign DEB_ARCH (arm64
# on an amd64 host) runs its maintainer scripts through qemu-user-static and binfmt_misc.
set -euo pipefail

tree=$1 packages_file=$2 suite=$3 mirror=$4 arch=$5 kernel=$6
log() { printf 'vm-base: %s\n' "$*" >&2; }

packages=$(grep -v '^[[:space:]]*\(#\|$\)' "$packages_file" | paste -sd, -)
log "debootstrap $suite $arch (minbase + $packages) from $mirror"
debootstrap --arch="$arch" --variant=minbase --include="$packages" "$suite" "$tree" "$mirror" \
    >"$tree.debootstrap.log" 2>&1 ||
    { tail -n 30 "$tree.debootstrap.log" >&2; log "debootstrap failed (full log: $tree.debootstrap.log)"; exit 2; }

# A small initramfs: the VM only needs virtio and ext4 to find its root, and every megabyte of
# initramfs costs boot time under software emulation (TCG decompresses it instruction by instruction).
cat >"$tree/etc/initramfs-tools/conf.d/dboot-vm.conf" <<'CONF'
MODULES=list
COMPRESS=gzip
BUSYBOX=n
CONF
# virtio_rng feeds the kernel's entropy pool from the host: without it, an early getrandom()
# (systemd-udevd's) runs the CPU-jitter entropy loop, which under TCG stalled for minutes
# (soft lockups) on a loaded machine. BUSYBOX=n: busybox-static is in the tree for the test image,
# not for the initramfs (klibc's tools are enough there, and smaller).
printf '%s\n' virtio_pci virtio_blk virtio_rng ext4 >"$tree/etc/initramfs-tools/modules"
# The kernel comes after that configuration, so that its one initramfs is the small one: building
# the default one first (every module, under binfmt emulation for a foreign tree) took minutes.
log "installing $kernel"
chroot "$tree" apt-get install -y -q --no-install-recommends "$kernel" >"$tree.kernel.log" 2>&1 ||
    { tail -n 30 "$tree.kernel.log" >&2; log "kernel install failed"; exit 2; }
rm -f "$tree.kernel.log"

# Identity and a way in for whoever debugs a run by hand: no root password on the serial getty.
# No /etc/hosts, as plain debootstrap leaves it (only an installer writes one): dboot must cope
# with a minimal host's /etc, which once crashed a switch after the copy.
echo dboot-vm >"$tree/etc/hostname"
rm -f "$tree/etc/hosts"
chroot "$tree" passwd -d root >/dev/null

# Nothing in the tests needs the network, apt's timers or its package lists.
rm -f "$tree"/etc/systemd/system/timers.target.wants/apt-daily*.timer
chroot "$tree" apt-get clean
rm -rf "$tree"/var/lib/apt/lists/* "$tree.debootstrap.log"
log "done: $(du -sh "$tree" | cut -f1)"
