"""What the benchmarks share: the bench image, fresh tmpfs roots, and the original tool's
copy pipeline to compare against."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from injector.ramroot.rootfs import RamRoot
from tests import images


def build_bench_image(tag: str, *, files: int, total_bytes: int, with_shell: bool) -> str:
    """``images.bench_tarball`` imported as ``tag`` (once: an existing image is reused);
    ``with_shell`` adds busybox as /bin/sh, an init a dry run can name."""
    if images.image_exists(tag):
        return tag
    with tempfile.TemporaryDirectory(dir=images.CACHE if images.CACHE.exists() else None) as work:
        tarball = Path(work) / "bench.tar"
        images.bench_tarball(tarball, files=files, total_bytes=total_bytes)
        if with_shell:
            import tarfile

            with tarfile.open(tarball, "a") as tar:
                tar.add(str(images.BUSYBOX), "bin/busybox")
                link = tarfile.TarInfo("bin/sh")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(link)
        images.import_tar(tarball, tag)
    return tag


@contextlib.contextmanager
def fresh_tmpfs(size: int) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as state, RamRoot(Path(state) / "s", size) as ram:
        yield ram.path


def shell(command: str, root: Path) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=root, check=True,
                   stderr=subprocess.DEVNULL)  # fmt: skip


def original_pipeline(tag: str) -> Callable[[Path], None]:
    """The original tool's copy: ``docker cp CID:/ - | dd bs=8M | tar x`` into a root."""

    def run(root: Path) -> None:
        with images.temporary_container(tag) as container:
            shell(f"docker cp {container}:/ - | dd bs=8M status=none | tar -xpf -", root)

    return run


def timed(run: Callable[[Path], object], size: int) -> float:
    """Seconds ``run`` takes to fill a fresh tmpfs of ``size`` bytes."""
    with fresh_tmpfs(size) as root:
        started = time.monotonic()
        run(root)
        return time.monotonic() - started


def bench_arguments(description: str, runs: int = 1) -> argparse.Namespace:
    """``--runs N`` (the best of N counts; ``runs`` by default) and ``--keep-image``; root
    is needed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--keep-image", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    return args
