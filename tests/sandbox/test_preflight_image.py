"""Preflight with the real image index of the ``tinybox`` engine image (built by
scripts/build-tinybox.sh: busybox-static with relative applet symlinks and a /sbin/init script).
"""

from __future__ import annotations

import pytest

from injector import preflight
from injector.errors import BadInput
from injector.sources import open_source

pytestmark = [pytest.mark.root, pytest.mark.engine]


def test_tinybox_init_checks_and_report() -> None:
    with open_source("tinybox") as source:
        index = source.scan()
    # /bin/sh is a relative symlink to busybox: resolved inside the image, not on the host.
    for argv in (["/sbin/init"], ["/bin/sh", "-c", "echo hi"]):
        preflight.validate_init(index, argv)
    with pytest.raises(BadInput, match="init /sbin/no-such-init does not exist in the image"):
        preflight.validate_init(index, ["/sbin/no-such-init"])
    with pytest.raises(BadInput, match="is not an executable file"):
        preflight.validate_init(index, ["/etc"])

    report = preflight.gather(index, ["/sbin/init"])
    assert report.ram.estimated_bytes == index.estimated_bytes > 0
    assert not report.session.image_has_ssh  # busybox has no sshd applet linked
    assert "init-invalid" not in [notice.code for notice in report.notices]
    assert "ram-does-not-fit" not in [notice.code for notice in report.notices]
