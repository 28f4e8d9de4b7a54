"""`dboot-tui`: the guided wizard's command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from app.tui.app import create_app
from app.tui.backend import EngineBackend
from injector.errors import DbootError

DEFAULT_LOG = Path("/tmp/dboot-tui.log")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dboot-tui",
        description="A guided wizard: pick an image, check it fits, then rehearse or switch.",
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
        help=f"the wizard's log; never the screen (default: <state-dir>/tui.log or {DEFAULT_LOG})",
    )
    return parser.parse_args(argv)


def log_path(args: argparse.Namespace) -> Path:
    if args.log_file is not None:
        return Path(args.log_file)
    if args.state_dir is not None and Path(args.state_dir).is_dir():
        return Path(args.state_dir) / "tui.log"
    return DEFAULT_LOG


def main() -> None:
    args = parse_args()
    # While Textual owns the terminal nothing else may write to it: all logging goes to a file.
    path = log_path(args)
    try:
        logging.basicConfig(
            filename=path,
            level=logging.INFO,
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
        )
    except OSError as error:
        print(f"dboot-tui: cannot write the log {path}: {error}: use --log-file", file=sys.stderr)
        sys.exit(2)
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
