"""The CLI contract's command line, without root: options anywhere before INIT, INIT the
first word after IMAGE that starts with "/", and every mistake one line with exit 1."""

from __future__ import annotations

import argparse
import errno
import io
import os
import pty
from pathlib import Path
from typing import TextIO, cast

import pytest

from app import cli
from injector.errors import BadInput


def parse(*words: str) -> argparse.Namespace:
    return cli.parse_command_line(list(words))


def bad(*words: str) -> str:
    with pytest.raises(BadInput) as raised:
        parse(*words)
    assert raised.value.exit_code == 1
    text = str(raised.value)
    assert "\n" not in text and raised.value.fix
    return text


def test_json_after_image_is_an_option() -> None:
    args = parse("check", "tinybox", "--json")
    assert args.json and args.image == "tinybox" and args.init == []


def test_options_before_and_after_image() -> None:
    args = parse("switch", "--dry-run", "tinybox", "--grace", "5", "/sbin/init")
    assert args.dry_run and args.grace == 5.0
    assert args.image == "tinybox" and args.init == ["/sbin/init"]


def test_everything_from_init_on_is_its_argv() -> None:
    args = parse("switch", "tinybox", "--grace", "5", "/bin/sh", "-c", "echo --json")
    assert not args.json and args.grace == 5.0
    assert args.init == ["/bin/sh", "-c", "echo --json"]
    # Even words that are dboot's own options, --help included, belong to the init.
    args = parse("rehearse", "tinybox", "/bin/sh", "--json", "--help", "--grace", "1", "-v")
    assert args.init == ["/bin/sh", "--json", "--help", "--grace", "1", "-v"]
    assert not args.json and not args.verbose and args.grace == 3.0


def test_option_values_are_never_image_or_init() -> None:
    args = parse("rehearse", "--state-dir", "/tmp/dboot-x", "tinybox", "/sbin/init")
    assert args.state_dir == Path("/tmp/dboot-x") and args.init == ["/sbin/init"]
    args = parse("rehearse", "tinybox", "--state-dir", "/tmp/dboot-y", "/sbin/init", "a")
    assert args.state_dir == Path("/tmp/dboot-y") and args.init == ["/sbin/init", "a"]
    args = parse("switch", "tinybox", "--target-pid", "1234", "--docker-host", "/s", "/sbin/init")
    assert args.target_pid == 1234 and args.docker_host == "/s" and args.init == ["/sbin/init"]
    args = parse("switch", "tinybox", "--grace=7", "--tmpfs-size=64M", "/sbin/init")
    assert args.grace == 7.0 and args.tmpfs_size == 64 << 20


def test_double_dash_ends_the_options() -> None:
    args = parse("rehearse", "--json", "tinybox", "--", "/bin/sh", "-x")
    assert args.json and args.init == ["/bin/sh", "-x"]
    args = parse("rehearse", "--", "tinybox", "/bin/sh")
    assert args.image == "tinybox" and args.init == ["/bin/sh"]


def test_every_common_option_is_known_after_image() -> None:
    args = parse(
        "switch",
        "tinybox",
        "--json",
        "-v",
        "--docker-host",
        "unix:///x.sock",
        "--no-api-mounts",
        "--no-modules",
        "--force",
        "--yes",
        "/sbin/init",
    )
    assert args.json and args.verbose and args.docker_host == "unix:///x.sock"
    assert args.no_api_mounts and args.no_modules and args.force and args.yes
    assert args.init == ["/sbin/init"]


def test_check_takes_an_optional_init() -> None:
    args = parse("check", "--json", "tinybox", "/sbin/init", "--verbose")
    assert args.init == ["/sbin/init", "--verbose"] and not args.verbose


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (("check", "tinybox", "sbin/init"), "'sbin/init' is not an absolute path"),
        (("rehearse", "tinybox", "init"), "'init' is not an absolute path"),
        (("switch", "tinybox", "--grace", "5", "bin/sh", "/x"), "'bin/sh' is not an absolute"),
        (("rehearse", "tinybox", "--bogus", "/bin/sh"), "unknown option --bogus"),
        (("rehearse", "--bogus=1", "tinybox", "/bin/sh"), "unknown option --bogus"),
        (("rehearse", "/bin/sh"), "'/bin/sh' is a path, not an image"),
        (("check",), "IMAGE"),
        (("check", "--json"), "IMAGE"),
        (("images", "tinybox"), "unrecognized arguments: tinybox"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        ((), "command"),
        (("switch", "tinybox", "--grace", "soon", "/sbin/init"), "soon"),
        (("switch", "tinybox", "--tmpfs-size", "lots", "/sbin/init"), "lots"),
        (("switch", "tinybox", "--grace"), "--grace"),
        # No abbreviations: the split at INIT must know every option by its full name.
        (("switch", "--dry", "tinybox", "/sbin/init"), "--dry"),
        (("rehearse", "--yes", "tinybox", "/bin/sh"), "--yes"),  # switch only
    ],
)
def test_bad_usage_is_one_line_exit_1(words: tuple[str, ...], expected: str) -> None:
    assert expected in bad(*words)


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        parse("switch", "tinybox", "--help")
    assert raised.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--force go on despite blockers (warnings never stop a run)" in text
    assert "--yes skip only the typed confirmation" in text
    assert "--no-modules" in text
    assert "INIT is the first word after IMAGE that starts with /" in text


def test_no_modules_reaches_the_engine() -> None:
    out = cast(TextIO, io.StringIO())
    on = cli.switch_options(parse("rehearse", "tinybox", "/sbin/init"), out)
    off = cli.switch_options(parse("rehearse", "--no-modules", "tinybox", "/sbin/init"), out)
    assert on.modules and not off.modules
    assert off.init_argv == ["/sbin/init"] and off.rehearse


# --- errors that are none of the engine's own ----------------------------------------------


def test_unexpected_error_is_one_line_exit_2() -> None:
    line, code = cli.unexpected_error(RuntimeError("cannot import\nthe init stage"), [])
    assert code == 2 and "\n" not in line
    assert line.startswith("unexpected RuntimeError: cannot import: ")
    assert line.endswith(cli.UNEXPECTED_FIX)


def test_os_error_on_a_path_the_user_gave_is_bad_input() -> None:
    error = FileExistsError(errno.EEXIST, "File exists", "/tmp/state-file/root")
    line, code = cli.unexpected_error(error, ["/tmp/state-file"])
    assert code == 1 and "/tmp/state-file" in line and "File exists" in line
    line, code = cli.unexpected_error(error, ["/tmp/state"])  # a prefix, not a parent
    assert code == 2 and line.endswith(cli.UNEXPECTED_FIX)


# --- output that goes away -----------------------------------------------------------------


def test_a_closed_pipe_stops_the_run_once_then_goes_quiet() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = open(write_end, "w", buffering=1)  # noqa: SIM115 - closed below
    guard = cli.OutputGuard(stream, cast(TextIO, io.StringIO()))
    try:
        with pytest.raises(cli.OutputLost) as raised:
            guard.stdout.write("first line\n")
        assert raised.value.exit_code == 2
        assert "cannot write to standard output (Broken pipe)" in str(raised.value)
        guard.stdout.write("later lines go nowhere\n")  # no second exception: undo runs
        guard.stdout.flush()
        assert os.readlink(f"/proc/self/fd/{write_end}") == os.devnull
    finally:
        stream.close()


def test_a_dead_terminal_is_never_written_again_and_the_log_gets_the_last_line(
    tmp_path: Path,
) -> None:
    master, slave = pty.openpty()
    out = open(slave, "w", buffering=1)  # noqa: SIM115 - closed below
    err = open(os.dup(slave), "w", buffering=1)  # noqa: SIM115 - closed below
    guard = cli.OutputGuard(out, err)
    guard.log_file = tmp_path / "dboot.log"
    guard.changes = True
    try:
        assert guard.stdout.isatty() and guard.stderr.isatty()
        os.close(master)  # the terminal goes away
        with pytest.raises(cli.OutputLost) as raised:
            guard.stdout.write("==> Copying\n")
        text = str(raised.value)
        assert "Input/output error: the terminal is gone" in text
        assert "undone" in text and str(guard.log_file) in text
        # Both streams were on the dead terminal: neither is written to again.
        assert not guard.stdout.isatty() and not guard.stderr.isatty()
        for fd in (out.fileno(), err.fileno()):
            assert os.readlink(f"/proc/self/fd/{fd}") == os.devnull
        guard.say("dboot: the last line")
        assert guard.log_file.read_text().rstrip().endswith("dboot: the last line")
    finally:
        out.close()
        err.close()
