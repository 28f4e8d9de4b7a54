"""Host files for the new root: the real upstream resolvers, never a stub, never written
through a symlink of the image. Source paths are parameters, so this runs on files in
tmp_path (no root needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from injector.rootfs import add_host_files, upstream_resolv_conf

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
