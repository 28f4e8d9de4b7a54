#!/usr/bin/env bash
# Set up everything the tests and the demo need on a fresh Debian 12 machine, as root:
# Debian packages, a Docker engine that answers, and the project's venv.
# Idempotent: each step checks before it acts, so `make test` can call it every time.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "must run as root (the tests use namespaces, ptrace and mounts): use sudo"; exit 2; }

# --- Debian packages -------------------------------------------------------
packages=(docker.io busybox-static cpio debootstrap qemu-system-x86 qemu-utils e2fsprogs gcc libc6-dev
          zstd tmux attr iproute2 util-linux python3 python3-venv python3-psutil gzip procps dmsetup sudo
          qemu-system-arm qemu-user-static binfmt-support gcc-aarch64-linux-gnu libc6-dev-arm64-cross
          openssh-client fdisk dosfstools mtools ovmf)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- A Docker engine that answers -------------------------------------------
if ! docker info >/dev/null 2>&1; then
    log "no Docker engine answers: starting dockerd (log: /var/log/dboot-dockerd.log)"
    if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
        systemctl start docker
    else
        nohup dockerd >/var/log/dboot-dockerd.log 2>&1 &
    fi
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { log "dockerd did not come up: see /var/log/dboot-dockerd.log"; exit 2; }
fi

# --- The project's venv -----------------------------------------------------
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
    log "installing docker-boot and its test dependencies into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi

# --- The demo/test image ------------------------------------------------------
docker image inspect tinybox:latest >/dev/null 2>&1 || ./scripts/build-tinybox.sh tinybox:latest >/dev/null
log "ready"
