"""`dboot-tui`: the guided wizard's command line."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import stat
import sys
from pathlib import Path
from typing import TextIO

from app.tui.app import create_app
from app.tui.backend import EngineBackend
from injector.errors import DbootError

# Beside the engine's /var/log/dboot.log, in a directory only root can write: never /tmp,
# where anyone could plant a symlink for root to append through.
DEFAULT_LOG = Path("/var/log/dboot-tui.log")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dboot-tui",
        description="A guided wizard: pick an image, check it fits, then rehearse, switch, or"
        " install it on this machine's disk.",
    )
    parser.add_argument(
        "--rehearse",
        action="store_true",
        help="only ever rehearse in a sandbox (also forced by DBOOT_REHEARSAL_ONLY=1)",
    )
    parser.add_argument(
        "--teach",
        action="store_true",
        help="rehearsals pause before each step and explain it (Space or Enter goes on; "
        "F7 on the Run screen turns it on or off for the next rehearsal)",
    )
    parser.add_argument("--docker-host", help="Docker engine URL (default: $DOCKER_HOST)")
    parser.add_argument("--state-dir", type=Path, help="where the RAM root goes (/run/dboot)")
    parser.add_argument(
        "--target-pid",
        type=int,
        metavar="PID",
        help="switch PID, the PID 1 of its own namespace, not this machine's (labs, tests)",
    )
    parser.add_argument(
        "--log-file",
        type=Path,
        help=f"the wizard's log, mode 0600, never through a symlink (default: {DEFAULT_LOG})",
    )
    return parser.parse_args(argv)


def log_path(args: argparse.Namespace) -> Path:
    return Path(args.log_file) if args.log_file is not None else DEFAULT_LOG


def open_log(path: Path) -> TextIO:
    """The wizard's log, to append to: never through a symlink (root would write wherever it
    points), only a regular file (O_NONBLOCK: a FIFO with no reader fails instead of
    hanging), made mode 0600 when new (it names hosts, addresses and keys)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags | os.O_NOCTTY, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return open(fd, "a", encoding="utf-8", closefd=True)
    except BaseException:
        os.close(fd)
        raise


def main() -> None:
    args = parse_args()
    # While Textual owns the terminal nothing else may write to it: all logging goes to a file.
    path = log_path(args)
    try:
        log = open_log(path)
    except OSError as error:
        why = "it is a symlink" if error.errno == errno.ELOOP else error.strerror or str(error)
        print(f"dboot-tui: cannot write the log {path}: {why}: use --log-file", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(
        stream=log, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    logging.getLogger(__name__).info("dboot-tui starting, pid %d", os.getpid())
    try:
        backend = EngineBackend(
            docker_host=args.docker_host, state_dir=args.state_dir, target_pid=args.target_pid
        )
    except DbootError as error:
        print(f"dboot-tui: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    app = create_app(backend, rehearse_only=args.rehearse)
    app.wizard.teach = args.teach
    app.run()


if __name__ == "__main__":
    main()
