#!/usr/bin/env bash
# Build the `tinybox` image offline: FROM scratch with Debian's busybox-static.
#
# Applets are relative symlinks (`busybox --install -s` would write absolute ones
# that point into the build directory and break once the tree becomes `/`).
set -euo pipefail

tag=${1:-tinybox:latest}
# BUSYBOX and DOCKER_PLATFORM build it for another architecture (tests/vm/build.py: arm64).
busybox=${BUSYBOX:-/bin/busybox}
[ -x "$busybox" ] || { echo "build-tinybox: $busybox missing: apt-get install busybox-static" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,root,var/log,usr/bin,usr/sbin}
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] && continue
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
# A tiny init for demos: say hello on the console, then hand over to a shell.
cat > "$root/sbin/init" <<'INIT'
#!/bin/sh
echo "tinybox: init running as PID $$"
exec /bin/sh
INIT
chmod 0755 "$root/sbin/init"
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"
cat > "$work/Dockerfile" <<DOCKERFILE
FROM scratch
COPY rootfs/ /
CMD ["/bin/sh"]
# The tag in the config: each tag built is an image of its own (the tests' tinybox is never
# the demo's under a second name, whose tags a test would then see too).
LABEL org.dboot.built-as="$tag"
DOCKERFILE
DOCKER_BUILDKIT=0 docker build -q ${DOCKER_PLATFORM:+--platform "$DOCKER_PLATFORM"} -t "$tag" "$work" >/dev/null
echo "$tag"
