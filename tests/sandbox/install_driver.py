"""`python -m tests.sandbox.install_driver DISK ARCHIVE`: the disk part of `dboot install`
(``injector.install.install.write_install``, unchanged) against a directory that stands for
the root filesystem, so that a test can kill it at each of its pause points and then boot
that "disk" (test-only). The boot chain is the test disk's own: /sbin/init -> /old-init."""

from __future__ import annotations

import sys

from injector.image.sources import open_source
from injector.install.bootchain import BootChain
from injector.install.deploy import Disk
from injector.install.install import InstallOptions, write_install

TREE_NAME = "test-0123456789ab"
REVERT_MINUTES = 0.05  # 3 s: short enough for a test's probation boot


def test_chain() -> BootChain:
    return BootChain(
        firmware="BIOS",
        bootloader="",
        kernel="",
        initramfs="",
        boot_partition="",
        esp="",
        kernel_cmdline="",
        init_path="/sbin/init",
        init_target="/old-init",
        init_is_link=True,
        root=None,
        interpreter="/usr/bin/python3",
        interpreter_version="",
    )


def main(argv: list[str]) -> int:
    disk, archive = argv
    options = InstallOptions(
        image=f"rootfs:{archive}",
        init_argv=["/init"],
        carry=False,
        modules=False,
        yes=True,
        reboot=False,
        log_file=None,
    )
    with open_source(options.image, None) as source:
        events = write_install(Disk(disk), source, TREE_NAME, test_chain(), options,
                               REVERT_MINUTES, None)  # fmt: skip
        for event in events:
            print(event, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
