"""Before the pivot, the stage of a rehearsal stands in the host's filesystem: nothing the
image holds may lead it there. The console it stages in the new root (``/.dboot-console``,
bound to the rehearsal's terminal until ``/dev`` exists) must be made in the new root, even
when the image has a symlink by that name to a host path.

Real engine, real sandbox, real pty, the real stage. Never this machine's PID 1.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from injector.events import Finished
from tests.images import PREFIX, build_tinybox, docker
from tests.sandbox.test_console_pty import pty_rehearsal, read_until, shell_on_pty
from tests.sandbox.test_switch import nothing_left_behind  # noqa: F401  (a fixture)

pytestmark = [
    pytest.mark.root,
    pytest.mark.engine,
    pytest.mark.usefixtures("nothing_left_behind"),
]

TAG = PREFIX + "console-link:latest"


@pytest.fixture
def host_run(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of the host's, as its /run is: the stage of a rehearsal remounts the block
    filesystems it sees read-only (in its own mount namespace) before the pivot, not this."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "dboot-test", str(run_dir)],
                   check=True)  # fmt: skip
    try:
        yield run_dir
    finally:
        subprocess.run(["umount", str(run_dir)], check=True)


@pytest.fixture
def linked_image(tmp_path: Path, host_run: Path) -> Iterator[tuple[str, Path]]:
    """tinybox whose ``/.dboot-console`` is a symlink to a path of the host that the
    rehearsal's stage can reach (the sandbox's mount namespace is a copy of the host's, the
    tmpfs above included); yields the tag and that path."""
    host_file = host_run / "made-on-the-host"
    build = tmp_path / "build"
    build.mkdir()
    (build / "Dockerfile").write_text(
        f"FROM {build_tinybox()}\nRUN ln -s {host_file} /.dboot-console\n"
    )
    docker("build", "-q", "-t", TAG, str(build))
    yield TAG, host_file
    docker("rmi", "-f", TAG)


def test_an_image_symlink_at_the_staged_console_reaches_nothing_of_the_host(
    tmp_path: Path, linked_image: tuple[str, Path]
) -> None:
    image, host_file = linked_image
    stop = threading.Event()
    events = pty_rehearsal(tmp_path, ["/bin/sh"], stop, image)
    try:
        with shell_on_pty(events) as (master, seen):
            # The rehearsal works: its console is the pty, and the staged one is gone.
            os.write(master, b"[ -c /dev/console ] && echo console-$(tty); ls /.dboot-console\r")
            shown = read_until(master, b"No such file", seen).decode()
            assert "console-/dev/console" in shown, shown
            stop.set()
            rest = list(events)
    finally:
        # Checked even when the rehearsal failed: reaching the host can make it fail.
        assert not os.path.lexists(host_file), f"the stage made {host_file} on the host"
    assert rest[-1] == Finished("rehearsed", exit_status=0, detail="stopped; the sandbox is gone")
