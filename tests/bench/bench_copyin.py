"""Copy-in benchmark: the original tool's pipeline, `docker export | tar x`, and dboot.

Builds (offline, once; cached as dboot-test/bench:1g) a ~1 GB image with ~20k files,
then in one run times each method into a fresh tmpfs and prints a table with the ratios
and dboot's peak RSS. dboot's copy runs in a child process so that its ``ru_maxrss``
(and that of its copy-in worker, a grandchild) is measured alone.

    sudo .venv/bin/python tests/bench/bench_copyin.py [--runs N] [--keep-image]

The page cache is warm for every method (each reads the same layer files; a first
untimed pass warms it), so the numbers compare the pipelines, not the disk.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from injector.image.sources import open_source
from injector.ramroot.rootfs import tmpfs_size_for
from tests import images
from tests.bench import pipelines
from tests.bench.pipelines import bench_arguments, build_bench_image, fresh_tmpfs, shell, timed

TAG = images.PREFIX + "bench:1g"
TARGET_RATIO = 0.5
RSS_LIMIT = 150 << 20


def build_image() -> str:
    return build_bench_image(TAG, files=20_000, total_bytes=1 << 30, with_shell=False)


original_pipeline = pipelines.original_pipeline(TAG)


def export_pipeline(root: Path) -> None:
    with images.temporary_container(TAG) as container:
        shell(f"docker export {container} | tar -xpf -", root)


def dboot_copy(root: Path) -> tuple[float, int]:
    """copy_into in a child process; returns (seconds, peak RSS in bytes of the child
    and its worker)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        code = 1
        try:
            with open_source(TAG) as image:
                image.scan()
                started = time.monotonic()
                image.copy_into(root, lambda done, total: None)
                os.write(write_fd, f"{time.monotonic() - started}".encode())
                code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as report:
        seconds = float(report.read() or "nan")
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("dboot copy failed")
    # ru_maxrss of a reaped child covers the largest of it and its reaped descendants.
    return seconds, usage.ru_maxrss * 1024


def main() -> int:
    args = bench_arguments(__doc__.splitlines()[0])
    ctypes.CDLL(None)  # fail early on exotic libcs
    tag = build_image()
    with open_source(tag) as image:
        index = image.scan()
    size = tmpfs_size_for(index.estimated_bytes)
    print(f"image {tag}: {index.file_count} entries, {index.data_bytes / 1e9:.2f} GB of data")
    timed(export_pipeline, size)  # warm the page cache; not counted
    results: dict[str, list[float]] = {"original": [], "export": [], "dboot": []}
    peak = 0
    for _ in range(args.runs):
        results["original"].append(timed(original_pipeline, size))
        results["export"].append(timed(export_pipeline, size))
        with fresh_tmpfs(size) as root:
            seconds, rss = dboot_copy(root)
        results["dboot"].append(seconds)
        peak = max(peak, rss)
    best = {name: min(times) for name, times in results.items()}
    base = best["original"]
    print(f"{'method':<48} {'seconds':>8} {'vs original':>12}")
    labels = {
        "original": "docker cp CID:/ - | dd bs=8M | tar x (original)",
        "export": "docker export CID | tar x",
        "dboot": "dboot copy_into (overlay fast path)",
    }
    for name, seconds in best.items():
        print(f"{labels[name]:<48} {seconds:>8.2f} {seconds / base:>11.2f}x")
    print(f"dboot peak RSS: {peak / 2**20:.1f} MiB (limit {RSS_LIMIT >> 20} MiB)")
    ok = best["dboot"] <= TARGET_RATIO * base and peak < RSS_LIMIT
    print("targets met" if ok else "TARGETS MISSED")
    if not args.keep_image:
        images.remove_image(tag)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
