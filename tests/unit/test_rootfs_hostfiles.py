"""Host files for the new root: the real upstream resolvers, never a stub, never written
through a symlink of the image. Source paths are parameters, so this runs on files in
tmp_path (no root needed)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from injector.ramroot.rootfs import HOST_FILES, add_host_files, host_files, upstream_resolv_conf

STUB = b"# stub\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n"
UPSTREAM = b"# resolved's upstream list\nnameserver 192.0.2.1\nnameserver 2001:db8::1\n"
PLAIN = b"nameserver 198.51.100.7\nsearch example.net\n"


@pytest.mark.parametrize(
    ("resolv", "upstream", "expected"),
    [
        (STUB, UPSTREAM, UPSTREAM),  # systemd-resolved stub: use its upstream list
        (STUB.replace(b".53", b".54"), UPSTREAM, UPSTREAM),  # the other stub address
        (PLAIN, UPSTREAM, PLAIN),  # a real resolver: keep it
        (STUB, None, STUB),  # no upstream list to follow: keep what there is
        (b"#nameserver 127.0.0.53\nnameserver 203.0.113.9\n", UPSTREAM, None),  # comment only
    ],
)
def test_resolver_choice(
    resolv: bytes, upstream: bytes | None, expected: bytes | None, tmp_path: Path
) -> None:
    resolv_path = tmp_path / "resolv.conf"
    resolv_path.write_bytes(resolv)
    upstream_path = tmp_path / "upstream.conf"
    if upstream is not None:
        upstream_path.write_bytes(upstream)
    chosen = upstream_resolv_conf(resolv_path, upstream_path)
    assert chosen == (resolv if expected is None else expected)
    assert b"8.8.8.8" not in chosen and b"1.1.1.1" not in chosen  # no invented resolver


def test_resolv_conf_symlink_is_followed_like_the_host_does(tmp_path: Path) -> None:
    """/etc/resolv.conf on resolved hosts is a symlink to the stub file."""
    stub = tmp_path / "stub-resolv.conf"
    stub.write_bytes(STUB)
    (tmp_path / "resolv.conf").symlink_to(stub)
    (tmp_path / "upstream.conf").write_bytes(UPSTREAM)
    assert upstream_resolv_conf(tmp_path / "resolv.conf", tmp_path / "upstream.conf") == UPSTREAM


def make_host_etc(tmp_path: Path) -> Path:
    etc = tmp_path / "host-etc"
    etc.mkdir()
    (etc / "hostname").write_bytes(b"myhost\n")
    (etc / "hosts").write_bytes(b"127.0.0.1 localhost\n127.0.1.1 myhost\n")
    (etc / "resolv.conf").write_bytes(STUB)
    return etc


def test_add_host_files(tmp_path: Path) -> None:
    etc = make_host_etc(tmp_path)
    upstream = tmp_path / "upstream.conf"
    upstream.write_bytes(UPSTREAM)
    root = tmp_path / "root"
    root.mkdir()
    added = add_host_files(root, etc=etc, resolved_upstream=upstream)
    assert added == ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"]
    assert (root / "etc/hostname").read_bytes() == b"myhost\n"
    assert (root / "etc/hosts").read_bytes() == (etc / "hosts").read_bytes()
    assert (root / "etc/resolv.conf").read_bytes() == UPSTREAM
    assert oct((root / "etc/resolv.conf").stat().st_mode & 0o777) == "0o644"
    assert sorted(os.listdir(root / "etc")) == ["hostname", "hosts", "resolv.conf"]


def test_image_symlinks_are_replaced_not_followed(tmp_path: Path) -> None:
    """An image's /etc/resolv.conf -> /run/... must not lead the write out of the root."""
    etc = make_host_etc(tmp_path)
    victim = tmp_path / "host-run-resolv.conf"
    victim.write_bytes(b"the host's own file\n")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/resolv.conf").symlink_to(victim)  # absolute: on the host, it is the victim
    (root / "etc/hosts").symlink_to("../../host-etc/hosts")
    add_host_files(root, etc=etc, resolved_upstream=tmp_path / "absent")
    assert victim.read_bytes() == b"the host's own file\n"
    assert not (root / "etc/resolv.conf").is_symlink() and not (root / "etc/hosts").is_symlink()
    assert (root / "etc/resolv.conf").read_bytes() == STUB


# --- Host files in any state (a plain debootstrap has no /etc/hosts) -------------------------

MACHINE_ID = b"0123456789abcdef0123456789abcdef\n"
GOOD = {
    "hostname": b"myhost\n",
    "hosts": b"127.0.0.1 localhost\n",
    "resolv.conf": PLAIN,
    "machine-id": MACHINE_ID,
}
IMAGE_OWN = b"the image's own\n"
STATES = ("missing", "empty", "dangling symlink", "directory", "symlink to a good file")


def host_etc_with(tmp_path: Path, name: str, state: str) -> Path:
    """A host /etc whose files are all good, except ``name``, which is in ``state``."""
    etc = tmp_path / "host-etc"
    etc.mkdir()
    for other, content in GOOD.items():
        if other != name:
            (etc / other).write_bytes(content)
    target = etc / name
    if state == "empty":
        target.write_bytes(b"")
    elif state == "dangling symlink":
        target.symlink_to(tmp_path / "nowhere" / name)
    elif state == "directory":
        target.mkdir()
        (target / "inside").write_bytes(b"x")
    elif state == "symlink to a good file":
        real = tmp_path / f"real-{name}"
        real.write_bytes(GOOD[name])
        target.symlink_to(real)
    return etc


def expected_content(name: str, state: str) -> bytes | None:
    """What the new root's /etc/NAME holds afterwards; None: the image's own stays."""
    if state == "symlink to a good file":
        return GOOD[name]
    if name == "hostname":
        return socket.gethostname().encode() + b"\n"  # the kernel's name, never nothing
    if state == "empty" and name in ("hosts", "resolv.conf"):
        return b""  # the host's truth, empty as it is
    return None


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("name", HOST_FILES)
def test_host_files_in_any_state(name: str, state: str, tmp_path: Path) -> None:
    etc = host_etc_with(tmp_path, name, state)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for image_file in HOST_FILES:
        (root / "etc" / image_file).write_bytes(IMAGE_OWN)

    found = {item.name: item for item in host_files(etc, tmp_path / "absent")}
    assert list(found) == list(HOST_FILES)
    expected_state = {
        "missing": "missing",
        "empty": "empty",
        "dangling symlink": f"a dangling symlink to {tmp_path}/nowhere/{name}",
        "directory": "a directory",
        "symlink to a good file": f"ok (via a symlink to {tmp_path}/real-{name})",
    }[state]
    assert found[name].state.startswith(expected_state)

    added = add_host_files(root, etc=etc, resolved_upstream=tmp_path / "absent")
    expected = expected_content(name, state)
    written = (root / "etc" / name).read_bytes()
    assert written == (IMAGE_OWN if expected is None else expected)
    assert (f"/etc/{name}" in added) is (expected is not None)
    for other in HOST_FILES:  # the good ones are all carried over
        if other != name:
            assert (root / "etc" / other).read_bytes() == GOOD[other]
    assert not [entry for entry in os.listdir(root / "etc") if entry.endswith(".dboot")]


def test_machine_id_is_carried_over_read_only(tmp_path: Path) -> None:
    etc = make_host_etc(tmp_path)
    (etc / "machine-id").write_bytes(MACHINE_ID)
    root = tmp_path / "root"
    root.mkdir()
    assert "/etc/machine-id" in add_host_files(root, etc=etc, resolved_upstream=tmp_path / "x")
    assert (root / "etc/machine-id").read_bytes() == MACHINE_ID
    assert oct((root / "etc/machine-id").stat().st_mode & 0o777) == "0o444"
    # Not a machine id (systemd's "uninitialized", garbage): the image's own stays.
    for content in (b"uninitialized\n", b"0123\n", MACHINE_ID.upper()):
        (etc / "machine-id").write_bytes(content)
        (root / "etc/machine-id").unlink(missing_ok=True)
        assert "/etc/machine-id" not in add_host_files(root, etc=etc, resolved_upstream=etc)
        assert not (root / "etc/machine-id").exists()


def test_an_image_directory_where_a_host_file_goes_is_left_alone(tmp_path: Path) -> None:
    etc = make_host_etc(tmp_path)
    root = tmp_path / "root"
    (root / "etc/hosts").mkdir(parents=True)
    added = add_host_files(root, etc=etc, resolved_upstream=tmp_path / "absent")
    assert "/etc/hosts" not in added and "/etc/hostname" in added
    assert (root / "etc/hosts").is_dir()
    assert sorted(os.listdir(root / "etc")) == ["hostname", "hosts", "resolv.conf"]


def test_no_host_etc_at_all(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    added = add_host_files(root, etc=tmp_path / "no-etc", resolved_upstream=tmp_path / "x")
    assert added == ["/etc/hostname"]
    assert (root / "etc/hostname").read_bytes() == socket.gethostname().encode() + b"\n"
