"""Fault injection: whatever the port raises, at whichever call, a run ends the same way.

A stand-in for pyserial's Serial (what ``serial.serial_for_url`` returns) carries the
run to an in-process simulated bus in simulated time, and counts every call the tool
makes to the port: open, configure, reset, write, flush and each read.  A fault is one
failure at one of those calls:

- what pyserial on Linux raises: SerialException, OSError(EIO), termios.error(EIO)
  (a USB adapter unplugged: tty hang-up), termios.error(EINVAL) (a pty reconfigured),
  SerialTimeoutException (a write that cannot get out);
- reads that return nothing forever (for the meter being read: the line goes dead);
- a read that returns part of what it would have, then the next read raises.

Whatever the point and the failure, the run ends with exit status 1, exactly one line
on stderr and no traceback, the .prom file rewritten with kamstrup_up 0 for the meter
that was being read and none of its readings, the other meters of the run read as if
nothing had happened, and no temporary file left behind.  A fault while the port is
opened (open, configure, and the reset pyserial does in open) fails every meter, with
that one line.
"""

from __future__ import annotations

import errno
import termios
from pathlib import Path

import pytest
import serial
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_textfile import parse_prom, series
from tools import SimTime, invoke

import kamstrup_mbus as mbus
import kamstrup_sim as sim
import kamstrup_textfile as kt

FAILURES = {
    "SerialException": lambda: serial.SerialException(
        "device reports readiness to read but returned no data"
    ),
    "OSError(EIO)": lambda: OSError(errno.EIO, "Input/output error"),
    "termios.error(EIO)": lambda: termios.error(errno.EIO, "Input/output error"),
    "termios.error(EINVAL)": lambda: termios.error(errno.EINVAL, "Invalid argument"),
    "SerialTimeoutException": lambda: serial.SerialTimeoutException("Write timeout"),
}
SILENT = "reads return nothing forever"
PART = "a read returns part, then the next raises"
KINDS = (*FAILURES, SILENT, PART)

OPEN_CALLS = ("open", "configure", "reset")  # pyserial's open(): os.open, tcsetattr, tcflush


class World:
    """The bus, the simulated clock and the fault plan shared by every port the run opens."""

    def __init__(self, meters, fault=None, echo=False):
        self.clock = sim.SimClock(1000.0)
        self.bus = sim.SimulatedBus(meters, echo=echo)
        self.fault = fault  # (call, k, kind): the k-th call of that name fails (0-based)
        self.counts: dict = {}
        self.log: list = []  # (call, index, meter address or None while opening)
        self.opens = 0
        self.target = None  # address of the last request written
        self.dead_for = None  # while this address is being read, reads return nothing
        self.raise_next_read = False

    def call(self, name: str, phase) -> str | None:
        """Count a call; raise or return the special behaviour the plan has for it."""
        index = self.counts.get(name, 0)
        self.counts[name] = index + 1
        self.log.append((name, index, phase))
        if self.fault is None:
            return None
        call, k, kind = self.fault
        if (call, k) != (name, index):
            return None
        if kind in FAILURES:
            raise FAILURES[kind]()
        return kind


class FaultySerial:
    """pyserial's Serial as the tool uses it, each call a point where a fault can strike."""

    def __init__(self, world: World, url: str, **settings):
        self.world = world
        self.settings = settings
        self.port = None
        self.is_open = False

    def open(self) -> None:
        world = self.world
        world.opens += 1
        phase = "open" if world.opens == 1 else "reopen"
        for name in OPEN_CALLS:
            world.call(name, phase)
        self.port = sim.FakePort(world.bus, timeout=mbus.READ_SLICE, clock=world.clock)
        self.is_open = True

    def reset_input_buffer(self) -> None:
        self.world.call("reset", "next")
        self.port.reset_input_buffer()

    def write(self, data: bytes) -> int:
        world = self.world
        address = data[5] if data[0] == 0x68 else data[2]
        if world.dead_for is not None and world.dead_for != address:
            world.dead_for = None  # the tool went on to another meter: the line lives again
        world.target = address
        world.call("write", address)
        return self.port.write(data)

    def flush(self) -> None:
        self.world.call("flush", self.world.target)

    def read(self, n: int = 1) -> bytes:
        world = self.world
        if world.raise_next_read:
            world.raise_next_read = False
            raise serial.SerialException("read failed: [Errno 5] Input/output error")
        special = world.call("read", world.target)
        if special == SILENT:
            world.dead_for = world.target
        if world.dead_for is not None:
            self.port.reset_input_buffer()  # whatever comes is lost
            world.clock.sleep(mbus.READ_SLICE)
            return b""
        data = self.port.read(n)
        if special == PART:
            world.raise_next_read = True
            return data[: len(data) // 2]
        return data

    def close(self) -> None:
        self.is_open = False


METERS = (
    dict(address=48, multi=True),  # a two-telegram answer: every read of both is a point
    dict(address=133, ident="82937133", kind="303-heat"),
)


def run(tmp_path: Path, monkeypatch, fault=None, meters=METERS, echo=False):
    world = World([sim.Meter(**m) for m in meters], fault, echo=echo)
    monkeypatch.setattr(kt, "time", SimTime(world.clock))
    monkeypatch.setattr(mbus, "time", SimTime(world.clock))
    monkeypatch.setattr(serial, "serial_for_url", lambda url, **kw: FaultySerial(world, url, **kw))
    out = tmp_path / "kamstrup.prom"
    out.write_text(OLD)
    args = ["--once", "--port", "/dev/ttyFAULT", "--output", str(out), "--timeout", "0.5"]
    for m in meters:
        args += ["--address", str(m["address"])]
    result = invoke(args)
    return world, result, out


OLD = (
    "# HELP kamstrup_up old\n# TYPE kamstrup_up gauge\n"
    'kamstrup_up{address="48"} 1\nkamstrup_up{address="133"} 1\n'
)


def clean_points(tmp_path, monkeypatch, meters=METERS, echo=False):
    """Every call of a run without faults: (call, index, meter it belongs to, or 'open')."""
    world, result, _ = run(tmp_path, monkeypatch, meters=meters, echo=echo)
    assert result.exit_code == 0, result.stderr
    points = []
    log = world.log
    for i, (name, index, phase) in enumerate(log):
        if phase == "next":  # a reset belongs to the request it prepares
            phase = next(p for n, _, p in log[i:] if n == "write")
        points.append((name, index, phase))
    return points


def check(result, out: Path, tmp_path: Path, failed, meters=METERS) -> None:
    """The invariants of a run with one fault; ``failed`` is the address that must be down
    (or 'open': all of them)."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kamstrup-textfile: ")
    assert "Traceback" not in result.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    text = out.read_text()
    assert text != OLD
    families = parse_prom(text)
    meter_of = {m["address"]: m.get("ident", "30303030") for m in meters}
    for address, meter in meter_of.items():
        down = failed == "open" or failed == address
        up = {"address": str(address), "bus": "kamstrup"}  # OLD knows no meter: a down one has none
        if not down:
            up["meter"] = meter
        assert series(families, "kamstrup_up", address=str(address)) == [(up, "0" if down else "1")]
        readings = [
            labels
            for name, family in families.items()
            for labels, _ in family["samples"]
            if labels.get("meter") == meter
        ]
        if down:
            assert readings == [], (address, readings)
            if failed != "open":
                assert f"address {address}:" in lines[0]
        else:
            assert series(families, "kamstrup_energy_joules_total", meter=meter)
            assert series(families, "kamstrup_meter_info", address=str(address))


@pytest.mark.parametrize("kind", KINDS)
def test_every_point_of_a_run_with_each_failure(kind, tmp_path, monkeypatch):
    points = clean_points(tmp_path, monkeypatch)
    applicable = [
        (name, index, owner)
        for name, index, owner in points
        if (kind not in (SILENT, PART) or name == "read")
    ]
    assert len(applicable) >= 20  # two meters, one of them with a two-telegram answer
    for name, index, owner in applicable:
        for leftover in tmp_path.iterdir():
            leftover.unlink()
        with monkeypatch.context() as m:
            world, result, out = run(tmp_path, m, fault=(name, index, kind))
        check(result, out, tmp_path, owner)


def test_the_harness_covers_every_kind_of_call(tmp_path, monkeypatch):
    points = clean_points(tmp_path, monkeypatch)
    names = {name for name, _, _ in points}
    assert names == {"open", "configure", "reset", "write", "flush", "read"}
    reads = [p for p in points if p[0] == "read"]
    # both telegrams of meter 48 and the answer of 133 are read in several calls each
    assert len([p for p in reads if p[2] == 48]) >= 6
    assert len([p for p in reads if p[2] == 133]) >= 3


meter_st = st.fixed_dictionaries(
    {
        "delay": st.sampled_from([0.0, 0.05, 0.15, 0.18]),
        "multi": st.booleans(),
        "noise": st.sampled_from([b"", b"\x00", b"\xfe\xfd"]),
    }
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(first=meter_st, second=meter_st, echo=st.booleans(), data=st.data())
def test_hypothesis_chooses_the_bus_the_point_and_the_failure(
    first, second, echo, data, tmp_path_factory, monkeypatch
):
    meters = (
        dict(address=48, **first),
        dict(address=133, ident="82937133", kind="303-heat", **second),
    )
    tmp_path = tmp_path_factory.mktemp("fault")
    with monkeypatch.context() as m:
        points = clean_points(tmp_path, m, meters=meters, echo=echo)
    kind = data.draw(st.sampled_from(KINDS), label="failure")
    usable = [p for p in points if kind not in (SILENT, PART) or p[0] == "read"]
    name, index, owner = data.draw(st.sampled_from(usable), label="point")
    for leftover in tmp_path.iterdir():
        leftover.unlink()
    with monkeypatch.context() as m:
        _, result, out = run(tmp_path, m, fault=(name, index, kind), meters=meters, echo=echo)
    check(result, out, tmp_path, owner, meters=meters)
