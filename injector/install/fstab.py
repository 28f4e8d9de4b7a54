"""The installed system's /etc/fstab, made from the old system's.

The new system runs on the same disks: its ``/`` is the tree on the same root filesystem
(the shim mounts it before the image's init runs), and ``/boot``, the ESP, swap and data
mounts are the old system's. So the old fstab is kept line for line, except the root line,
which is written by UUID with pass 0: the root is mounted and in use when the new init reads
it, and the old system's own boot checks the filesystem.

Every other mount gets ``nofail``: an image may lack what one of them needs (a driver it
cannot load without kmod, a tool, a key), and a mount that fails must not hold its first
boot in emergency mode, unreachable, until the revert timer reboots it. It comes up, says
which mount failed (its boot report names the failed units), and can be fixed over SSH.
"""

from __future__ import annotations

import re

HEADER = (
    "# Made by `dboot install` from the old system's /etc/fstab: the same mounts, the root\n"
    "# by UUID. The old system's root filesystem is also at /sysroot (bound by the boot shim).\n"
)


def root_line(uuid: str, device: str, fstype: str) -> str:
    source = f"UUID={uuid}" if uuid else device
    return f"{source} / {fstype} defaults 0 0"


def new_fstab(old: str, uuid: str, device: str, fstype: str) -> str:
    lines = [HEADER.rstrip("\n")]
    wrote_root = False
    for line in old.splitlines():
        words = line.split()
        if words and not words[0].startswith("#") and len(words) >= 2 and words[1] == "/":
            if not wrote_root:
                lines.append(root_line(uuid, device, fstype))
                wrote_root = True
            continue
        lines.append(_not_failing_the_boot(line, words))
    if not wrote_root:
        lines.append(root_line(uuid, device, fstype))
    return "\n".join(lines) + "\n"


def _not_failing_the_boot(line: str, words: list[str]) -> str:
    """The line with ``nofail`` among its options, its own spacing kept."""
    if len(words) < 3 or words[0].startswith("#"):
        return line
    if len(words) == 3:
        return f"{line.rstrip()} defaults,nofail"
    options = words[3].split(",")
    if "nofail" in options:
        return line
    pieces = re.split(r"(\s+)", line)
    fields = [index for index, piece in enumerate(pieces) if piece and not piece.isspace()]
    pieces[fields[3]] = ",".join([*options, "nofail"])
    return "".join(pieces)
