"""A host clock that is wrong (a board without a real-time clock before NTP: 1970; a
clock set ahead), and a run ended by SIGHUP (a closed SSH session).

The clock is injected in-process (time.time) and set for a real run with faketime.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import kamstrup_sim as sim
import kamstrup_textfile as k

try:
    from test_properties import HEADER, frame
    from test_summer_time import clock_record
    from tools import ROOT, TOOL, parse_exposition, require_tool
except ImportError:  # pragma: no cover - when run as a package
    from tests.test_properties import HEADER, frame
    from tests.test_summer_time import clock_record
    from tests.tools import ROOT, TOOL, parse_exposition, require_tool

RELEASED = dt.datetime.fromisoformat(k.RELEASED).replace(tzinfo=dt.timezone.utc).timestamp()
NOW = RELEASED + 40 * 86400  # a plausible "now" for in-process runs
COPENHAGEN = "CET-1CEST,M3.5.0,M10.5.0/3"


def samples(text: str, name: str) -> dict:
    """{labels: value} of one family."""
    return {labels: value for n, labels, value in parse_exposition(text) if n == name}


def by_address(text: str, name: str) -> dict:
    """{address: value} of one per-address family (of the bus "kamstrup")."""
    out = {}
    for labels, value in samples(text, name).items():
        assert 'bus="kamstrup"' in labels, labels
        out[re.search(r'address="([^"]*)"', labels).group(1)] = value
    return out


def clock_valid(text: str):
    """kamstrup_host_clock_valid's value; it has the bus label and no other."""
    (value,) = samples(text, "kamstrup_host_clock_valid").values()
    assert list(samples(text, "kamstrup_host_clock_valid")) == ['{bus="kamstrup"}']
    return value


def with_clock(moment: float, address: int = 48) -> k.Reading:
    """A reading whose meter's clock (a type F record) says ``moment``, in local time."""
    local = time.localtime(moment)
    record = clock_record(dt.datetime(*local[:5]), summer=bool(local.tm_isdst))
    energy = b"\x04\x06\x9a\x00\x00\x00"
    telegram = k.decode_telegram(frame(0x08, address, 0x72, HEADER + energy + record))
    return k.Reading(address, telegram, duration=0.5)


def without_clock(address: int = 48) -> k.Reading:
    return k.Reading(address, k.decode_telegram(bytes.fromhex(sim.FRAMES["303"])), duration=0.5)


# --- the release date ------------------------------------------------------------------


def test_the_release_date_is_the_newest_changelog_entrys():
    """Before it, the host's clock is wrong: a release bump must move both together."""
    text = (ROOT / "debian" / "changelog").read_text(encoding="utf-8")
    line = next(line for line in text.splitlines() if line.startswith(" -- "))
    stamp = email.utils.parsedate_to_datetime(line.split(">", 1)[1].strip())
    assert k.RELEASED == stamp.astimezone(dt.timezone.utc).date().isoformat()


# --- in-process, with an injected clock -------------------------------------------------


def test_a_plausible_clock_is_valid_and_sets_the_last_success(monkeypatch):
    monkeypatch.setattr(k.time, "time", lambda: NOW)
    assert k.clock_check(NOW, [with_clock(NOW - 120)], k.Previous()) is None
    text = k.exposition([with_clock(NOW - 120)])
    assert clock_valid(text) == 1
    assert by_address(text, "kamstrup_last_success_timestamp_seconds") == {"48": NOW}


def test_a_clock_in_1970_keeps_no_timestamp_from_it(monkeypatch):
    monkeypatch.setattr(k.time, "time", lambda: 0.0)
    previous = k.Previous(last_success={"48": RELEASED + 86400, "74": 1e6, "133": 12.0})
    reason = k.clock_check(0.0, [without_clock()], previous)
    assert reason is not None and "1970-01-01" in reason and "NTP" in reason
    text = k.exposition([without_clock(), k.Reading(74, error="no answer")], (), previous)
    assert clock_valid(text) == 0
    # the kept one from a plausible clock stays; those before the release go
    assert by_address(text, "kamstrup_last_success_timestamp_seconds") == {"48": RELEASED + 86400}
    assert by_address(text, "kamstrup_up") == {"48": 1, "74": 0}
    assert samples(text, "kamstrup_energy_joules_total")  # the reading still goes out


@pytest.mark.parametrize("ahead", [2 * 3600, -2 * 3600], ids=["ahead", "behind"])
def test_a_clock_two_hours_off_the_meters_keeps_no_timestamp_from_it(monkeypatch, ahead):
    meter = NOW
    host = meter + ahead
    monkeypatch.setattr(k.time, "time", lambda: host)
    previous = k.Previous(last_success={"48": meter - 900, "74": meter + 3600})
    reading = with_clock(meter)
    reason = k.clock_check(host, [reading], previous)
    assert reason is not None and "meter" in reason and "NTP" in reason
    text = k.exposition([reading], (), previous, clock=k.host_clock(host, [reading], previous))
    assert clock_valid(text) == 0
    # 48's time from before stays; 74's is ahead of the meter's clock: from a wrong clock
    assert by_address(text, "kamstrup_last_success_timestamp_seconds") == {"48": meter - 900}


def test_one_meter_with_a_wrong_clock_does_not_outvote_the_others(monkeypatch):
    monkeypatch.setattr(k.time, "time", lambda: NOW)
    readings = [with_clock(NOW - 5 * 3600, 48), with_clock(NOW + 60, 74)]
    assert k.clock_check(NOW, readings, k.Previous()) is None


def test_a_meter_that_ignores_summer_time_is_not_a_wrong_host_clock(monkeypatch):
    """Its clock is an hour behind all summer: within the margin."""
    monkeypatch.setattr(k.time, "time", lambda: NOW)
    assert k.clock_check(NOW, [with_clock(NOW - 3600)], k.Previous()) is None


def test_last_success_times_ahead_of_now_mean_a_wrong_clock(monkeypatch):
    """The previous run wrote them: the clock was ahead then, or is behind now."""
    monkeypatch.setattr(k.time, "time", lambda: NOW)
    previous = k.Previous(last_success={"48": NOW + 7200, "74": NOW - 600})
    reason = k.clock_check(NOW, [without_clock()], previous)
    assert reason is not None and "behind now" in reason
    text = k.exposition([without_clock(), k.Reading(74, error="x")], (), previous)
    assert clock_valid(text) == 0
    assert by_address(text, "kamstrup_last_success_timestamp_seconds") == {"74": NOW - 600}


def test_a_meter_that_agrees_with_now_settles_a_previous_file_ahead(monkeypatch):
    """The meter's clock says now is right: the clock was ahead then; its times go."""
    monkeypatch.setattr(k.time, "time", lambda: NOW)
    previous = k.Previous(last_success={"48": NOW + 7200})
    reading = with_clock(NOW)
    assert k.clock_check(NOW, [reading], previous) is None
    text = k.exposition([reading], (), previous)
    assert by_address(text, "kamstrup_last_success_timestamp_seconds") == {"48": NOW}


def test_meter_dates_are_converted_without_reading_the_clock(monkeypatch):
    """The dates a meter sends go through the host's zone, never its current time."""

    def no(*args):
        raise AssertionError("read the host's clock")

    monkeypatch.setattr(k.time, "time", no)
    reading = with_clock(NOW)
    series = [k.record_series(reading.telegram, r) for r in reading.telegram.records]
    assert any(s and s[0] == "clock_timestamp_seconds" for s in series)


# --- a real run under faketime ----------------------------------------------------------


class ClockMeter(sim.Meter):
    """A meter whose answer carries its clock: the real time when it is asked."""

    def telegrams(self) -> list:
        body = HEADER + b"\x04\x06\x9a\x00\x00\x00" + clock_record(self.local(), False)
        return [frame(0x08, self.address, 0x72, body)]

    @staticmethod
    def local() -> dt.datetime:
        return dt.datetime(*time.gmtime()[:5])  # the run is in UTC (TZ=UTC0)


def faketime_run(when: list, tmp_path, previous: str | None):
    """One --once run against a ClockMeter, with faketime's ``when`` (none: the real clock)."""
    clock = [require_tool("faketime"), *when] if when else []
    meters = [ClockMeter(address=48, ident="82937133")]
    line = sim.PtyLine(sim.SimulatedBus(meters), pace=False)
    prom = tmp_path / "kamstrup.prom"
    if previous is not None:
        prom.write_text(previous)
    env = {**os.environ, "TZ": "UTC0", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    try:
        result = subprocess.run(
            [*clock, sys.executable, TOOL, "--once", "--port", line.path]
            + ["--address", "48", "--output", str(prom)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
    finally:
        line.close()
    return result, prom.read_text()


@pytest.mark.parametrize("when", [["1970-01-01 00:00:00"], ["-f", "+2h"]], ids=["1970", "2h-ahead"])
def test_a_real_run_with_a_wrong_clock(tmp_path, when):
    kept = time.time() - 3600
    old = (
        "# TYPE kamstrup_last_success_timestamp_seconds gauge\n"
        f'kamstrup_last_success_timestamp_seconds{{address="48"}} {kept:.3f}\n'
    )
    result, text = faketime_run(when, tmp_path, old)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "clock" in lines[0] and "NTP" in lines[0]
    assert result.returncode == 1
    assert clock_valid(text) == 0
    assert by_address(text, "kamstrup_last_success_timestamp_seconds") == {"48": round(kept, 3)}
    assert by_address(text, "kamstrup_up") == {"48": 1}
    assert samples(text, "kamstrup_energy_joules_total")


def test_a_real_run_with_the_real_clock(tmp_path):
    before = time.time()
    result, text = faketime_run([], tmp_path, None)
    assert result.returncode == 0, result.stderr
    assert clock_valid(text) == 1
    (when,) = by_address(text, "kamstrup_last_success_timestamp_seconds").values()
    assert before <= when <= time.time()


# --- SIGHUP -----------------------------------------------------------------------------


def test_sighup_during_once_leaves_the_previous_file(tmp_path):
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
    # a closed terminal is no fault of the meters: the previous file stays as it was
    assert stderr.splitlines() == [
        f"kamstrup_textfile.py: stopped by SIGHUP: {prom} is left as it was (not read: address 74)"
    ]
    assert prom.read_text() == 'kamstrup_up{address="48"} 1\n'
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
