"""Makes the module importable from a plain checkout (python3 -m pytest from the top)."""

import os
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
if str(TOP) not in sys.path:
    sys.path.insert(0, str(TOP))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def built_deb(tmp_path_factory):
    """The Debian package, built once per test session (tests/package.py)."""
    from package import build_deb

    return build_deb(tmp_path_factory.mktemp("deb"))


import pytest  # noqa: E402


@pytest.fixture
def fake_bus(monkeypatch):
    """Meters on an in-process bus behind open_port; returns the (mutable) meter list."""
    import kamstrup_sim as sim
    import kamstrup_textfile as kt

    meters: list = []

    def open_port(url, baudrate, wait=10.0):
        return sim.FakePort(sim.SimulatedBus(meters), timeout=0.001)

    monkeypatch.setattr(kt, "open_port", open_port)
    return meters


@pytest.fixture(autouse=True)
def no_settings_file(monkeypatch):
    """No test reads this machine's /etc/default/kamstrup by accident: the settings file
    is none unless a test names one (--config, or KAMSTRUP_CONFIG itself)."""
    monkeypatch.setenv("KAMSTRUP_CONFIG", "")
    for name in [n for n in os.environ if n.startswith("KAMSTRUP_") and n != "KAMSTRUP_CONFIG"]:
        monkeypatch.delenv(name)  # the tests' own settings are TEST_DEB, TEST_ROOTFS_CACHE
