"""Helpers shared by the tests that drive system tools (systemd, promtool, udev)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
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


def run_simulated_read(
    *args: str, meters=("303:48:71234567", "403:133:67434187"), env=None, timeout=120
) -> subprocess.CompletedProcess:
    """Run `kamstrup_textfile.py --once ARGS` against kamstrup_sim's simulated bus."""
    sim = [sys.executable, str(ROOT / "kamstrup_sim.py")]
    for meter in meters:
        sim += ["--meter", meter]
    cmd = [*sim, "--", sys.executable, str(ROOT / "kamstrup_textfile.py"), "--once", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def up_line(address, value, bus: str = "kamstrup", meter: str | None = None) -> str:
    """The kamstrup_up line a run writes for one address: ``bus`` after ``address``,
    ``meter`` (the serial number) when the meter is known, no constant labels."""
    meter_label = f',meter="{meter}"' if meter is not None else ""
    return f'kamstrup_up{{address="{address}",bus="{bus}"{meter_label}}} {value}\n'


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")


def parse_exposition(text: str) -> list[tuple[str, str, float]]:
    """[(name, '{labels}' or '', value)] of a text exposition, comments dropped."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        samples.append((m.group(1), m.group(2) or "", float(m.group(3))))
    return samples


TOOL = str(ROOT / "kamstrup_textfile.py")


def cli_runner():
    """A click CliRunner with stdout and stderr apart, on click 8.1 (mix_stderr) and 8.2+."""
    from click.testing import CliRunner

    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def invoke(args, **kwargs):
    """Run the click command in-process; exceptions propagate (a traceback fails the test)."""
    import kamstrup_textfile

    return cli_runner().invoke(kamstrup_textfile.cli, args, catch_exceptions=False, **kwargs)


def run_tool(*args, input=None, env=None, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    """Run ``python3 kamstrup_textfile.py ARGS`` as a separate process."""
    return subprocess.run(
        [sys.executable, TOOL, *args],
        input=input,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def shortest_float32_decimal(x: float):
    """The decimal (a Decimal) with the fewest significant digits that reads back as the
    float32 nearest ``x``: what a meter sending a 32-bit real meant.  Written for the
    tests on their own, with the decimal module, not the way the product does it."""
    import struct
    from decimal import Decimal, localcontext

    (x32,) = struct.unpack("<f", struct.pack("<f", x))
    if x32 == 0:  # Decimal's rounding makes -0 into 0; the value is 0 either way
        return Decimal(0)
    packed = struct.pack("<f", x32)
    for digits in range(1, 10):
        with localcontext() as ctx:
            ctx.prec = digits
            candidate = +Decimal(x32)
        try:
            if struct.pack("<f", float(candidate)) == packed:
                return candidate
        except OverflowError:  # rounded beyond the largest float32
            continue
    raise AssertionError(f"{x!r} is not a float32")


class SimTime:
    """Stands in for the time module (monkeypatch kt.time): monotonic() and sleep() in a
    simulated clock, so a run's deadlines pass without waiting; the rest is real time."""

    def __init__(self, clock):
        self.monotonic = clock
        self.sleep = clock.sleep

    def __getattr__(self, name):
        import time

        return getattr(time, name)
