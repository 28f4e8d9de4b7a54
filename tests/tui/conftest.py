"""Run the Pilot tests' coroutines with plain asyncio (no async pytest plugin needed);
the engine tests' image, with decoys and a crowd of other images beside it."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator

import pytest

from tests.images import build_tinybox, crowd_images, decoy_images


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    arguments = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(pyfuncitem.obj(**arguments))
    return True


@pytest.fixture(scope="session")
def tinybox() -> Iterator[str]:
    """The test tinybox (``dboot-test/tinybox:latest``), with images whose names also say
    "tinybox" in the engine beside it while the tests run: a machine's own images must
    never be taken for ours (issue 12); and 30 more, newer and named to sort before and
    after it, so that no test can count on seeing it on the first screen (issue 20)."""
    tag = build_tinybox()
    with decoy_images(), crowd_images():
        yield tag
