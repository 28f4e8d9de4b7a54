"""`dboot status`'s words for an install and its last boot report."""

from __future__ import annotations

from typing import Any

from initstage import bootstate
from injector.install.status import describe


def status(up: object) -> dict[str, Any]:
    report = {"time": 0, "booted": "new", "why": "kept", "revert_deadline": None}
    if up is not None:
        report["up"] = up
    return {
        "system": "the installed image (the old system's disk is at /sysroot)",
        "install": {
            "image": "rescue",
            "tree": "/dboot/trees/rescue-1",
            "init": ["/sbin/init"],
            "state": bootstate.KEPT,
            "boots_left": 0,
            "reason": "",
        },
        "last_boot": report,
        "keep_file": False,
    }


def test_the_last_boot_names_its_addresses_and_failed_units() -> None:
    up = {"state": "degraded", "up_after_seconds": 41.6, "addresses": ["ens2 10.0.2.15/24"],
          "failed_units": ["x.service"]}  # fmt: skip
    lines = describe(status(up))
    assert "  came up: degraded after 41.6 s" in lines
    assert "  addresses: ens2 10.0.2.15/24" in lines
    assert "  failed units: x.service" in lines


def test_an_init_other_than_systemd_has_no_failed_units_line() -> None:
    up = {"state": "not systemd", "up_after_seconds": 30, "addresses": [], "failed_units": None}
    lines = describe(status(up))
    assert "  addresses: none" in lines
    assert not any("failed units" in line for line in lines)


def test_a_report_without_the_reporters_half_says_why() -> None:
    assert any("not up yet, or never reported" in line for line in describe(status(None)))
