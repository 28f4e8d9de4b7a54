"""`dboot`: the engine for scripts. Presentation only; all logic lives in ``injector``.

    dboot images [--json]
    dboot check [OPTIONS] IMAGE [OPTIONS] [INIT [ARG...]]
    dboot rehearse [OPTIONS] IMAGE [OPTIONS] INIT [ARG...]
    dboot switch [OPTIONS] IMAGE [OPTIONS] INIT [ARG...]

Options may come anywhere before INIT. INIT is the first word after IMAGE that starts with
``/``, and every word from there on is its argv, options included: in
``dboot rehearse tinybox /bin/sh -c 'echo --json'``, ``--json`` belongs to the shell.

Exit codes: 0 ok, 1 bad usage or input, 2 environment failure, 3 refused by a safety check;
128+N when signal N (Ctrl-C, SIGTERM) ended the run, except that Ctrl-C is how a rehearsal
whose init runs is ended: that exits 0. A hang-up (SIGHUP) is a terminal gone: 2. Every error
is one line that names the cause and the fix, never a traceback (``-v`` adds it). An error
that is none of the engine's own (a bug, or the system refusing something we did not
foresee) exits 2, or 1 when it concerns a path the user gave (``--state-dir``, an archive):
that path is the input to fix.

When standard output or standard error stops taking writes (a closed terminal: EIO; a
closed pipe: EPIPE; a full disk), the run stops and undoes what it did, as for Ctrl-C, and
exits 2. A dead terminal gets no more writes; a switch's last line goes to its run log
(``injector.runlog``: /var/log/dboot.log, or ``$DBOOT_LOG_FILE``) instead.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, cast

from app.format import human_bytes, short_id
from initstage.plan import DEFAULT_GRACE_SECONDS, DEFAULT_REMOTE_REVERT_MINUTES, KEEP_FILE
from injector.errors import BadInput, DbootError, EnvironmentFailure, traceback_text
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

if TYPE_CHECKING:
    from injector.install.install import InstallOptions
    from injector.switch import SwitchOptions
    from injector.teach import Pause

EXIT_OK, EXIT_USAGE, EXIT_ENVIRONMENT, EXIT_REFUSED = 0, 1, 2, 3
UNEXPECTED_FIX = "run it again with -v for the traceback, and report it"

FORCE_HELP = "go on despite blockers (warnings never stop a run)"
YES_HELP = "skip only the typed confirmation"
INIT_RULE = (
    "Options may come anywhere before INIT. INIT is the first word after IMAGE that starts "
    "with /; every word from there on is its argv, options included."
)


class _Parser(argparse.ArgumentParser):
    """argparse, but bad usage is one line and exit 1 (the contract), not argparse's 2."""

    def error(self, message: str) -> NoReturn:
        raise BadInput(message, f"see `{self.prog} --help`")


def parse_size_arg(text: str) -> int:
    from injector.ramroot.rootfs import parse_size

    try:
        return parse_size(text)
    except (ValueError, DbootError) as error:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 512M or 2G") from error


def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: the split at INIT (split_init) must know every option by its name.
    common = _Parser(add_help=False, allow_abbrev=False)
    common.add_argument("--json", action="store_true", help="events as JSON lines on stdout")
    common.add_argument("-v", "--verbose", action="store_true", help="also print log lines")
    common.add_argument("--docker-host", help="Docker engine address (default: $DOCKER_HOST)")
    common.add_argument(
        "--state-dir",
        type=Path,
        default=Path("/run/dboot"),
        metavar="DIR",
        help="an absolute path only root can change; each run works in a fresh subdirectory"
        " of it, one switch or dry run at a time (default /run/dboot)",
    )
    common.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_SECONDS,
        metavar="SECONDS",
        help="how long processes get between SIGTERM and SIGKILL"
        f" (default {DEFAULT_GRACE_SECONDS:g})",
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
    common.add_argument(
        "--no-modules",
        action="store_true",
        help="do not add the running kernel's modules and firmware to the new root",
    )

    parser = _Parser(
        prog="dboot",
        allow_abbrev=False,
        description="Replace this system's userspace with a "
        "Docker image held in RAM, without rebooting.",
        epilog=INIT_RULE,
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    images = commands.add_parser(
        "images", parents=[common], allow_abbrev=False, help="list local engine images"
    )
    images.set_defaults(handler=cmd_images)

    check = commands.add_parser(
        "check",
        parents=[common],
        allow_abbrev=False,
        help="preflight report; changes nothing",
        usage="%(prog)s [options] IMAGE [INIT [ARG...]]",
        epilog=INIT_RULE + " An INIT given here is checked against the image.",
    )
    add_stop_options(check)
    check.add_argument("image", metavar="IMAGE")
    check.set_defaults(handler=cmd_check)

    for name, text in (
        ("rehearse", "the whole switch, inside a sandbox"),
        ("switch", "the real thing"),
        ("install", "make the image what this machine boots, on probation, old system kept"),
    ):
        sub = commands.add_parser(
            name,
            parents=[common],
            allow_abbrev=False,
            help=text,
            usage="%(prog)s [options] IMAGE INIT [ARG...]"
            if name != "install"
            else "%(prog)s [options] IMAGE [INIT [ARG...]] | --revert",
            epilog=INIT_RULE,
        )
        sub.add_argument("--force", action="store_true", help=FORCE_HELP)
        if name != "install":  # its reboot is the init's own (systemctl reboot): graceful
            add_stop_options(sub)
        if name == "install":
            sub.add_argument(
                "--no-reboot", action="store_true", help="install, then leave the reboot to you"
            )
            sub.add_argument(
                "--revert",
                action="store_true",
                help="boot the old system from the next boot on (from either system)",
            )
        if name in ("switch", "install"):
            sub.add_argument("--yes", action="store_true", help=YES_HELP)
            sub.add_argument(
                "--dry-run",
                action="store_true",
                help="stop just before the injection and undo everything",
            )
            sub.add_argument(
                "--no-carry",
                action="store_true",
                help="do not carry this machine's SSH host keys, authorized_keys and network "
                "configuration into the new root",
            )
            sub.add_argument(
                "--revert-after",
                type=float,
                metavar="MINUTES",
                help="reboot into the old system MINUTES (1 to 1440) after the switch unless "
                f"{KEEP_FILE} exists by then (default in a remote session: "
                f"{DEFAULT_REMOTE_REVERT_MINUTES:g})",
            )
            sub.add_argument(
                "--no-revert", action="store_true", help="no revert timer, even in a remote session"
            )
        if name == "switch":
            sub.add_argument(
                "--ssh",
                action="store_true",
                help="the new system runs the image's SSH server, restarted whenever it dies "
                "(for an init that starts no services: a shell, busybox init)",
            )
            sub.add_argument(
                "--ssh-check",
                type=int,
                metavar="PORT",
                help="before committing, run the image's sshd in the RAM root on PORT and go on "
                "once a login there succeeded (or Enter on this terminal)",
            )
            sub.add_argument(
                "--target-pid",
                type=int,
                metavar="PID",
                help="inject into PID, the PID 1 of its own namespace (labs, tests)",
            )
        if name == "rehearse":
            sub.add_argument(
                "--teach",
                action="store_true",
                help="pause before each step, say what it does and the system call it makes; "
                "Enter goes on (end of input: no more pauses)",
            )
        sub.add_argument("image", metavar="IMAGE", nargs="?" if name == "install" else None)
        sub.set_defaults(handler=cmd_switch, rehearse=name == "rehearse")
    _subcommands(parser)["install"].set_defaults(handler=cmd_install)

    status = commands.add_parser(
        "status",
        parents=[common],
        allow_abbrev=False,
        help="which system booted, its probation, the last boot report",
    )
    status.set_defaults(handler=cmd_status)
    return parser


def add_stop_options(parser: argparse.ArgumentParser) -> None:
    from injector.stop.plan import DEFAULT_CEILING_CAP, DEFAULT_STOP_MODE, STOP_MODES

    parser.add_argument(
        "--stop",
        choices=STOP_MODES,
        default=DEFAULT_STOP_MODE,
        help="graceful (default): before the injection the host's init stops its services in"
        " its own order, with their stop commands and timeouts (a rehearsal: the stand-in's);"
        " signal: leave everything to the stage's SIGTERM and SIGKILL",
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        metavar="SECONDS",
        help="the ceiling of the whole graceful stop; past it the switch goes on and names"
        f" what did not stop (default: what the units allow, at most {DEFAULT_CEILING_CAP:g})",
    )


def parse_command_line(argv: Sequence[str]) -> argparse.Namespace:
    """The parsed command line, ``init`` included (see the module docstring for the rule).

    Raises ``BadInput`` (exit 1, one line) for bad usage; ``--help`` exits 0 as usual."""
    parser = build_parser()
    words = list(argv)
    command_at = next((i for i, word in enumerate(words) if not word.startswith("-")), None)
    commands = _subcommands(parser)
    if command_at is None or words[command_at] not in commands:
        return parser.parse_args(words)  # --help, or an error naming the commands
    head, init = split_init(commands[words[command_at]], words[command_at + 1 :])
    args = parser.parse_args([*words[: command_at + 1], *head])
    args.init = init
    return args


def split_init(
    parser: argparse.ArgumentParser, words: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Split one command's words into (options and IMAGE, INIT and its argv).

    An option's value is never taken for IMAGE or INIT (``--state-dir /run/x``); ``--``
    ends the options. After IMAGE, the first word that is not an option is INIT, and must be
    an absolute path: a relative init, a stray word or an unknown option is bad input."""
    valued: set[str] = set()
    known: set[str] = set()
    for action in parser._actions:
        known.update(action.option_strings)
        if action.nargs != 0:
            valued.update(action.option_strings)
    takes_image = any(action.dest == "image" for action in parser._actions)
    image_seen = options_done = False
    index = 0
    while index < len(words):
        word = words[index]
        if word == "--" and not options_done:
            options_done = True  # argparse sees it too, and takes the next word as IMAGE
            index += 1
            continue
        if word.startswith("-") and word != "-" and not options_done:
            name = word.split("=", 1)[0]
            if name not in known:
                raise BadInput(f"unknown option {name}", f"see `{parser.prog} --help`")
            index += 2 if name in valued and "=" not in word else 1
            continue
        if not takes_image:
            index += 1  # argparse names the stray word
            continue
        if image_seen:
            _check_init_word(word)
            return list(words[:index]), list(words[index:])
        if word.startswith("/"):
            raise BadInput(
                f"IMAGE {word!r} is a path, not an image",
                "name the image before the init, e.g. `dboot rehearse tinybox /bin/sh`; "
                "give archives as docker-archive:PATH or rootfs:PATH",
            )
        image_seen = True
        index += 1
    return list(words), []


def _check_init_word(word: str) -> None:
    if not word.startswith("/"):
        raise BadInput(
            f"init {word!r} is not an absolute path (nor a known option)",
            "give the full path inside the image, e.g. /sbin/init",
        )


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("dboot has subcommands")


# --- images --------------------------------------------------------------------------------


def cmd_images(args: argparse.Namespace, out: TextIO) -> int:
    from injector.image.sources import list_images

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
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(),
            file=out,
        )
    return EXIT_OK


# --- check ---------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace, out: TextIO) -> int:
    from injector.check import check
    from injector.image.sources import open_source
    from injector.preflight import preflight
    from injector.switch import require_root

    require_root()
    with open_source(args.image, args.docker_host) as source:
        report = check(
            source,
            args.init,
            tmpfs_size=args.tmpfs_size,
            modules=not args.no_modules,
            stop_mode=args.stop,
            stop_timeout=args.stop_timeout,
        ).report
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
    if report.stop is not None:
        print_stop_plan(report.stop, report.processes, out)
    pid1 = report.pid1
    ptrace_state = "ptrace allowed" if pid1.ptrace_allowed else pid1.ptrace_reason
    print(f"  PID 1    {pid1.exe} ({ptrace_state})", file=out)
    if report.access is not None:
        print_access(report.access, report.session.image_has_ssh, out)
    for notice in report.notices:
        print_notice(notice, out)
    print("verdict: " + ("BLOCKED" if report.blocked else "ok to switch"), file=out)


def print_stop_plan(plan: Any, processes: Any, out: TextIO) -> None:
    """The graceful stop: the units in order with their timeouts, the worst case, what stays
    running, and how many processes are left to the stage's signals."""
    from injector.stop.plan import kept_by_reason
    from injector.units import duration_text

    if not plan.manager:
        print(f"  stop     {plan.note}", file=out)
        return
    if plan.mode == "signal":
        print(f"  stop     --stop=signal: {plan.manager} stops nothing", file=out)
    elif plan.units:
        print(
            f"  stop     {plan.manager} stops {len(plan.units)} units first, in order"
            f" (worst case {duration_text(plan.worst_case)}, ceiling"
            f" {duration_text(plan.ceiling)}):",
            file=out,
        )
        for unit in plan.units:
            print(
                f"           {unit.step:>2}. {unit.name}  {duration_text(unit.timeout)}"
                f"  {unit.command}",
                file=out,
            )
    for why, names in kept_by_reason(plan):
        print(f"  kept     {', '.join(names)}: {why}", file=out)
    left = [process for process in processes if not plan.fate(process.service).startswith("stop")]
    print(
        f"  signals  {len(left)} of {len(processes)} processes are left to the stage's SIGTERM"
        " and SIGKILL",
        file=out,
    )


def _address_text(item: Any) -> str:
    if not item.dynamic:
        return f"{item.address} static"
    if item.valid_seconds is None:
        return f"{item.address} dynamic"
    return f"{item.address} dynamic, {item.valid_seconds}s left"


def print_access(access: Any, image_has_ssh: bool, out: TextIO) -> None:
    """The access section of ``check``: how this machine is reached, and who gets back in."""
    for interface in access.interfaces:
        if interface.name == "lo":
            continue
        addresses = ", ".join(_address_text(item) for item in interface.addresses)
        driver = f" {interface.driver}" if interface.driver else ""
        print(f"  net      {interface.name} {interface.mac}{driver}: {addresses or '-'}", file=out)
    if access.network_state != "ok":
        print(f"  net      {access.network_state}", file=out)
    for route in access.routes:
        if route.destination == "default":
            onlink = " onlink" if route.onlink else ""
            print(f"  route    default via {route.gateway} dev {route.device}{onlink}", file=out)
    dns = access.dns
    if dns.servers:
        via = f" (behind {dns.local_stub}, from {dns.source})" if dns.local_stub else ""
        print(f"  DNS      {' '.join(dns.servers)}{via}", file=out)
    else:
        print(f"  DNS      none found: {dns.state}", file=out)
    if access.session is not None:
        session = access.session
        print(
            f"  SSH      from {session.client} to {session.local_address}:{session.local_port}"
            f" on {session.interface or '?'}",
            file=out,
        )
    for key in access.host_keys:
        print(f"  host key {key.type} {key.fingerprint}", file=out)
    for keys in access.authorized_keys:
        types = f" ({', '.join(keys.types)})" if keys.types else ""
        print(f"  keys     {keys.user}: {keys.count} in {keys.path}{types}", file=out)
    init = access.image_init
    init_text = (
        f"; init {init.path} is {init.kind}"
        + (" (starts services)" if init.starts_services else " (starts no services)")
        if init is not None
        else ""
    )
    print(f"  image    {'has' if image_has_ssh else 'has no'} SSH server{init_text}", file=out)


# --- rehearse / switch -----------------------------------------------------------------------


def switch_options(
    args: argparse.Namespace, out: TextIO, kind: type[SwitchOptions] | None = None
) -> SwitchOptions:
    """The engine's options for `rehearse`, `switch` and `install`, from the command line."""
    from injector.switch import SwitchOptions

    teaching = getattr(args, "teach", False)
    interactive = sys.stdin.isatty() and out.isatty()
    return (kind or SwitchOptions)(
        image=args.image,
        init_argv=list(args.init),
        state_dir=args.state_dir,
        grace=args.grace,
        tmpfs_size=args.tmpfs_size,
        api_mounts=not args.no_api_mounts,
        modules=not args.no_modules,
        service_stop=getattr(args, "stop", "graceful"),
        stop_timeout=getattr(args, "stop_timeout", None),
        carry=not getattr(args, "no_carry", False),
        ssh=getattr(args, "ssh", False),
        revert_after=getattr(args, "revert_after", None),
        no_revert=getattr(args, "no_revert", False),
        dry_run=getattr(args, "dry_run", False),
        target_pid=getattr(args, "target_pid", None),
        rehearse=args.rehearse,
        docker_host=args.docker_host,
        force=args.force,
        yes=getattr(args, "yes", False),
        # --teach reads Enter from our stdin: the sandbox's console is then shown, not relayed.
        console="relay" if not (args.json or teaching) and interactive else "capture",
        confirm=None if args.json else ask_hostname,
        ssh_check=getattr(args, "ssh_check", None),
        ssh_check_go=wait_for_ssh_login,
        last_words=lambda text: print(text, file=sys.stderr, flush=True),
        pause=wait_for_enter if teaching else None,
    )


def cmd_install(args: argparse.Namespace, out: TextIO) -> int:
    from injector.install import install

    renderer = JsonRenderer(out) if args.json else HumanRenderer(out, verbose=args.verbose)
    if _guard is not None:
        _guard.changes = True
    if args.revert:
        if args.image is not None:
            raise BadInput("--revert takes no IMAGE", "run `dboot install --revert` alone")
        events = install.revert(install.find_disk(), reboot=not args.no_reboot)
    else:
        if args.image is None:
            raise BadInput("install needs an IMAGE", "e.g. `dboot install debian:12 /sbin/init`")
        events = install.run_install(install_options(args, out))
    for event in events:
        renderer.render(event)
    return EXIT_OK


def install_options(args: argparse.Namespace, out: TextIO) -> InstallOptions:
    """The engine's options for `dboot install IMAGE [INIT [ARG...]]` (INIT: /sbin/init)."""
    from injector.install import install

    if not args.init:
        args.init = [install.DEFAULT_INIT]
    options = switch_options(args, out, install.InstallOptions)
    assert isinstance(options, install.InstallOptions)
    options.reboot = not args.no_reboot
    return options


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    from injector.install import status

    found = status.read_status()
    if args.json:
        print(json.dumps(found, indent=2, sort_keys=True), file=out)
    else:
        for line in status.describe(found):
            print(line, file=out)
    return EXIT_OK


def wait_for_enter(pause: Pause) -> None:
    """`dboot rehearse --teach`: the pause on stderr, then one line of input goes on.
    End of input (a closed or non-interactive stdin) means: no more pauses."""
    from injector.teach import StopTeaching, describe

    print("\n".join(describe(pause)), file=sys.stderr)
    print("Enter: go on", file=sys.stderr, flush=True)
    if not sys.stdin.readline():
        raise StopTeaching


def cmd_switch(args: argparse.Namespace, out: TextIO) -> int:
    from injector.switch import run

    options = switch_options(args, out)
    renderer = JsonRenderer(out) if args.json else HumanRenderer(out, verbose=args.verbose)
    exit_status = EXIT_OK
    if _guard is not None:
        _guard.changes = True
        if not options.rehearse:  # a rehearsal leaves no trace on the host, no log either
            _guard.log_file = options.log_file
    injected = False
    events = run(options)
    try:
        try:
            for event in events:
                if isinstance(event, Injection):
                    injected = True
                    if _guard is not None:
                        _guard.injected = True
                renderer.render(event)
                if isinstance(event, Finished) and event.exit_status is not None:
                    exit_status = event.exit_status
        finally:
            # Whatever ends the loop early (Ctrl-C, a dead terminal) ends the engine's
            # generator here and now, so its undo runs at once, not whenever it is collected.
            if isinstance(events, Generator):
                events.close()
    except KeyboardInterrupt as error:
        # The contract: Ctrl-C is how a rehearsal whose init never exits (a shell, a service
        # manager) is ended, once that init runs; the sandbox went with the generator.
        ctrl_c = getattr(error, "signum", signal.SIGINT) == signal.SIGINT
        if not (options.rehearse and injected and ctrl_c):
            raise
        renderer.render(Finished("rehearsed", detail="ended with Ctrl-C; the sandbox is gone"))
        return EXIT_OK
    return exit_status


def wait_for_ssh_login(command: str, done: threading.Event) -> bool:
    """``--ssh-check``: wait until a login was accepted; on a terminal, Enter goes on without
    one. Without a terminal only the login counts (``--yes`` does not skip it). Ctrl-C ends
    the run, and the engine undoes everything."""
    if not sys.stdin.isatty():
        done.wait()
        return True
    print(
        f"Waiting for a login with: {command}\n"
        "Press Enter to go on without one, Ctrl-C to call the switch off.",
        file=sys.stderr,
        flush=True,
    )
    while not done.is_set():
        ready, _, _ = select.select([sys.stdin], [], [], 0.2)
        if ready:
            sys.stdin.readline()
            return True
    return True


def ask_hostname(report: Any) -> bool:
    hostname = socket.gethostname()
    if not sys.stdin.isatty():
        return False
    print(
        f"This replaces the whole userspace of {hostname}: every process above dies and "
        "nothing on disk is kept running. It cannot be undone.",
        file=sys.stderr,
    )
    try:
        answer = input(f"Type the hostname ({hostname}) to go on: ")
    except (EOFError, OSError):  # the terminal closed while we asked: not confirmed
        return False
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
        if isinstance(event, StepStarted):
            self.progress_started, self.last_decile = time.monotonic(), -1
            self.line(f"==> {event.title}")
        elif isinstance(event, StepDone):
            if event.detail:
                self.line(f"    {event.detail}")
        elif isinstance(event, StepFailed):
            self.line(f"    {event.step} failed")  # the error itself follows, on stderr
        elif isinstance(event, Progress):
            self.progress(event.done, event.total)
        elif isinstance(event, Notice):
            print_notice(event, self.out)
        elif isinstance(event, Injection):
            self.line(
                f"    pid {event.pid} ({event.arch}) stopped in {event.interrupted_syscall},"
                f" execve injected in {event.elapsed_ms:.1f} ms"
            )
        elif isinstance(event, Console):
            self.line(event.text)
        elif isinstance(event, Finished):
            status, detail = event.exit_status, event.detail
            suffix = f", init exited with status {status}" if status is not None else ""
            self.line(f"{event.outcome}{suffix}{': ' + detail if detail else ''}")
        elif isinstance(event, Log):
            if self.verbose:
                self.line(f"    . {event.text}")
        elif isinstance(event, Fact) and self.verbose:
            self.line(f"    {event.section}.{event.key} = {event.value}")

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
    # Flushed: an --ssh-check notice is read by someone before the run goes on.
    print(f"{notice.level}: {notice.message}{fix}", file=out, flush=True)


# --- errors and output that goes away ----------------------------------------------------

# A terminal that hung up answers writes with EIO (ENXIO once it is torn down).
TERMINAL_GONE = frozenset({errno.EIO, errno.ENXIO})


class OutputLost(EnvironmentFailure):
    """Standard output or standard error stopped taking writes (exit 2)."""


class OutputGuard:
    """Stands between dboot and its stdout and stderr.

    The first write that fails raises :class:`OutputLost` from that write, so that the run
    unwinds and undoes exactly as for Ctrl-C. The stream that failed (both, when it is the
    terminal that is gone) is pointed at ``/dev/null`` underneath, so that nothing, not even
    the interpreter's flush at exit, writes to it again: a failed flush at exit is what
    made Python exit with status 120. The last line, which the terminal can no longer
    show, goes to the run log (``log_file``) when the run keeps one."""

    def __init__(self, stdout: TextIO, stderr: TextIO) -> None:
        self.stdout = GuardedStream(stdout, self)
        self.stderr = GuardedStream(stderr, self)
        self.failure: OSError | None = None
        self.failed_stream = ""
        self.changes = False  # does the command change anything (rehearse, switch)?
        self.injected = False
        self.log_file: Path | None = None  # the run log, for a switch (not a rehearsal)

    def lost(self, stream: GuardedStream, error: OSError) -> None:
        dead = [stream]
        if error.errno in TERMINAL_GONE:
            dead += [other for other in (self.stdout, self.stderr) if other.on_terminal]
        for each in dead:
            each.divert()
        if self.failure is not None:
            return  # already unwinding: later failures must not cut the undo short
        self.failure = error
        self.failed_stream = "standard output" if stream is self.stdout else "standard error"
        raise OutputLost(self.cause(), self.fix()) from None

    def cause(self) -> str:
        error = self.failure
        reason = (error.strerror if error is not None else None) or "write failed"
        if error is not None and error.errno in TERMINAL_GONE:
            reason += ": the terminal is gone"
        return f"cannot write to {self.failed_stream} ({reason})"

    def outcome(self) -> str:
        """What a run that ends here leaves behind, in words."""
        if not self.changes:
            return "nothing was changed"
        if self.injected:
            return "stopped after the injection; the target already ran the init stage"
        return "stopped, and everything done before the injection was undone"

    def fix(self) -> str:
        done = self.outcome()
        if self.failure is not None and self.failure.errno in TERMINAL_GONE:
            return done + (f"; {self.log_file} says what was done" if self.log_file else "")
        return f"{done}; send the output somewhere that takes it"

    def say(self, line: str) -> None:
        """One line to stderr, or to the run log when stderr is gone; never raises."""
        with contextlib.suppress(OutputLost):
            self.stderr.write(line + "\n")
            self.stderr.flush()
        if self.stderr.diverted and self.log_file is not None:
            from injector.runlog import RunLog

            log = RunLog(self.log_file)
            log.write(line)
            log.close()


class GuardedStream(io.TextIOBase):
    """A text stream that hands write failures to its :class:`OutputGuard`."""

    def __init__(self, stream: TextIO, guard: OutputGuard) -> None:
        super().__init__()
        self._stream = stream
        self._guard = guard
        self.diverted = False
        try:
            self.on_terminal = stream.isatty()
        except (OSError, ValueError):
            self.on_terminal = False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._stream.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self._stream.errors

    def isatty(self) -> bool:
        return self.on_terminal and not self.diverted

    def fileno(self) -> int:
        return self._stream.fileno()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.diverted:
            return len(text)
        try:
            return self._stream.write(text)
        except OSError as error:
            self._guard.lost(self, error)
            return len(text)

    def flush(self) -> None:
        if self.diverted:
            return
        try:
            self._stream.flush()
        except OSError as error:
            self._guard.lost(self, error)
        except ValueError:
            # Its owner closed it first, e.g. when this wrapper is collected at exit: nothing
            # to flush. (Python 3.13 reports what a finalizer's flush raises; before, silence.)
            pass

    def divert(self) -> None:
        """Point the stream's file descriptor at /dev/null: nothing reaches it any more."""
        if self.diverted:
            return
        self.diverted = True
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, self._stream.fileno())
            finally:
                os.close(null)
            # What failed is still in the buffer: let it drain into /dev/null now.
            self._stream.flush()


_guard: OutputGuard | None = None


def unexpected_error(error: Exception, user_paths: Sequence[str]) -> tuple[str, int]:
    """One line for an exception that is none of the engine's own, and its exit code:
    1 when it names a path the user gave (that is the input to fix), else 2."""
    if isinstance(error, OSError) and error.filename is not None:
        where = os.path.abspath(os.fsdecode(error.filename))
        cause = f"{error.strerror or type(error).__name__} on {where}"
        for given in user_paths:
            if where == given or where.startswith(given.rstrip("/") + "/"):
                return f"{cause}: check {given}, which the command line names", EXIT_USAGE
        return f"{cause}: {UNEXPECTED_FIX}", EXIT_ENVIRONMENT
    text = _first_line(str(error))
    return (
        f"unexpected {type(error).__name__}{': ' + text if text else ''}: {UNEXPECTED_FIX}",
        EXIT_ENVIRONMENT,
    )


def _user_paths(args: argparse.Namespace | None) -> list[str]:
    if args is None:
        return []
    paths = [getattr(args, "state_dir", None)]
    image = str(getattr(args, "image", "") or "")
    for scheme in ("docker-archive:", "rootfs:"):
        if image.startswith(scheme):
            paths.append(Path(image[len(scheme) :]))
    return [os.path.abspath(path) for path in paths if path is not None]


def _first_line(text: str) -> str:
    return " ".join(text.strip().splitlines()[:1])


def main(argv: list[str] | None = None) -> NoReturn:
    global _guard
    _guard = OutputGuard(sys.stdout, sys.stderr)
    sys.stdout = cast(TextIO, _guard.stdout)
    sys.stderr = cast(TextIO, _guard.stderr)
    sys.exit(run_cli(argv))


def run_cli(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    """Run one command; every way it can end is an exit code and at most one line."""
    global _guard
    guard = _guard = _guard or OutputGuard(sys.stdout, sys.stderr)
    out = out or sys.stdout
    code = _run_command(sys.argv[1:] if argv is None else argv, out, guard)
    # Output still buffered (a pipe or a file is not line-buffered) must fail here, while we
    # can still say so, and not in the interpreter's flush at exit (status 120).
    try:
        out.flush()
    except OutputLost as error:
        guard.say(f"dboot: {_first_line(str(error))}")
        return code or error.exit_code
    return code


def _run_command(words: list[str], out: TextIO, guard: OutputGuard) -> int:
    verbose = any(word in ("-v", "--verbose") for word in words)
    args: argparse.Namespace | None = None
    # Ctrl-C must unwind through the engine's cleanups (tmpfs, containers, sandboxes), so it
    # becomes KeyboardInterrupt even if an embedding process had set SIGINT to be ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        args = parse_command_line(words)
        verbose = args.verbose
        return int(args.handler(args, out))
    except DbootError as error:
        guard.say(f"dboot: {_first_line(str(error))}")
        # One line by default; -v adds what the engine noted (e.g. a worker's traceback).
        for note in getattr(error, "__notes__", []) if verbose else []:
            guard.say(note)
        return error.exit_code
    except KeyboardInterrupt as error:
        # Ctrl-C, or SIGTERM/SIGHUP turned into an exception by the engine (``signum``).
        signum = int(getattr(error, "signum", signal.SIGINT))
        if signum == signal.SIGHUP:
            # The terminal went away: the same environment failure as a write failing with EIO.
            guard.say(f"dboot: the terminal hung up (SIGHUP): {guard.outcome()}")
            return EnvironmentFailure.exit_code
        name = signal.Signals(signum).name if signum != signal.SIGINT else "Ctrl-C"
        guard.say(f"dboot: interrupted by {name}: {guard.outcome()}")
        return 128 + signum
    except Exception as error:
        line, code = unexpected_error(error, _user_paths(args))
        guard.say(f"dboot: {line}")
        if verbose:
            guard.say(traceback_text(error).rstrip())
        return code
