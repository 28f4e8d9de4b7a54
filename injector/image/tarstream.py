"""Reading tar streams strictly: decompression by magic, and an end-of-archive check.

Standard library only: the copy-in worker (``injector.image.extract``) imports this before it
chroots into the new root, where no Python library can be found any more.

``tarfile`` is used to parse headers (PAX, GNU long names) and nothing else: files are
created by our own code, since Python 3.11.2 has no extraction ``filter=``. ``tarfile``
is lenient at the end of a stream, so :class:`StrictTar` adds what it lacks: a stream
that stops without the end-of-archive block, or with garbage where a header should be,
is a truncated or corrupt archive, not a short one.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import posixpath
import shutil
import tarfile
import threading
import zlib
from collections.abc import Iterable, Iterator
from typing import IO, Any, cast

try:  # a declared dependency; Debian's python3 may still lack it, so `zstd -dc` stands in
    import zstandard
except ImportError:  # pragma: no cover - depends on the interpreter
    zstandard = None  # type: ignore[assignment]

CHUNK = 1 << 20
BLOCK = tarfile.BLOCKSIZE

MAGIC = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\xfd7zXZ\x00": "xz",
    b"BZh": "bzip2",
}

# What GNU tar and Go's archive/tar write for xattrs in PAX headers.
XATTR_PAX_PREFIX = "SCHILY.xattr."


class ArchiveError(Exception):
    """The bytes are not a readable tar archive; the message says what is wrong with them."""


class ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks (e.g. an HTTP response body)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count


def detect_compression(head: bytes) -> str:
    """ "gzip", "zstd", "xz", "bzip2" or "none", from the first bytes of a stream."""
    for magic, name in MAGIC.items():
        if head.startswith(magic):
            return name
    return "none"


def decompressed(raw: IO[bytes]) -> IO[bytes]:
    """``raw`` as a stream of tar bytes, decompressing it if its magic says so."""
    source: Any = raw
    buffered: Any = (
        source if isinstance(source, io.BufferedReader) else io.BufferedReader(source, CHUNK)
    )
    kind = detect_compression(buffered.peek(8)[:8])
    if kind == "gzip":
        return cast(IO[bytes], gzip.GzipFile(fileobj=buffered, mode="rb"))
    if kind == "xz":
        return cast(IO[bytes], lzma.LZMAFile(buffered))
    if kind == "bzip2":
        return cast(IO[bytes], bz2.BZ2File(buffered))
    if kind == "zstd":
        return _zstd_reader(buffered)
    return cast(IO[bytes], buffered)


def _zstd_reader(buffered: Any) -> IO[bytes]:
    if zstandard is not None:
        reader = zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
        return cast(IO[bytes], reader)
    if shutil.which("zstd") is None:
        raise ArchiveError("zstd-compressed, but neither python zstandard nor zstd(1) is installed")
    import subprocess  # here: the copy-in worker imports this module and never needs it

    process = subprocess.Popen(["zstd", "-dcq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    sink = process.stdin

    def feed() -> None:  # from what we already buffered on: the magic was peeked, not read
        with contextlib.suppress(OSError), sink:
            while chunk := buffered.read(CHUNK):
                sink.write(chunk)

    threading.Thread(target=feed, name="dboot-zstd-feed", daemon=True).start()
    return process.stdout


class _Recorder(io.RawIOBase):
    """Remembers the last chunks read, so the block where tarfile stopped can be checked."""

    def __init__(self, source: IO[bytes]) -> None:
        self._source = source
        self.position = 0
        self.recent: list[tuple[int, bytes]] = []

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        try:
            data = self._source.read(size if size >= 0 else CHUNK)
        except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as error:
            raise ArchiveError(f"cannot read: {_one_line(error)}") from None
        except Exception as error:  # zstandard.ZstdError, which needs no import to catch
            raise ArchiveError(f"cannot decompress: {_one_line(error)}") from None
        if data:
            # tarfile reads at most one buffer ahead of the block it parses: keep that much.
            self.recent.append((self.position, data))
            self.position += len(data)
            while self.position - self.recent[0][0] - len(self.recent[0][1]) > 2 * CHUNK + BLOCK:
                self.recent.pop(0)
        return data

    def bytes_at(self, offset: int, length: int) -> bytes:
        out = b""
        for start, data in self.recent:
            lo = max(offset - start, 0)
            hi = min(offset + length - start, len(data))
            if lo < hi:
                out += data[lo:hi]
        return out


class StrictTar:
    """Iterate the members of one tar stream; raise :class:`ArchiveError` unless it ends well.

    ``data(member)`` yields the member's bytes in chunks (only while it is the current one).
    The TarInfo list that tarfile keeps is cleared as we go, so memory stays flat.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._recorder = _Recorder(stream)
        try:
            # Stream mode ("r|"): no seeking, so pipes and HTTP bodies work.
            self._tar = tarfile.open(fileobj=self._recorder, mode="r|", bufsize=CHUNK)  # noqa: SIM115
        except tarfile.TarError as error:
            raise ArchiveError(f"not a tar archive ({_one_line(error)})") from None

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        tar = self._tar
        # Opening read the first header: none there means an empty archive. (Python 3.9 and
        # 3.10 would seek back to read it again, which a stream cannot do.)
        empty = tar.firstmember is None  # type: ignore[attr-defined]
        try:
            while not empty:
                member = tar.next()
                tar.members.clear()  # type: ignore[attr-defined]
                if member is None:
                    break
                yield member
        except tarfile.TarError as error:
            raise ArchiveError(f"corrupt or truncated ({_one_line(error)})") from None
        self._check_end()

    def data(self, member: tarfile.TarInfo) -> Iterator[bytes]:
        reader = self._tar.extractfile(member)
        if reader is None:
            return
        try:
            while chunk := reader.read(CHUNK):
                yield chunk
        except tarfile.TarError as error:
            raise ArchiveError(f"truncated in {member.name!r} ({_one_line(error)})") from None

    def _check_end(self) -> None:
        # tarfile stops quietly at the first block it cannot parse. A complete archive
        # stops at an all-zero end-of-archive block; anything else means damage.
        block = self._recorder.bytes_at(self._tar.offset, BLOCK)
        if len(block) < BLOCK:
            raise ArchiveError("truncated: the end-of-archive marker is missing")
        if block.count(0) != BLOCK:
            raise ArchiveError(f"corrupt header at byte {self._tar.offset}")

    def drain(self) -> None:
        """Read what follows the end marker (padding), so the next stream starts clean."""
        while self._recorder.read(CHUNK):
            pass


def normalize(name: str) -> str:
    """An archive member name as an absolute path inside the root ("/" for the root itself).

    Lexical, like Docker's ``filepath.Clean``: ``..`` cannot climb above ``/``. Symlinks on
    the way are not resolved here; the extractor runs chrooted, so they cannot lead out.
    """
    return posixpath.normpath("/" + name.lstrip("/")).replace("//", "/")


def member_xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    """The extended attributes a PAX header carries, as raw bytes."""
    found: dict[str, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith(XATTR_PAX_PREFIX):
            # tarfile decodes PAX values as UTF-8 with surrogateescape: undo it for binary
            # values such as security.capability.
            found[key[len(XATTR_PAX_PREFIX) :]] = value.encode("utf-8", "surrogateescape")
    return found


def mtime_ns(member: tarfile.TarInfo) -> int:
    """The member's mtime in nanoseconds, from a PAX ``mtime`` when it has a fraction."""
    text = member.pax_headers.get("mtime")
    if text and "." in text:
        whole, _, fraction = text.partition(".")
        sign = -1 if whole.startswith("-") else 1
        return int(whole) * 1_000_000_000 + sign * int((fraction + "000000000")[:9])
    return int(member.mtime) * 1_000_000_000


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
