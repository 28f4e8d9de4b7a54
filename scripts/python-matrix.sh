#!/usr/bin/env bash
# docker-boot supports CPython 3.9 to 3.13. The default venv (.venv, scripts/setup.sh) runs every
# tier; this script gives the oldest and the newest supported versions a venv each and runs the
# unit and sandbox tiers on them (the TUI and QEMU tiers stay on the default interpreter).
#
# Usage: python-matrix.sh setup [VERSION...]    find each interpreter, make its venv (idempotent)
#        python-matrix.sh test [VERSION...]     setup, then the two tiers on each, one after the
#                                               other (the sandbox tier shares the engine's image
#                                               tags and checks the whole host for leftovers)
# VERSION defaults to "3.9 3.13". An interpreter is looked for on PATH (python3.X), in pyenv's
# versions directory and as Debian's /usr/bin/python3.X; DBOOT_PYTHON_3_9=/path (dots as
# underscores) names one instead. None found is a failure, never a skipped tier.
# Venvs: .cache/py/VERSION, each stamped with its interpreter and pyproject.toml, like .venv.
# Logs of a test run: .cache/py/VERSION/test.log.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'python-matrix: %s\n' "$*" >&2; }

DEFAULT_VERSIONS=(3.9 3.13)
TIERS=(tests/unit tests/sandbox)
# Left to the default run, which already does for every version what they prove, at ~2 min each:
# test_onefile runs the single file on 3.9 to 3.13 itself, and test_install pip-installs into a
# fresh venv what setup_version below installs (and so proves resolvable) on each version.
LEFT_TO_THE_DEFAULT_RUN=(tests/sandbox/test_onefile.py tests/sandbox/test_install.py)
# The rest of the two tiers takes ~5.7 min a version on a quiet 2-core machine (3.13: 343 s), too
# much to add twice to a CI run whose VM tier alone takes most of its budget. The heaviest sandbox
# files (seconds, same run:
# inject_kill 49, keeper 49, cli 32, switch 19, ssh_check 18, teach 18, graceful_stop 17,
# bootshim 14, rootfs_hostfiles 11, sources 11) run on one of the two versions each, besides the
# default run, all but the keeper's, which is the stage's own code and runs on both: ~4 min each.
# The oldest gets what a user of an old host goes through (the CLI, the switch, the sources, the
# boot shim); the newest the injection under SIGKILL, the SSH check, teaching, the graceful stop.
declare -A ONLY_ON=(
    [3.9]="test_cli test_switch test_sources test_rootfs_hostfiles test_bootshim"
    [3.13]="test_inject_kill test_ssh_check test_teach test_graceful_stop"
)

# The --ignore options of one version's run: what the default run keeps, and the heavy files
# another version of the matrix runs (a version outside it runs them all).
ignored_for() {
    local version=$1 other name
    printf -- '--ignore=%s\n' "${LEFT_TO_THE_DEFAULT_RUN[@]}"
    [ -n "${ONLY_ON[$version]:-}" ] || return 0
    for other in "${!ONLY_ON[@]}"; do
        [ "$other" != "$version" ] || continue
        for name in ${ONLY_ON[$other]}; do printf -- '--ignore=tests/sandbox/%s.py\n' "$name"; done
    done
}

# Prints the path of a working CPython VERSION with venv and ensurepip, or nothing.
find_python() {
    local version=$1 override candidate
    override=DBOOT_PYTHON_${version//./_}
    local candidates=()
    if [ -n "${!override:-}" ]; then
        candidates=("${!override}")
    else
        candidate=$(command -v "python$version" 2>/dev/null || true)
        [ -n "$candidate" ] && candidates+=("$candidate")
        # pyenv's own builds, newest patch release first (its shims fail unless one is selected).
        local pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
        while IFS= read -r candidate; do
            candidates+=("$candidate")
        done < <(ls -d "$pyenv_root/versions/$version".*/bin/"python$version" 2>/dev/null | sort -rV)
        candidates+=("/usr/bin/python$version" "/usr/local/bin/python$version")
    fi
    for candidate in "${candidates[@]}"; do
        [ -x "$candidate" ] || continue
        if "$candidate" -c "import sys, venv, ensurepip
assert sys.implementation.name == 'cpython'
assert '%d.%d' % sys.version_info[:2] == '$version'" >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

# Some tests run dboot as nobody (a user who is not root must get exit 2). pyenv keeps its
# builds under /root (mode 700), where nobody can load neither libpython nor the stdlib: such
# a build is copied to .cache/py/cpython-X.Y.Z, finding its libpython next to it.
usable_by_nobody() {
    setpriv --reuid=65534 --regid=65534 --clear-groups "$1" -c pass >/dev/null 2>&1
}

# Prints the path of the copy's interpreter; makes the copy once.
copy_for_everyone() {
    local python=$1 name prefix copy
    name=$(basename "$python")
    prefix=$("$python" -c 'import sys; print(sys.base_prefix)')
    copy=.cache/py/cpython-$("$python" -c 'import platform; print(platform.python_version())')
    if [ ! -x "$copy/bin/$name" ]; then
        log "$python cannot be run by other users (in $prefix): copying it to $copy"
        command -v patchelf >/dev/null || {
            log "installing patchelf"
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends patchelf >/dev/null
        }
        rm -rf "$copy.tmp"
        mkdir -p "$copy.tmp"
        # Without the stdlib's own tests, the static library and site-packages: 40% of the size.
        local lib=./lib/python$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        tar -C "$prefix" --exclude="$lib/test" --exclude="$lib/config-*" \
            --exclude="$lib/site-packages" -cf - . | tar -C "$copy.tmp" -xf -
        chmod -R a+rX "$copy.tmp"
        if [ -n "$(patchelf --print-rpath "$copy.tmp/bin/$name")" ]; then
            patchelf --set-rpath '$ORIGIN/../lib' "$copy.tmp/bin/$name"
        fi
        mv "$copy.tmp" "$copy"
    fi
    echo "$(realpath "$copy")/bin/$name"
}

setup_version() {
    local version=$1 python venv=.cache/py/$1
    if ! python=$(find_python "$version"); then
        log "no CPython $version with venv found (PATH python$version, ${PYENV_ROOT:-$HOME/.pyenv}/versions/$version.*, /usr/bin/python$version): install one (pyenv install $version, or Debian's python$version-venv) or set DBOOT_PYTHON_${version//./_}=/path/to/python$version"
        return 2
    fi
    python=$(realpath "$python")
    usable_by_nobody "$python" || python=$(copy_for_everyone "$python")
    usable_by_nobody "$python" || { log "$python cannot be run by nobody either: the tests need that"; return 2; }
    local stamp
    stamp=$venv/.installed-$( (echo "$python"; cat pyproject.toml) | sha256sum | cut -c1-16)
    [ -e "$stamp" ] && return 0
    log "making $venv with $python ($("$python" --version 2>&1))"
    rm -rf "$venv"
    mkdir -p .cache/py
    "$python" -m venv "$venv"
    # The pip that ensurepip brings can be old (3.9's: 23.0), and its resolver backtracks for
    # many minutes over this dependency set; a current one settles it at once.
    if ! { "$venv/bin/python" -m pip install -q --disable-pip-version-check -U pip &&
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'; } \
        >"$venv/setup.log" 2>&1; then
        tail -n 20 "$venv/setup.log" >&2
        log "pip could not install docker-boot into $venv: see $venv/setup.log"
        return 2
    fi
    touch "$stamp"
}

# Runs the tiers on one version, its output to its log; prints one line with the time taken.
test_version() {
    local version=$1 venv=.cache/py/$1 started status=0 ignored
    mapfile -t ignored < <(ignored_for "$version")
    started=$(date +%s)
    "$venv/bin/python" -m pytest -p no:cacheprovider -m "not vm" "${TIERS[@]}" "${ignored[@]}" \
        >"$venv/test.log" 2>&1 || status=$?
    local summary
    summary=$(grep -E '^=+ .*(passed|failed|error|no tests ran).* in ' "$venv/test.log" | tail -n 1 | tr -d '=')
    log "Python $version: ${summary:-no summary} (exit $status, $(($(date +%s) - started)) s; log: $venv/test.log)"
    return "$status"
}

command=${1:-}
shift || true
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=("${DEFAULT_VERSIONS[@]}")

case $command in
setup)
    for version in "${versions[@]}"; do setup_version "$version"; done
    ;;
test)
    for version in "${versions[@]}"; do setup_version "$version"; done
    # One after the other: two runs side by side remove each other's test images and count
    # each other's namespaces as leftovers.
    failed=0
    for version in "${versions[@]}"; do
        if ! test_version "$version"; then
            failed=1
            log "Python $version failed: its failures, from $(realpath ".cache/py/$version/test.log"):"
            grep -E '^(FAILED|ERROR) ' ".cache/py/$version/test.log" >&2 || tail -n 30 ".cache/py/$version/test.log" >&2
        fi
    done
    exit "$failed"
    ;;
*)
    log "usage: $0 setup|test [VERSION...]"
    exit 2
    ;;
esac
