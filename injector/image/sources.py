"""Image sources: a local Docker engine image, a ``docker save`` archive, a rootfs tarball.

Every source answers the same three questions: what the image is (``details``), what is in
it (``scan``: metadata only), and "put it in this directory" (``copy_into``). The copy is
the tree ``docker export`` of the image would give, byte for byte and bit for bit, built by
the chrooted worker in ``injector.image.extract``:

* engine images on overlay2 are copied straight from their layer directories, through a
  read-only overlay mounted in the worker's private mount namespace (the fast path);
* other engine images stream ``docker export`` of a temporary container, which is always
  removed, on Ctrl-C too;
* ``docker-archive:PATH`` applies the layer tars of a ``docker save`` in order, whiteouts
  and opaque directories honoured; ``rootfs:PATH`` is one tar (gzip, zstd, xz, bzip2 or
  plain, told apart by magic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import os
import posixpath
import re
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from injector.errors import BadInput, DbootError, EnvironmentFailure
from injector.events import Progress as ProgressEvent
from injector.image.extract import run_worker, scan_layer
from injector.image.imageindex import ImageIndex, IndexBuilder, IndexEntry
from injector.image.tarstream import (
    CHUNK,
    ArchiveError,
    ChunkReader,
    StrictTar,
    decompressed,
    normalize,
)
from injector.signals import signals_deferred

__all__ = [
    "CopyStats",
    "ImageDetails",
    "ImageIndex",
    "ImageSource",
    "ImageSummary",
    "IndexEntry",
    "list_images",
    "open_source",
    "source_for_path",
]

DOCKER_ARCHIVE = "docker-archive:"
ROOTFS = "rootfs:"
# `docker create` wants a command; ours is never started. Any path will do.
PLACEHOLDER_COMMAND = ["/dboot-export-only"]
TEMPORARY_LABEL = "dboot.temporary"
# The container runtime's marker file, which `docker export` adds: systemd would take it
# for "running in a container" and skip half the boot, so the stream path drops it.
EXPORT_ONLY_FILES = ["/.dockerenv"]
ENGINE_FIX = "start dockerd, or point DOCKER_HOST (--docker-host) at a running engine"

Progress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class ImageSummary:
    repository: str  # "<none>" when untagged
    tag: str
    id: str  # "sha256:..."
    size: int
    created: str  # ISO 8601, UTC


@dataclasses.dataclass(frozen=True)
class ImageDetails:
    ref: str
    id: str
    tags: list[str]
    architecture: str
    cmd: list[str] | None
    entrypoint: list[str] | None
    env: list[str]
    history: list[str]
    size: int


@dataclasses.dataclass(frozen=True)
class CopyStats:
    files: int  # non-directory entries created
    bytes: int  # file data written
    seconds: float
    method: str  # "overlay" (layer dirs) or "tar" (a tar stream)


# ---------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------


def _engine_name(docker_host: str | None) -> str:
    return docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


@contextlib.contextmanager
def _engine_errors(docker_host: str | None) -> Iterator[None]:
    """Turn the SDK's and requests' exceptions into one line each."""
    import docker.errors
    import requests.exceptions

    try:
        yield
    except DbootError:
        raise
    except docker.errors.ImageNotFound as error:
        raise BadInput(_one_line(error), "list local images with `dboot images`") from None
    except docker.errors.APIError as error:
        raise EnvironmentFailure(
            f"the Docker engine refused: {_one_line(error)}", ENGINE_FIX
        ) from None
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as error:
        where = _engine_name(docker_host)
        raise EnvironmentFailure(
            f"cannot reach the Docker engine at {where} ({_short_reason(error)})", ENGINE_FIX
        ) from None


def _client(docker_host: str | None) -> Any:
    import docker

    with _engine_errors(docker_host):
        if docker_host:
            return docker.DockerClient(base_url=docker_host, version="auto")
        return docker.from_env()  # DOCKER_HOST, DOCKER_TLS_VERIFY, DOCKER_CERT_PATH


def list_images(docker_host: str | None = None) -> list[ImageSummary]:
    """The engine's local images, one row per tag, from a single API call."""
    client = _client(docker_host)
    try:
        with _engine_errors(docker_host):
            rows = client.api.images()
    finally:
        client.close()
    summaries = []
    for row in rows:
        created = datetime.datetime.fromtimestamp(row.get("Created", 0), datetime.timezone.utc)
        stamp = created.strftime("%Y-%m-%dT%H:%M:%SZ")
        tags = [t for t in row.get("RepoTags") or [] if t != "<none>:<none>"] or ["<none>:<none>"]
        for tag in tags:
            repository, _, name = tag.rpartition(":")
            summaries.append(ImageSummary(repository, name, row["Id"], row.get("Size", 0), stamp))
    return summaries


def open_source(ref: str, docker_host: str | None = None, *, method: str = "auto") -> ImageSource:
    """Open an image by reference: ``docker-archive:PATH``, ``rootfs:PATH``, or a local
    engine image. ``method`` ("auto", "overlay" or "stream") picks how an engine image is
    copied; tests use it to exercise both paths."""
    if ref.startswith(DOCKER_ARCHIVE):
        return DockerArchiveSource(ref, Path(ref[len(DOCKER_ARCHIVE) :]))
    if ref.startswith(ROOTFS):
        return RootfsSource(ref, Path(ref[len(ROOTFS) :]))
    if method not in ("auto", "overlay", "stream"):
        raise BadInput(f"unknown copy method {method!r}", "use auto, overlay or stream")
    return EngineSource(ref, docker_host, method=method)


# ---------------------------------------------------------------------------------------
# The common part
# ---------------------------------------------------------------------------------------


class ImageSource:
    """An opened image. Use as a context manager: leaving it removes whatever temporary
    containers it made."""

    kind: str = ""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self._index: ImageIndex | None = None
        # Counts the archive's bytes read, while ``scan(progress)`` runs.
        self._reading: _ReadProgress | None = None

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release what the source holds (nothing, unless it says otherwise)."""

    def details(self) -> ImageDetails:
        raise NotImplementedError

    def scan(self, progress: Progress | None = None) -> ImageIndex:
        """Metadata of every entry, no file data. Cached.

        Reading an archive takes a while (a 270 MB archive under emulation: 25 s):
        ``progress(bytes_read, archive_bytes)`` is called as it goes, a few times a second."""
        if self._index is None:
            total = self._scan_bytes() if progress is not None else 0
            reading = _ReadProgress(progress, total) if progress is not None and total else None
            self._reading = reading
            try:
                self._index = self._scan()
            finally:
                self._reading = None
            if reading is not None:
                reading.finish()  # the end-of-archive padding is never read
        return self._index

    def _scan_bytes(self) -> int:
        """How many archive bytes a scan reads; 0 when there is no archive to count."""
        return 0

    def _open_archive(self, path: Path) -> IO[bytes]:
        """``path`` opened for reading; while a scan runs, it counts the bytes read."""
        if self._reading is None:
            return path.open("rb")
        return _ReportingFile(path, self._reading)

    def copy_into(self, root: Path, progress: Progress) -> CopyStats:
        """Copy the image's tree into ``root`` (an empty directory, normally the RAM root),
        calling ``progress(bytes_done, bytes_total)`` a few times a second."""
        if os.geteuid() != 0:
            raise EnvironmentFailure("copying an image needs root", "run dboot with sudo")
        if not root.is_dir() or root.is_symlink():
            raise EnvironmentFailure(f"{root} is not a directory", "mount the RAM root first")
        total = max(self.scan().copy_bytes, 1)
        started = time.monotonic()

        def report(done: int) -> None:
            progress(min(done, total), total)

        summary = self._copy(root, report)
        progress(total, total)
        return CopyStats(
            files=summary["files"],
            bytes=summary["bytes"],
            seconds=time.monotonic() - started,
            method=summary["method"],
        )

    def _scan(self) -> ImageIndex:
        raise NotImplementedError

    def _copy(self, root: Path, report: Callable[[int], None]) -> dict[str, Any]:
        raise NotImplementedError

    def _bad(self, cause: str) -> BadInput:
        return BadInput(f"{self.ref}: {cause}", "check the path and that the archive is complete")


def _index_tar_streams(
    streams: Iterable[IO[bytes]], *, whiteouts: bool, skip: Iterable[str] = ()
) -> ImageIndex:
    builder = IndexBuilder()
    skipped = set(skip)
    for stream in streams:
        builder.start_layer()
        tar = StrictTar(stream)
        for member in tar:
            if normalize(member.name) not in skipped:
                builder.add_member(member, whiteouts=whiteouts)
        tar.drain()
    return builder.build()


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK):
        yield chunk


# ---------------------------------------------------------------------------------------
# Engine images
# ---------------------------------------------------------------------------------------


class EngineSource(ImageSource):
    kind = "engine"

    def __init__(self, ref: str, docker_host: str | None, *, method: str = "auto") -> None:
        super().__init__(ref)
        self._docker_host = docker_host
        self._method = method
        self._client = _client(docker_host)
        self._containers: set[str] = set()
        try:
            with _engine_errors(docker_host):
                self._attrs: dict[str, Any] = self._client.api.inspect_image(ref)
        except BadInput:
            self._client.close()
            raise BadInput(
                f"no image {ref!r} in the Docker engine at {_engine_name(docker_host)}",
                "list local images with `dboot images`, or use docker-archive:PATH / rootfs:PATH",
            ) from None
        except BaseException:
            self._client.close()
            raise

    @property
    def image_id(self) -> str:
        return str(self._attrs["Id"])

    def details(self) -> ImageDetails:
        config = self._attrs.get("Config") or {}
        with _engine_errors(self._docker_host):
            history = self._client.api.history(self.image_id)
        return ImageDetails(
            ref=self.ref,
            id=self.image_id,
            tags=list(self._attrs.get("RepoTags") or []),
            architecture=self._attrs.get("Architecture", ""),
            cmd=config.get("Cmd"),
            entrypoint=config.get("Entrypoint"),
            env=list(config.get("Env") or []),
            history=[step.get("CreatedBy", "") for step in history],
            size=int(self._attrs.get("Size", 0)),
        )

    def layer_dirs(self) -> list[str] | None:
        """The image's overlay2 layer directories, top first, when this process can read
        them (local engine, overlay2, same filesystem view); else None."""
        driver = self._attrs.get("GraphDriver") or {}
        data = driver.get("Data") or {}
        if driver.get("Name") != "overlay2" or not data.get("UpperDir"):
            return None
        layers = [data["UpperDir"], *filter(None, (data.get("LowerDir") or "").split(":"))]
        if not all(os.path.isdir(layer) for layer in layers):
            return None
        return layers

    def _fast_layers(self) -> list[str] | None:
        layers = None if self._method == "stream" else self.layer_dirs()
        if layers is None and self._method == "overlay":
            raise EnvironmentFailure(
                f"{self.ref}: no readable overlay2 layer directories here",
                "use the stream method, or run dboot on the engine's host",
            )
        return layers

    def _scan(self) -> ImageIndex:
        layers = self._fast_layers()
        if layers is not None:
            builder = IndexBuilder()
            if len(layers) == 1:
                scan_layer(layers[0], builder.add_scanned)
            else:
                run_worker(
                    {"op": "scan-tree", "layers": layers, "scratch": tempfile.gettempdir()},
                    on_entry=builder.add_scanned,
                    context=f"scanning {self.ref}",
                )
            return builder.build()
        with self._temporary_container() as container:
            stream = io.BufferedReader(ChunkReader(self._export(container)), CHUNK)
            try:
                return _index_tar_streams([stream], whiteouts=False, skip=EXPORT_ONLY_FILES)
            except ArchiveError as error:
                raise EnvironmentFailure(
                    f"{self.ref}: the engine's export stream broke ({error})", ENGINE_FIX
                ) from None

    def _copy(self, root: Path, report: Callable[[int], None]) -> dict[str, Any]:
        layers = self._fast_layers()
        if layers is not None:
            return run_worker(
                {
                    "op": "copy-tree",
                    "layers": layers,
                    "root": str(root),
                    "scratch": str(root.parent),
                },
                progress=report,
                context=f"copying {self.ref}",
            )
        with self._temporary_container() as container:
            job = {"op": "apply-tars", "root": str(root), "streams": 1, "docker_layers": False}
            return run_worker(
                {**job, "skip": EXPORT_ONLY_FILES},
                streams=[self._export(container)],
                progress=report,
                context=f"copying {self.ref}",
            )

    def _export(self, container: str) -> Iterator[bytes]:
        with _engine_errors(self._docker_host):
            yield from self._client.api.export(container, chunk_size=CHUNK)

    @contextlib.contextmanager
    def _temporary_container(self) -> Iterator[str]:
        """A created (never started) container of the image, for `docker export`."""
        with signals_deferred(), _engine_errors(self._docker_host):
            created = self._client.api.create_container(
                self.image_id,
                command=PLACEHOLDER_COMMAND,
                network_disabled=True,
                labels={TEMPORARY_LABEL: "export"},
            )
            container = str(created["Id"])
            self._containers.add(container)
        try:
            yield container
        finally:
            self._remove_container(container)

    def _remove_container(self, container: str) -> None:
        import docker.errors

        with signals_deferred():
            with contextlib.suppress(docker.errors.NotFound), _engine_errors(self._docker_host):
                self._client.api.remove_container(container, force=True)
            self._containers.discard(container)

    def close(self) -> None:
        for container in list(self._containers):
            self._remove_container(container)
        self._client.close()


# ---------------------------------------------------------------------------------------
# docker save archives
# ---------------------------------------------------------------------------------------


class DockerArchiveSource(ImageSource):
    """A ``docker save`` tarball: manifest.json names the config and the layers in order."""

    kind = "docker-archive"

    def __init__(self, ref: str, path: Path) -> None:
        super().__init__(ref)
        self.path = path
        _check_readable(ref, path)
        try:
            self._compressed = _is_compressed(path)
            members = self._read_small_members({"manifest.json"})
            manifests = json.loads(members["manifest.json"])
            manifest = manifests[0]
            self._config_name: str = manifest["Config"]
            self._layers: list[str] = list(manifest["Layers"])
            self._tags: list[str] = list(manifest.get("RepoTags") or [])
            self._config_bytes = self._read_small_members({self._config_name})[self._config_name]
            self._config: dict[str, Any] = json.loads(self._config_bytes)
            _check_docker_save_shape(manifest, self._config)
        except KeyError as error:
            raise self._bad(f"not a docker save archive ({error.args[0]} missing)") from None
        except (
            ArchiveError,
            tarfile.TarError,
            OSError,
            EOFError,
            ValueError,
            IndexError,
            TypeError,
        ) as error:
            raise self._bad(f"not a readable docker save archive ({_one_line(error)})") from None

    def details(self) -> ImageDetails:
        config = self._config.get("config") or {}
        return ImageDetails(
            ref=self.ref,
            id="sha256:" + hashlib.sha256(self._config_bytes).hexdigest(),
            tags=self._tags,
            architecture=self._config.get("architecture", ""),
            cmd=config.get("Cmd"),
            entrypoint=config.get("Entrypoint"),
            env=list(config.get("Env") or []),
            history=[step.get("created_by", "") for step in self._config.get("history") or []],
            size=self.path.stat().st_size,
        )

    def _scan_bytes(self) -> int:
        # Compressed, the archive is read once per layer (see _layer_streams).
        passes = len(self._layers) if self._compressed else 1
        return self.path.stat().st_size * passes

    def _layer_streams(self) -> Iterator[IO[bytes]]:
        """Each layer's tar bytes, in order, decompressed."""
        if not self._compressed:
            # A plain archive is seekable: open each layer member in place.
            with (
                self._open_archive(self.path) as raw,
                tarfile.open(fileobj=raw, mode="r:") as outer,
            ):
                for name in self._layers:
                    try:
                        member = outer.extractfile(name)
                    except KeyError:
                        member = None
                    if member is None:
                        raise ArchiveError(f"layer {name} missing")
                    yield decompressed(member)
            return
        # Compressed: one pass over the archive per layer (docker save is not compressed
        # by default; this keeps memory flat at the cost of re-reading).
        for name in self._layers:
            yield decompressed(self._stream_member(name))

    def _stream_member(self, wanted: str) -> IO[bytes]:
        with self._open_archive(self.path) as raw:
            tar = StrictTar(decompressed(raw))
            for member in tar:
                if member.name == wanted or normalize(member.name) == normalize(wanted):
                    if member.issym():
                        return self._stream_member(
                            posixpath.join(posixpath.dirname(wanted), member.linkname)
                        )
                    data = b"".join(tar.data(member)) if member.size < CHUNK else None
                    if data is not None:
                        return io.BytesIO(data)
                    # Large: spool through a temporary file so the archive can be closed.
                    spool = tempfile.TemporaryFile()  # noqa: SIM115 - the caller closes it
                    for chunk in tar.data(member):
                        spool.write(chunk)
                    spool.seek(0)
                    return spool
        raise ArchiveError(f"{wanted} missing")

    def _read_small_members(self, names: set[str]) -> dict[str, bytes]:
        if not self._compressed:
            with tarfile.open(self.path, "r:") as outer:
                found = {}
                for name in names:
                    reader = outer.extractfile(name)
                    if reader is None:
                        raise KeyError(name)
                    found[name] = reader.read()
                return found
        return {name: self._stream_member(name).read() for name in names}

    def _scan(self) -> ImageIndex:
        try:
            return _index_tar_streams(self._layer_streams(), whiteouts=True)
        except (ArchiveError, tarfile.TarError, OSError, EOFError) as error:
            raise self._bad(_one_line(error)) from None

    def _copy(self, root: Path, report: Callable[[int], None]) -> dict[str, Any]:
        job = {"op": "apply-tars", "root": str(root), "streams": len(self._layers)}
        try:
            return run_worker(
                {**job, "docker_layers": True, "skip": []},
                streams=(_chunks(stream) for stream in self._layer_streams()),
                progress=report,
                context=self.ref,
            )
        except ArchiveError as error:
            raise self._bad(str(error)) from None


# ---------------------------------------------------------------------------------------
# Plain rootfs tarballs
# ---------------------------------------------------------------------------------------


class RootfsSource(ImageSource):
    """One filesystem tarball (e.g. ``docker export``), plain or compressed."""

    kind = "rootfs"

    def __init__(self, ref: str, path: Path) -> None:
        super().__init__(ref)
        self.path = path
        _check_readable(ref, path)

    def details(self) -> ImageDetails:
        return ImageDetails(
            ref=self.ref,
            id="",  # a tarball has no image id; hashing it would read it all
            tags=[],
            architecture="",
            cmd=None,
            entrypoint=None,
            env=[],
            history=[],
            size=self.path.stat().st_size,
        )

    def _scan_bytes(self) -> int:
        return self.path.stat().st_size

    @contextlib.contextmanager
    def _stream(self) -> Iterator[IO[bytes]]:
        with self._open_archive(self.path) as raw:
            try:
                yield decompressed(raw)
            except ArchiveError as error:
                raise self._bad(str(error)) from None

    def _scan(self) -> ImageIndex:
        with self._stream() as stream:
            try:
                return _index_tar_streams([stream], whiteouts=False)
            except (ArchiveError, OSError, EOFError) as error:
                raise self._bad(_one_line(error)) from None

    def _copy(self, root: Path, report: Callable[[int], None]) -> dict[str, Any]:
        with self._stream() as stream:
            job = {"op": "apply-tars", "root": str(root), "streams": 1, "docker_layers": False}
            try:
                return run_worker(
                    {**job, "skip": []},
                    streams=[_chunks(stream)],
                    progress=report,
                    context=self.ref,
                )
            except ArchiveError as error:
                raise self._bad(str(error)) from None


def scan_events(source: ImageSource, step: str) -> Generator[ProgressEvent, None, ImageIndex]:
    """``source.scan()`` in a stream of events: ``index = yield from scan_events(source,
    "source")`` yields ``Progress(step, bytes_read, archive_bytes)`` while an archive is read.
    The scan runs in a thread of ours (our own mount namespace) so that the events arrive
    as they happen; closing the stream early stops the scan at its next report."""
    from injector.inject import nsenter

    def scan(send: Callable[[ProgressEvent], None]) -> ImageIndex:
        return source.scan(lambda done, total: send(ProgressEvent(step, done, total)))

    return (yield from nsenter.stream_in_mount_namespace(os.getpid(), scan))


# ---------------------------------------------------------------------------------------
# A plain path: which kind of archive is it?
# ---------------------------------------------------------------------------------------

# What a `docker save` archive holds at its top, and nothing else: its indexes, the OCI
# layout's blobs/ (Docker 25 and later), or one directory and one .json per layer and config
# (earlier Dockers), each named by a 64-hex digest. A filesystem tarball has bin, etc, usr...
DOCKER_SAVE_INDEXES = frozenset({"manifest.json", "index.json"})
DOCKER_SAVE_NEUTRAL = frozenset({"oci-layout", "repositories"})
_DIGEST_NAME = re.compile(r"[0-9a-f]{64}(\.json)?")
OPEN_FIX = "give a `docker save` archive or a filesystem tarball (plain, gzip, zstd or xz)"


def source_for_path(path: str | os.PathLike[str]) -> str:
    """The reference that opens the archive at ``path``, told from its content (not its
    name): ``docker-archive:PATH`` for a ``docker save`` archive, ``rootfs:PATH`` for a
    filesystem tarball, either one plain or compressed. ``BadInput`` says in one line why a
    file is neither. Reads a few headers only: the first entries of an archive decide."""
    resolved = Path(path).expanduser().absolute()
    try:
        # stat first: opening a FIFO or a device would wait or read forever.
        if not stat.S_ISREG(resolved.stat().st_mode):
            raise BadInput(f"{resolved} is not a regular file", "give the path of an archive file")
        with resolved.open("rb") as raw:
            stream = decompressed(raw)
            layout_seen = False
            for member in StrictTar(stream):
                top = normalize(member.name).split("/")[1]
                if top in DOCKER_SAVE_INDEXES or _DIGEST_NAME.fullmatch(top) or top == "blobs":
                    return f"{DOCKER_ARCHIVE}{resolved}"
                if top in DOCKER_SAVE_NEUTRAL:
                    layout_seen = True
                elif top:  # "" is the root entry ("./") a filesystem tarball may start with
                    return f"{ROOTFS}{resolved}"
    except OSError as error:
        raise BadInput(
            f"cannot read {resolved} ({error.strerror or error})",
            "give the path of a readable file",
        ) from None
    except ArchiveError as error:
        kind = _compression_of(resolved)
        what = str(error) if kind == "none" else f"{kind}-compressed, but {error}"
        raise BadInput(f"{resolved}: {what}", OPEN_FIX) from None
    if layout_seen:
        raise BadInput(f"{resolved}: a docker save layout without manifest.json", OPEN_FIX)
    raise BadInput(f"{resolved}: an empty tar archive", OPEN_FIX)


def _compression_of(path: Path) -> str:
    from injector.image.tarstream import detect_compression

    with path.open("rb") as handle:
        return detect_compression(handle.read(8))


class _ReadProgress:
    """Archive bytes read in a whole scan, told about once a MiB. Bytes read, not a file
    offset: tarfile reads every header before it seeks back to a layer's data."""

    def __init__(self, progress: Progress, total: int) -> None:
        self._progress = progress
        self.total = total
        self.done = 0
        self._told = 0

    def add(self, count: int) -> None:
        self.done = min(self.done + count, self.total)
        if self.done - self._told >= CHUNK:
            self._told = self.done
            self._progress(self.done, self.total)

    def finish(self) -> None:
        self._progress(self.total, self.total)


class _ReportingFile(io.FileIO):
    """An archive file that counts the bytes read from it into a :class:`_ReadProgress`."""

    def __init__(self, path: Path, reading: _ReadProgress) -> None:
        super().__init__(path, "rb")
        self._reading = reading

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self._reading.add(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        count = super().readinto(buffer)
        self._reading.add(count)
        return count


def _check_docker_save_shape(manifest: Any, config: Any) -> None:
    """Raise TypeError unless manifest.json and the image config have the types that
    ``docker save`` writes, so that no later ``.get`` meets a list or a string."""
    names = [manifest.get("Config"), *manifest.get("Layers"), *(manifest.get("RepoTags") or [])]
    if not all(isinstance(name, str) for name in names):
        raise TypeError("manifest.json names something that is not a string")
    if not isinstance(config, dict) or not isinstance(config.get("config") or {}, dict):
        raise TypeError("the image config is not a JSON object")
    if not isinstance(config.get("history") or [], list) or not all(
        isinstance(step, dict) for step in config.get("history") or []
    ):
        raise TypeError("the image config's history is not a list of objects")


def _check_readable(ref: str, path: Path) -> None:
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
        if regular:  # not before: opening a FIFO would wait for a writer, for ever
            with path.open("rb") as handle:
                handle.read(1)
    except OSError as error:
        raise BadInput(
            f"{ref}: cannot read {path} ({error.strerror or error})",
            "give the path of a readable archive",
        ) from None
    if not regular:
        raise BadInput(f"{ref}: {path} is not a regular file", "give the path of an archive file")


def _is_compressed(path: Path) -> bool:
    return _compression_of(path) != "none"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _short_reason(error: BaseException) -> str:
    """The innermost useful words of a connection error (urllib3 nests them deeply)."""
    text = _one_line(error)
    for marker in ("FileNotFoundError", "ConnectionRefusedError", "PermissionError", "timed out"):
        if marker in text:
            return {
                "FileNotFoundError": "no socket there",
                "ConnectionRefusedError": "connection refused",
                "PermissionError": "permission denied",
                "timed out": "timed out",
            }[marker]
    return text[:200]
