"""The image's tree as metadata only: what preflight checks and the RAM estimate.

An :class:`ImageIndex` knows every path of the image with its type, mode, owner and size,
but no file data. It answers two questions:

* how much RAM the tree will take once copied into a tmpfs (``estimated_bytes``);
* whether a path exists, and is an executable file, *inside the image*: symlinks are
  resolved against the image's own tree, never the host's.

How a tmpfs spends memory (mm/shmem.c): every regular file takes whole pages; a symlink
target of up to 127 bytes lives in the inode, a longer one takes a page; directories take
no pages. Each inode also costs kernel memory (inode + dentry, ~1 KiB), which ``df`` does
not show but tmpfs charges against its inode budget in exactly these units
(``BOGO_INODE_SIZE``). ``estimated_bytes`` is pages plus 1 KiB per inode, and
``RamRoot.used_bytes()`` measures the same two quantities on the mounted tmpfs.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from injector.image.tarstream import normalize

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
INODE_BYTES = 1024  # the kernel's own per-inode charge on tmpfs (BOGO_INODE_SIZE)
INLINE_SYMLINK_MAX = 127  # longest symlink target that tmpfs keeps inside the inode
MAX_SYMLINK_HOPS = 40  # like the kernel's MAXSYMLINKS: a loop gives "not found"

KINDS = ("file", "dir", "symlink", "char", "block", "fifo")

# An image has tens of thousands of entries: without a __dict__ each is about half the size.
# dataclass(slots=True) came with Python 3.10; on 3.9 the entries keep their __dict__.
SLOTTED: dict[str, Any] = {"slots": True} if sys.version_info >= (3, 10) else {}


@dataclasses.dataclass(frozen=True, **SLOTTED)
class IndexEntry:
    path: str  # absolute inside the image, e.g. "/usr/bin/env"
    kind: str  # one of KINDS
    mode: int  # permission bits, setuid/setgid/sticky included
    uid: int
    gid: int
    size: int
    mtime: int  # seconds
    target: str | None = None  # symlink target
    inode: int = 0  # equal for hardlinks of one file


ROOT = IndexEntry("/", "dir", 0o755, 0, 0, 0, 0)


def pages(size: int) -> int:
    return -(-size // PAGE_SIZE) * PAGE_SIZE


class ImageIndex:
    """Every entry of an image, by absolute path. Built by an :class:`IndexBuilder`."""

    def __init__(self, entries: Iterable[IndexEntry], *, copy_bytes: int | None = None) -> None:
        self._entries: dict[str, IndexEntry] = {}
        root = ROOT
        for entry in entries:
            if entry.path == "/":
                root = entry
            else:
                self._entries[entry.path] = entry
        self._root = root
        file_inodes: dict[int, int] = {}
        other_inodes: set[int] = set()
        long_symlinks = 0
        for entry in self._entries.values():
            if entry.kind == "file":
                file_inodes[entry.inode] = entry.size
            else:
                other_inodes.add(entry.inode)
                if (
                    entry.kind == "symlink"
                    and len(os.fsencode(entry.target or "")) > INLINE_SYMLINK_MAX
                ):
                    long_symlinks += 1
        self.file_count = len(self._entries)
        self.data_bytes = sum(file_inodes.values())
        self.inode_count = len(file_inodes) + len(other_inodes) + 1  # + the root directory
        # Data pages as `df` will count them; then the per-inode charge.
        self.estimated_data_bytes = sum(pages(size) for size in file_inodes.values()) + (
            long_symlinks * PAGE_SIZE
        )
        self.estimated_bytes = self.estimated_data_bytes + self.inode_count * INODE_BYTES
        # Bytes of file data the copy writes (layered archives rewrite some files).
        self.copy_bytes = self.data_bytes if copy_bytes is None else copy_bytes

    def __len__(self) -> int:
        return self.file_count

    def __iter__(self) -> Iterator[IndexEntry]:
        return iter(self._entries.values())

    def get(self, path: str) -> IndexEntry | None:
        """The entry at ``path`` itself, without following a final symlink."""
        path = normalize(path)
        return self._root if path == "/" else self._entries.get(path)

    def lookup(self, path: str) -> IndexEntry | None:
        """The entry ``path`` leads to inside the image, following symlinks (absolute ones
        from the image's root, relative ones from their directory); None if it leads
        nowhere or loops."""
        parts = deque(path.split("/"))
        current = "/"
        hops = 0
        while parts:
            name = parts.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                current = posixpath.dirname(current)
                continue
            candidate = posixpath.join(current, name)
            entry = self._entries.get(candidate)
            if entry is None:
                return None
            if entry.kind == "symlink":
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    return None
                target = entry.target or ""
                if target.startswith("/"):
                    current = "/"
                parts.extendleft(reversed(target.split("/")))
                continue
            if parts and entry.kind != "dir" and any(p not in ("", ".") for p in parts):
                return None  # a path through a non-directory
            current = candidate
        return self.get(current)

    def executable(self, path: str) -> bool:
        """True if ``path`` leads (inside the image) to a regular file with an x bit."""
        entry = self.lookup(path)
        return entry is not None and entry.kind == "file" and bool(entry.mode & 0o111)


class IndexBuilder:
    """Builds an index from tar members (layer after layer, whiteouts honoured) or from
    entries scanned off a directory tree."""

    def __init__(self) -> None:
        self._entries: dict[str, IndexEntry] = {"/": ROOT}
        self._children: dict[str, set[str]] = {"/": set()}
        self._created: set[str] = set()
        self._next_inode = 0
        self._copied_inodes: set[int] = set()
        self.copy_bytes = 0

    def start_layer(self) -> None:
        self._created = set()

    def add_scanned(self, fields: list[Any]) -> None:
        """One entry as the tree scanner reports it (see ``extract._TreeScanner``)."""
        path, kind, mode, uid, gid, size, mtime, target, inode = fields
        entry = IndexEntry(path, kind, mode, uid, gid, size, mtime, target, inode or self._inode())
        # A scan walks one merged tree, parents first: no whiteouts, no path twice, every
        # parent already in. Such an entry skips _put's bookkeeping (a good part of a large
        # image's scan), which only layered archives need.
        parent = path[: path.rfind("/")] or "/"
        if path not in self._entries and parent in self._entries:
            self._entries[path] = entry
        else:
            self._put(entry)
        # A hardlinked file's data is copied once, under its first name.
        if kind == "file" and entry.inode not in self._copied_inodes:
            self.copy_bytes += size
            self._copied_inodes.add(entry.inode)

    def add_member(self, member: Any, *, whiteouts: bool = False) -> None:
        """One tar member (``tarfile.TarInfo``)."""
        path = normalize(member.name)
        if whiteouts and self._whiteout(path):
            return
        kind = _member_kind(member)
        if kind is None:
            return
        if member.islnk():
            target = self._entries.get(normalize(member.linkname))
            if target is None:
                return  # the copy reports this; the index just cannot know the file
            entry = dataclasses.replace(target, path=path)
        else:
            entry = IndexEntry(
                path,
                kind,
                member.mode & 0o7777,
                member.uid,
                member.gid,
                member.size if kind == "file" else 0,
                int(member.mtime),
                member.linkname if kind == "symlink" else None,
                self._inode(),
            )
            if kind == "file":
                self.copy_bytes += member.size
        self._put(entry)
        self._created.add(path)

    def build(self) -> ImageIndex:
        return ImageIndex(self._entries.values(), copy_bytes=self.copy_bytes)

    def _inode(self) -> int:
        self._next_inode -= 1  # negative: never equal to a real inode number from a scan
        return self._next_inode

    def _put(self, entry: IndexEntry) -> None:
        path = entry.path
        old = self._entries.get(path)
        if old is not None and not (old.kind == "dir" and entry.kind == "dir"):
            self._remove(path)
        parent = posixpath.dirname(path)
        if path != "/" and parent not in self._entries:
            self._put(IndexEntry(parent, "dir", 0o755, 0, 0, 0, 0, None, self._inode()))
        self._entries[path] = entry
        if entry.kind == "dir":
            self._children.setdefault(path, set())
        if path != "/":
            self._children.setdefault(parent, set()).add(path)

    def _remove(self, path: str) -> None:
        if self._entries.pop(path, None) is None:
            return
        for child in self._children.pop(path, set()):
            self._remove(child)
        self._children.get(posixpath.dirname(path), set()).discard(path)

    def _whiteout(self, path: str) -> bool:
        base = posixpath.basename(path)
        if not base.startswith(".wh."):
            return False
        parent = posixpath.dirname(path)
        if base == ".wh..wh..opq":
            for child in list(self._children.get(parent, ())):
                if child not in self._created:
                    self._remove(child)
        elif not base.startswith(".wh..wh."):
            self._remove(posixpath.join(parent, base[4:]))
        return True


def _member_kind(member: Any) -> str | None:
    if member.isreg():
        return "file"
    if member.isdir():
        return "dir"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "file"
    if member.ischr():
        return "char"
    if member.isblk():
        return "block"
    if member.isfifo():
        return "fifo"
    return None
