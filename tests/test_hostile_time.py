"""A host clock that is wrong (a board without a real-time clock before NTP: 1970; a
clock set ahead), and a run ended by SIGHUP (a closed SSH session).

The clock is injected in-process (time.time) and set for a real run with faketime.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import kamstrup_sim as sim
import kamstrup_textfile as k

try:
    from tools import TOOL, parse_exposition
except ImportError:  # pragma: no cover - when run as a package
    from tests.tools import TOOL, parse_exposition


def samples(text: str, name: str) -> dict:
    """{labels: value} of one family."""
    return {labels: value for n, labels, value in parse_exposition(text) if n == name}


# --- SIGHUP -----------------------------------------------------------------------------


def test_sighup_during_once_ends_the_run_as_sigterm_does(tmp_path):
    meters = [sim.Meter(address=48), sim.Meter(address=74, ident="77447744", kind="403",
                                               delay=1.0)]  # fmt: skip
    line = sim.PtyLine(sim.SimulatedBus(meters), pace=False)
    prom = tmp_path / "kamstrup.prom"
    prom.write_text('kamstrup_up{address="48"} 1\n')
    try:
        proc = subprocess.Popen(
            [sys.executable, TOOL, "--once", "--port", line.path, "--timeout", "5"]
            + ["--address", "48", "--address", "74", "--output", str(prom)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(500):  # until the slow meter has its request (bounded: 5 s)
            if meters[1].requests or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert meters[1].requests, "the run never reached the slow meter"
        proc.send_signal(signal.SIGHUP)
        _, stderr = proc.communicate(timeout=30)
    finally:
        line.close()
    assert proc.returncode == 128 + signal.SIGHUP
    assert stderr.splitlines() == ["kamstrup_textfile.py: address 74: not read: stopped by SIGHUP"]
    text = prom.read_text()
    assert samples(text, "kamstrup_up") == {'{address="48"}': 1, '{address="74"}': 0}
    assert [p.name for p in tmp_path.iterdir()] == ["kamstrup.prom"]


def read_out(meter) -> bool:
    """Whether the meter at its own address got a REQ_UD2 (C 0x5B or 0x7B)."""
    return any(r[0] == 0x10 and r[1] & 0xDF == 0x5B and r[2] == 1 for r in meter.requests)


def test_sighup_during_a_scan_lists_what_it_found(tmp_path):
    meters = [sim.Meter(address=1, ident="11111111")]
    line = sim.PtyLine(sim.SimulatedBus(meters), pace=False)
    try:
        proc = subprocess.Popen(
            [sys.executable, TOOL, "--scan", "--port", line.path, "--timeout", "0.5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(1000):  # until the meter is asked for its data (bounded: 10 s)
            if read_out(meters[0]) or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert read_out(meters[0]), "the scan never found the meter"
        time.sleep(1.0)  # on to the next addresses
        proc.send_signal(signal.SIGHUP)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        line.close()
    assert proc.returncode == 128 + signal.SIGHUP, stderr
    assert stdout.splitlines()[0].startswith("address 1  id 11111111")
    assert "KAMSTRUP_ADDRESS" not in stdout
    assert stderr.splitlines()[-1].endswith(f"stopped by SIGHUP; {k.UNFINISHED}")
