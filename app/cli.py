"""`dboot`: the engine for scripts. Presentation only; all logic lives in ``injector``.

    dboot images [--json]
    dboot check IMAGE [INIT [ARG...]] [--json]
    dboot rehearse IMAGE INIT [ARG...]
    dboot switch IMAGE INIT [ARG...] [--yes] [--dry-run] [--target-pid PID] [--force]

Exit codes: 0 ok, 1 bad usage or input, 2 environment failure, 3 refused by a safety check.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from injector.errors import BadInput, DbootError
from injector.events import (
    Console,
    Event,
    Fact,
    Finished,
    Injection,
    Log,
    Notice,
    Progress,
    StepDone,
    StepFailed,
    StepStarted,
    to_json,
)

EXIT_OK, EXIT_USAGE, EXIT_ENVIRONMENT, EXIT_REFUSED = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    """argparse, but bad usage exits 1 (the contract), not argparse's 2."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"dboot: {message}\n")


def parse_size_arg(text: str) -> int:
    from injector.rootfs import parse_size

    try:
        return parse_size(text)
    except (ValueError, DbootError) as error:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 512M or 2G") from error


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="events as JSON lines on stdout")
    common.add_argument("-v", "--verbose", action="store_true", help="also print log lines")
    common.add_argument("--docker-host", help="Docker engine address (default: $DOCKER_HOST)")
    common.add_argument("--state-dir", type=Path, default=Path("/run/dboot"))
    common.add_argument(
        "--grace",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="how long processes get between SIGTERM and SIGKILL (default 3)",
    )
    common.add_argument(
        "--tmpfs-size",
        type=parse_size_arg,
        metavar="SIZE",
        help="size of the RAM root (default: the estimate plus headroom)",
    )
    common.add_argument(
        "--no-api-mounts",
        action="store_true",
        help="do not mount /proc, /sys, /dev in the new root",
    )

    parser = _Parser(
        prog="dboot",
        description="Replace this system's userspace with a "
        "Docker image held in RAM, without rebooting.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    images = commands.add_parser("images", parents=[common], help="list local engine images")
    images.set_defaults(handler=cmd_images)

    check = commands.add_parser("check", parents=[common], help="preflight report; changes nothing")
    check.add_argument("image")
    check.add_argument("init", nargs=argparse.REMAINDER, help="optional init command to validate")
    check.set_defaults(handler=cmd_check)

    for name, text in (
        ("rehearse", "the whole switch, inside a sandbox"),
        ("switch", "the real thing"),
    ):
        sub = commands.add_parser(name, parents=[common], help=text)
        sub.add_argument("--force", action="store_true", help="go on despite warnings and blockers")
        if name == "switch":
            sub.add_argument("--yes", action="store_true", help="skip the typed confirmation")
            sub.add_argument(
                "--dry-run",
                action="store_true",
                help="stop just before the injection and undo everything",
            )
            sub.add_argument(
                "--target-pid",
                type=int,
                metavar="PID",
                help="inject into PID, the PID 1 of its own namespace (labs, tests)",
            )
        sub.add_argument("image")
        sub.add_argument("init", nargs=argparse.REMAINDER)
        sub.set_defaults(handler=cmd_switch, rehearse=name == "rehearse")
    return parser


# --- images --------------------------------------------------------------------------------


def cmd_images(args: argparse.Namespace, out: TextIO) -> int:
    from injector.sources import list_images

    images = list_images(args.docker_host)
    if args.json:
        for image in images:
            print(json.dumps({"event": "image", **image.__dict__}), file=out)
        return EXIT_OK
    rows = [("REPOSITORY", "TAG", "IMAGE ID", "SIZE", "CREATED")]
    rows += [(i.repository, i.tag, short_id(i.id), human_bytes(i.size), i.created) for i in images]
    widths = [max(len(row[col]) for row in rows) for col in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(),
            file=out,
        )
    return EXIT_OK


# --- check ---------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace, out: TextIO) -> int:
    from injector import preflight
    from injector.sources import open_source
    from injector.switch import require_root

    require_root()
    if args.init and not args.init[0].startswith("/"):
        raise BadInput(
            f"init {args.init[0]!r} is not an absolute path",
            "give the full path inside the image, e.g. /sbin/init",
        )
    with open_source(args.image, args.docker_host) as source:
        index = source.scan()
        if args.init:
            preflight.validate_init(index, args.init)
        report = preflight.gather(index, args.init, tmpfs_size=args.tmpfs_size)
    if args.json:
        for event in preflight.report_events(report):
            print(json.dumps(to_json(event)), file=out)
        print(json.dumps({"event": "verdict", "blocked": report.blocked}), file=out)
    else:
        print_report(report, args.image, out)
    return EXIT_REFUSED if report.blocked else EXIT_OK


def print_report(report: Any, image: str, out: TextIO) -> None:
    ram = report.ram
    print(f"Image {image}", file=out)
    print(
        f"  RAM      needs ~{human_bytes(ram.estimated_bytes)}"
        f" (tmpfs {human_bytes(ram.tmpfs_size)})"
        f" of {human_bytes(ram.available_bytes)} available;"
        f" {human_bytes(ram.remaining_bytes)} left for the new system",
        file=out,
    )
    if report.swap:
        for device in report.swap:
            print(
                f"  swap     {device.path} ({device.kind}) {human_bytes(device.used_bytes)} used"
                f" of {human_bytes(device.size_bytes)}",
                file=out,
            )
    else:
        print("  swap     none active", file=out)
    rss = sum(p.rss_bytes for p in report.processes)
    services = sorted({p.service for p in report.processes})
    print(
        f"  killed   {len(report.processes)} processes in {len(services)} services,"
        f" {human_bytes(rss)} RSS",
        file=out,
    )
    chain = [
        f"{p.pid} {p.command.split()[0] if p.command else '?'}"
        for p in report.processes
        if p.session_chain
    ]
    if chain:
        print(
            f"  session  {'remote via ' + report.session.via if report.session.remote else 'local'}"
            f"; your chain: {' <- '.join(chain)}",
            file=out,
        )
    pid1 = report.pid1
    ptrace_state = "ptrace allowed" if pid1.ptrace_allowed else pid1.ptrace_reason
    print(f"  PID 1    {pid1.exe} ({ptrace_state})", file=out)
    for notice in report.notices:
        print_notice(notice, out)
    print("verdict: " + ("BLOCKED" if report.blocked else "ok to switch"), file=out)


# --- rehearse / switch -----------------------------------------------------------------------


def cmd_switch(args: argparse.Namespace, out: TextIO) -> int:
    from injector.switch import SwitchOptions, run

    if not args.init:
        raise BadInput("no init command given", "name the new PID 1, e.g. /sbin/init")
    options = SwitchOptions(
        image=args.image,
        init_argv=list(args.init),
        state_dir=args.state_dir,
        grace=args.grace,
        tmpfs_size=args.tmpfs_size,
        api_mounts=not args.no_api_mounts,
        dry_run=getattr(args, "dry_run", False),
        target_pid=getattr(args, "target_pid", None),
        rehearse=args.rehearse,
        docker_host=args.docker_host,
        force=args.force,
        yes=getattr(args, "yes", False),
        console="relay" if not args.json and sys.stdin.isatty() and out.isatty() else "capture",
        confirm=None if args.json else ask_hostname,
        last_words=lambda text: print(text, file=sys.stderr, flush=True),
    )
    renderer = JsonRenderer(out) if args.json else HumanRenderer(out, verbose=args.verbose)
    exit_status = EXIT_OK
    for event in run(options):
        renderer.render(event)
        if isinstance(event, Finished) and event.exit_status is not None:
            exit_status = event.exit_status
    return exit_status


def ask_hostname(report: Any) -> bool:
    hostname = socket.gethostname()
    if not sys.stdin.isatty():
        return False
    print(
        f"This replaces the whole userspace of {hostname}: every process above dies and "
        "nothing on disk is kept running. It cannot be undone.",
        file=sys.stderr,
    )
    answer = input(f"Type the hostname ({hostname}) to go on: ")
    return answer.strip() == hostname


class JsonRenderer:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def render(self, event: Event) -> None:
        print(json.dumps(to_json(event)), file=self.out, flush=True)


class HumanRenderer:
    """Concise lines; a live progress bar on a terminal, a few plain lines without one."""

    def __init__(self, out: TextIO, *, verbose: bool) -> None:
        self.out = out
        self.verbose = verbose
        self.tty = out.isatty()
        self.progress_started = 0.0
        self.last_decile = -1

    def render(self, event: Event) -> None:
        match event:
            case StepStarted(title=title):
                self.progress_started, self.last_decile = time.monotonic(), -1
                self.line(f"==> {title}")
            case StepDone(detail=detail) if detail:
                self.line(f"    {detail}")
            case StepFailed(step=step, error=error):
                self.line(f"    {step} failed: {error}")
            case Progress(done=done, total=total):
                self.progress(done, total)
            case Notice():
                print_notice(event, self.out)
            case Injection():
                self.line(
                    f"    pid {event.pid} ({event.arch}) stopped in {event.interrupted_syscall},"
                    f" execve injected in {event.elapsed_ms:.1f} ms"
                )
            case Console(text=text):
                self.line(text)
            case Finished(outcome=outcome, exit_status=status, detail=detail):
                suffix = f", init exited with status {status}" if status is not None else ""
                self.line(f"{outcome}{suffix}{': ' + detail if detail else ''}")
            case Log(text=text) if self.verbose:
                self.line(f"    . {text}")
            case Fact(section=section, key=key, value=value) if self.verbose:
                self.line(f"    {section}.{key} = {value}")

    def line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def progress(self, done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        if self.tty:
            width = 30
            filled = int(width * min(fraction, 1.0))
            elapsed = time.monotonic() - self.progress_started
            eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
            self.out.write(
                f"\r    [{'#' * filled}{'.' * (width - filled)}] "
                f"{human_bytes(done)}/{human_bytes(total)} eta {eta:4.0f}s"
            )
            if done >= total:
                self.out.write("\n")
            self.out.flush()
            return
        decile = int(fraction * 10)
        if decile > self.last_decile:
            self.last_decile = decile
            self.line(f"    {human_bytes(done)} of {human_bytes(total)} copied")


def print_notice(notice: Notice, out: TextIO) -> None:
    fix = f" ({notice.fix})" if notice.fix else ""
    print(f"{notice.level}: {notice.message}{fix}", file=out)


# --- helpers ----------------------------------------------------------------------------------


def short_id(image_id: str) -> str:
    return image_id.removeprefix("sha256:")[:12]


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_cli(argv))


def run_cli(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    # Ctrl-C must unwind through the engine's cleanups (tmpfs, containers, sandboxes), so it
    # becomes KeyboardInterrupt even if an embedding process had set SIGINT to be ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return int(args.handler(args, out))
    except DbootError as error:
        print(f"dboot: {error}", file=sys.stderr)
        # One line by default; -v adds what the engine noted (e.g. a worker's traceback).
        for note in getattr(error, "__notes__", []) if args.verbose else []:
            print(note, file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("dboot: interrupted; everything before the injection was undone", file=sys.stderr)
        return 130
