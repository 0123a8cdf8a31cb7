"""The optical eye in the collector (issue 17), in-process: a KMP read gives the series an
M-Bus read of the same meter gives, --capture/--decode keep KMP answers, and the command
line says what does not apply.  The same through a pty and TCP: tests/test_kmp_paths.py."""

from __future__ import annotations

import re

import pytest

import kamstrup_kmp as kmp
import kamstrup_sim as sim
import kamstrup_textfile as kt

try:
    from tools import ROOT, invoke
except ImportError:  # tests/ imported as a package
    from tests.tools import ROOT, invoke

HEAT_COOLING = ROOT / "tests" / "data" / "kamstrup" / "multical303_heat_cooling.hex"


@pytest.fixture
def eye(monkeypatch):
    """A simulated MULTICAL 303 behind its optical eye, behind open_port."""
    meter = kmp.SimulatedKmpMeter()
    opened = []

    def open_port(url, baudrate, wait=10.0, line=None, adapter=None):
        opened.append((baudrate, line))
        return sim.FakePort(meter, timeout=0.001, baudrate=baudrate)

    monkeypatch.setattr(kt, "open_port", open_port)
    meter.opened = opened
    return meter


def series(text: str) -> dict:
    """name{labels} -> value of every sample."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = value
    return out


def readings_only(found: dict) -> dict:
    """The meter's readings: the series that do not depend on how it was reached."""
    per_address = ("kamstrup_up", "kamstrup_read_duration", "kamstrup_last_success",
                   "kamstrup_meter_info", "kamstrup_host_clock")  # fmt: skip
    return {k: v for k, v in found.items() if not k.startswith(per_address)}


def test_a_kmp_read_gives_the_series_of_an_m_bus_read(eye):
    done = invoke(["--once", "--protocol", "kmp", "--output", "-"])
    assert done.exit_code == 0, done.stderr
    assert eye.requests == 2, "one read costs the battery two requests"
    assert eye.opened == [(1200, kt.KMP_LINE)]
    live = series(done.stdout)
    decoded = series(invoke(["--decode", str(HEAT_COOLING)]).stdout)
    mbus_only = {  # what the 303's M-Bus module sends beyond the ten registers read
        k for k in readings_only(decoded)
        if not re.match(r"kamstrup_(energy_joules|volume_cubic|on_time|temperature|power_w|"
                        r"volume_flow|info_)", k)
    }  # fmt: skip
    expected = {k: v for k, v in readings_only(decoded).items() if k not in mbus_only}
    assert readings_only(live) == expected
    assert live['kamstrup_up{address="kmp",bus="kamstrup",meter="30303030"}'] == "1"


@pytest.mark.parametrize("unit", ["kWh", "MWh", "GJ"])
def test_energy_in_any_unit_is_the_same_joules(monkeypatch, unit):
    meter = kmp.SimulatedKmpMeter(energy_unit=unit)
    monkeypatch.setattr(kt, "open_port", lambda *a, **k: sim.FakePort(meter, 0.001, None, 1200))
    done = invoke(["--once", "--protocol", "kmp", "--output", "-"])
    assert 'kamstrup_energy_joules_total{meter="30303030"} 554400000\n' in done.stdout


def test_a_kmp_capture_decodes_to_the_live_read(eye, tmp_path):
    capture = tmp_path / "eye.hex"
    live = invoke(["--once", "--protocol", "kmp", "--output", "-", "--capture", str(capture)])
    assert live.exit_code == 0, live.stderr
    text = capture.read_text()
    assert text.count("# ") == 2 and "address kmp baudrate 1200" in text
    decoded = invoke(["--decode", str(capture)])
    assert decoded.exit_code == 0, decoded.stderr
    assert readings_only(series(decoded.stdout)) == readings_only(series(live.stdout))
    twice = tmp_path / "twice.hex"
    twice.write_text(text + text)  # two reads: a register that comes again starts the next
    decoded = invoke(["--decode", str(twice), "--format", "json"])
    assert decoded.stdout.count('"id": "30303030"') == 2


def test_a_silent_eye_is_one_line_and_kamstrup_up_0(monkeypatch):
    meter = kmp.SimulatedKmpMeter(faults=["silent"] * 10)
    monkeypatch.setattr(kt, "open_port", lambda *a, **k: sim.FakePort(meter, 0.001, None, 1200))
    done = invoke(["--once", "--protocol", "kmp", "--output", "-", "--timeout", "0.1"])
    assert done.exit_code == 1
    assert done.stderr.count("\n") == 1 and "address kmp: GetRegister" in done.stderr
    assert 'kamstrup_up{address="kmp",bus="kamstrup"} 0\n' in done.stdout
    assert "kamstrup_energy" not in done.stdout


def test_auto_finds_a_meter_at_2400(monkeypatch):
    meter = kmp.SimulatedKmpMeter(baudrate=2400)
    ports = []

    def open_port(url, baudrate, wait=10.0, line=None, adapter=None):
        ports.append(sim.FakePort(meter, 0.001, None, baudrate))
        return ports[-1]

    monkeypatch.setattr(kt, "open_port", open_port)
    done = invoke(["--once", "--protocol", "kmp", "--baudrate", "auto", "--output", "-", "-v",
                   "--timeout", "0.1"])  # fmt: skip
    assert done.exit_code == 0, done.stderr
    assert "KMP: answered at 2400 baud" in done.stderr


def test_scan_says_serial_type_and_rate(eye):
    done = invoke(["--scan", "--protocol", "kmp"])
    assert done.exit_code == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("optical eye  serial 30303030  type 0x")
    assert lines[0].endswith("baudrate 1200")
    assert lines[1:] == ["KAMSTRUP_PROTOCOL=kmp", "KAMSTRUP_BAUDRATE=1200"]
    assert eye.requests == 2


def test_what_does_not_apply_to_the_eye(eye, tmp_path):
    done = invoke(["--once", "--protocol", "kmp", "--address", "48", "--output", "-"])
    assert done.exit_code == 2 and "--address does not apply to --protocol kmp" in done.stderr
    done = invoke(["--scan-secondary", "--protocol", "kmp"])
    assert done.exit_code == 2
    config = tmp_path / "kamstrup"
    config.write_text('KAMSTRUP_PROTOCOL=kmp\nKAMSTRUP_ADDRESS="48 133"\n')
    done = invoke(["--once", "--config", str(config), "--output", "-"])
    assert done.exit_code == 0, done.stderr
    assert done.stderr.count("\n") == 1
    assert f"KAMSTRUP_ADDRESS in {config} does not apply to KMP" in done.stderr
    assert 'kamstrup_up{address="kmp"' in done.stdout


def test_a_head_unplugged_says_what_the_system_said(monkeypatch):
    """termios.error is no OSError and carries (errno, text): one line, the text."""
    import termios

    class Unplugged(sim.FakePort):
        def read(self, n=1):
            raise termios.error(5, "Input/output error")

    meter = kmp.SimulatedKmpMeter()
    monkeypatch.setattr(kt, "open_port", lambda *a, **k: Unplugged(meter, 0.001, None, 1200))
    done = invoke(["--once", "--protocol", "kmp", "--output", "-"])
    assert done.exit_code == 1
    assert done.stderr.count("\n") == 1
    assert "port failed while reading: Input/output error" in done.stderr
    assert "(5," not in done.stderr
