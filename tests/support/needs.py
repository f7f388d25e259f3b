"""What a test does when something it needs cannot be had: skip, or fail under CI.

On a developer's machine a missing ``redis-server``, PostgreSQL or Chromium skips the tests
that need it, with a one-line reason that says what to install. Under CI (``CI`` set in the
environment) `.ci/run` provides all of them, so a missing one is a failure: a run that
silently skipped the ledger tests must not pass.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

REDIS_SERVER_HINT = (
    "redis-server not found: apt-get install redis-server (or set CREDITGATE_TEST_REDIS_URL)"
)


def under_ci() -> bool:
    """True when the run is CI's (``CI`` set to anything but empty)."""
    return bool(os.environ.get("CI"))


def unavailable(reason: str) -> NoReturn:
    """Skip the current test (or, called while a module is imported, the whole module)
    because of ``reason``; under CI fail it instead."""
    if under_ci():
        pytest.fail(f"{reason} [CI is set: a missing service fails the run]", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def redis_server_binary(hint: str = REDIS_SERVER_HINT) -> str:
    """The path of ``redis-server`` on the PATH, or skip/fail with ``hint``."""
    path = shutil.which("redis-server")
    if path is None:
        unavailable(hint)
    return path
