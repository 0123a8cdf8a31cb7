"""Helpers shared by the tests that drive system tools (systemd, promtool, udev)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

INSTALL_HINT = "run `sudo bash tests/install-tools.sh` to install the test tools"


def require_tool(name: str) -> str:
    """Return the full path of the program *name*, or fail the test.

    A missing tool is a failure, never a skip: CI must not pass by skipping.
    *name* may be a bare command (looked up on PATH) or an absolute path.
    """
    if os.path.isabs(name):
        found = name if os.path.isfile(name) and os.access(name, os.X_OK) else None
    else:
        found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: {INSTALL_HINT}", pytrace=False)
    return found

