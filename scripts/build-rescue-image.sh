#!/usr/bin/env bash
# Build dboot-rescue:latest: Debian 12 minbase with systemd, an SSH server and the tools for disk
# work, made by debootstrap and `docker import`, so no registry is needed. It is the image to
# switch a remote machine to: the switch carries the host's SSH keys, authorized_keys and DNS into
# it, systemd starts sshd, and from there the old disk can be wiped, repartitioned or reinstalled.
#
# Usage: build-rescue-image.sh [TAG]          (root; default TAG dboot-rescue:latest)
# The packages, downloaded by debootstrap, are cached as one tarball under .cache/rescue/, keyed by
# the package list, the suite and the mirror: a warm build only unpacks, configures and imports.
set -euo pipefail

tag=${1:-dboot-rescue:latest}
suite=bookworm
mirror=${DBOOT_RESCUE_MIRROR:-http://deb.debian.org/debian}
packages=systemd-sysv,openssh-server,parted,gdisk,e2fsprogs,lvm2,mdadm,cryptsetup,rsync,busybox,iproute2,isc-dhcp-client,procps
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${DBOOT_RESCUE_CACHE:-$repo/.cache/rescue}
log() { printf 'rescue-image: %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "needs root (debootstrap, chroot): run it with sudo"; exit 2; }
for tool in debootstrap docker; do
    command -v "$tool" >/dev/null || { log "$tool is missing: apt-get install $tool"; exit 2; }
done

# The tarball holds only the downloaded packages: keyed by what chooses them, not by this script.
key=$(echo "$suite $mirror $packages" | sha256sum | cut -c1-16)
tarball=$cache/debootstrap-$key.tar
mkdir -p "$cache"
work=$(mktemp -d "$cache/tree.XXXXXX")
# debootstrap mounts /proc (and more) in the tree; one that failed may leave them there: they
# go first, and rm never crosses into a mount.
cleanup() {
    awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | xargs -r umount -l
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT
tree=$work/tree

started=$(date +%s)
if [ ! -s "$tarball" ]; then
    # Older tarballs are of another package list or script: never used again, and 100+ MiB each.
    find "$cache" -maxdepth 1 -name 'debootstrap-*.tar' ! -name "debootstrap-$key.tar" -delete
    log "downloading $suite minbase + $packages from $mirror (cold: a few minutes)"
    debootstrap --variant=minbase --include="$packages" --make-tarball="$tarball.part" \
        "$suite" "$work/download" "$mirror" >"$work/debootstrap.log" 2>&1 ||
        { tail -n 30 "$work/debootstrap.log" >&2; log "debootstrap --make-tarball failed"; exit 2; }
    mv "$tarball.part" "$tarball"
    rm -rf "$work/download"
fi
log "installing from $tarball"
debootstrap --variant=minbase --include="$packages" --unpack-tarball="$tarball" \
    "$suite" "$tree" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -n 30 "$work/debootstrap.log" >&2; log "debootstrap failed"; exit 2; }

# No host keys of the build machine in an image that others may use: the switch carries the
# host's own keys in, and a boot without them makes fresh ones before sshd starts (Debian's
# ssh.service does not: its ExecStartPre `sshd -t` fails on a missing key).
rm -f "$tree"/etc/ssh/ssh_host_*
cat >"$tree/etc/systemd/system/dboot-ssh-keygen.service" <<'UNIT'
[Unit]
Description=SSH host keys for a rescue system that was given none
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
UNIT
chroot "$tree" systemctl enable dboot-ssh-keygen.service ssh.service >/dev/null 2>&1
# systemd-networkd manages only the links a .network file matches: the ones dboot's carry-over
# writes (by MAC, DHCP asking for the same address), so a lease is renewed by the new system.
# Links nothing matches keep what the kernel has.
chroot "$tree" systemctl enable systemd-networkd.service >/dev/null 2>&1
# dboot's revert timer is stopped by `touch /run/dboot/keep`; systemd mounts a fresh /run, so the
# directory is made at every boot for that line to work as the switch prints it.
echo 'd /run/dboot 0700 root root -' >"$tree/usr/lib/tmpfiles.d/dboot.conf"
# Root logs in with a key only (Debian's default: prohibit-password); the password stays locked.
echo dboot-rescue >"$tree/etc/hostname"
# An empty machine-id: systemd's first-boot marker, unless the switch carries the host's in.
: >"$tree/etc/machine-id"
# ip and dhclient are there to configure the network by hand.
chroot "$tree" apt-get clean
rm -rf "$tree"/var/lib/apt/lists/* "$tree"/var/cache/apt/*.bin "$tree"/var/log/*.log

log "importing as $tag"
tar -C "$tree" --numeric-owner -c . |
    docker import --change 'CMD ["/sbin/init"]' --message "dboot rescue ($suite minbase)" - "$tag" \
        >/dev/null
size=$(docker image inspect --format '{{.Size}}' "$tag")
log "done: $tag, $((size / 1024 / 1024)) MiB, $(($(date +%s) - started)) s"
