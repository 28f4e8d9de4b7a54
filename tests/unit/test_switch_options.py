"""The switch's options are checked once, up front: before any image is read (issue 12)."""

from __future__ import annotations

import io
import math

import pytest

from app.cli import run_cli
from injector.errors import BadInput
from injector.switch import SwitchOptions


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ({"grace": 601.0}, "grace period 601 s is not between 0 and 600 s"),
        ({"grace": -1.0}, "grace period -1 s is not between 0 and 600 s"),
        ({"grace": math.nan}, "grace period nan s"),
        ({"init_argv": []}, "no init command given"),
        ({"init_argv": ["sbin/init"]}, "init 'sbin/init' is not an absolute path"),
        ({"service_stop": "gentle"}, "--stop=gentle is not a stop mode"),
        ({"stop_timeout": -1.0}, "stop timeout -1 s is not between 0 and 3600 s"),
        ({"stop_timeout": math.inf}, "stop timeout inf s is not between 0 and 3600 s"),
    ],
)
def test_bad_options_are_refused_when_made(given: dict[str, object], words: str) -> None:
    options: dict[str, object] = {"image": "no-such-image", "init_argv": ["/bin/sh"], **given}
    with pytest.raises(BadInput, match=words):
        SwitchOptions(**options)  # type: ignore[arg-type]


def test_the_grace_cap_stops_the_cli_before_the_image_is_opened(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The image does not exist: had dboot got as far as opening it, that would be the error
    # (and as an unprivileged user, the root check before it).
    argv = ["switch", "--dry-run", "--yes", "--grace", "3000", "no-such-image", "/bin/sh"]
    assert run_cli(argv, out=io.StringIO()) == 1
    said = capsys.readouterr().err.strip()
    assert said.startswith("dboot: grace period 3000 s is not between 0 and 600 s"), said
    assert "--grace" in said and "no-such-image" not in said
    assert said.count("\n") == 0


def test_the_defaults_are_valid() -> None:
    options = SwitchOptions("tinybox", ["/sbin/init"])
    assert options.grace == 3.0 and options.source is None
