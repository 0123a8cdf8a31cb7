"""The bus layer against the in-process simulated MULTICAL bus (FakePort, no pacing).

Time is a fake clock that moves only when the port has nothing to read, so
deadlines are measured in requests and slices, never with a wall clock.
"""

from __future__ import annotations

import pytest
import serial
from hypothesis import given, settings
from hypothesis import strategies as st

import kamstrup_mbus as mbus
import kamstrup_sim as sim
import kamstrup_textfile as kt

SND_NKE_FE = bytes.fromhex("10 40 FE 3E 16")
REQ_UD2_FE_FCB1 = bytes.fromhex("10 7B FE 79 16")


def make_bus(meters, *, echo=False, timeout=0.5, retries=2, baudrate=2400, pause=0.0):
    """A Bus on a line in simulated time: answers take their delay and wire time."""
    clock = sim.SimClock()
    port = sim.FakePort(
        sim.SimulatedBus(meters, echo=echo), timeout=mbus.READ_SLICE, clock=clock, baudrate=baudrate
    )
    bus = kt.Bus(port, baudrate=baudrate, timeout=timeout, retries=retries, pause=pause)
    bus.clock = clock
    return bus, port, clock


def window(request_bytes: int, timeout: float, baudrate: int = 2400) -> float:
    """How long after a request is sent its answer may begin: the request and the answer's
    first byte on the wire, plus the timeout (never below the standard's limit)."""
    return mbus.wire_seconds(request_bytes + 1, baudrate) + max(
        timeout, mbus.slowest_answer(baudrate)
    )


def short_frames(written: bytes) -> list:
    """The master's bytes cut into frames (short 10 .. 16 and long 68 L L 68 .. 16)."""
    out, pos = [], 0
    while pos < len(written):
        if written[pos] == 0x10:
            out.append(written[pos : pos + 5])
            pos += 5
        else:
            length = written[pos + 1] + 6
            out.append(written[pos : pos + length])
            pos += length
    return out


def expected_records(kind="303"):
    frame = bytes.fromhex(sim.FRAMES[kind])
    return kt.decode_telegram(frame).records


# --- requests on the wire -----------------------------------------------------


def test_snd_nke_then_req_ud2_with_fcb_set():
    bus, port, _ = make_bus([sim.Meter(address=48)])
    telegram = bus.read(kt.ADDRESS_ANY)
    assert port.written == SND_NKE_FE + REQ_UD2_FE_FCB1
    assert telegram.address == 48
    assert telegram.id == "30303030"


def test_primary_address_frames_and_checksums():
    bus, port, _ = make_bus([sim.Meter(address=48)])
    bus.read(48)
    assert short_frames(port.written) == [
        bytes.fromhex("10 40 30 70 16"),
        bytes.fromhex("10 7B 30 AB 16"),
    ]


def test_single_answer_records_are_the_meter_records():
    bus, _, _ = make_bus([sim.Meter(address=48)])
    telegram = bus.read(48)
    assert telegram.records == expected_records()
    assert telegram.records[0].value == 554400000.0
    assert not telegram.more_records_follow


# --- multi-telegram answers -----------------------------------------------------


def test_multi_telegram_toggles_fcb_and_merges_records():
    meter = sim.Meter(address=48, multi=True)
    bus, port, _ = make_bus([meter])
    telegram = bus.read(48)
    frames = short_frames(port.written)
    assert frames == [
        bytes.fromhex("10 40 30 70 16"),
        bytes.fromhex("10 7B 30 AB 16"),
        bytes.fromhex("10 5B 30 8B 16"),
    ]
    assert [r.dib for r in telegram.records] == [r.dib for r in expected_records()]
    assert telegram.records == expected_records()
    assert all(r.dib != b"\x1f" for r in telegram.records)
    assert not telegram.more_records_follow


def req_ud2_c_fields(meter) -> list:
    return [f[1] for f in meter.requests if f[0] == 0x10 and f[1] & 0xCF == 0x4B]


def test_a_lost_answer_is_asked_for_again_with_the_same_fcb():
    """The second telegram's answer is corrupt once: the retry must keep FCB=0, so the
    meter sends the second telegram again (a toggled FCB would have skipped it)."""
    meter = sim.Meter(address=48, multi=True, corrupt=frozenset({2}))
    bus, _, _ = make_bus([meter], retries=1)
    telegram = bus.read(48)
    assert req_ud2_c_fields(meter) == [0x7B, 0x5B, 0x5B]
    assert telegram.records == expected_records()


def test_the_simulator_honours_the_fcb_as_a_slave_does():
    meter = sim.Meter(address=48, multi=True)
    first, second = meter.telegrams()
    meter.reset_link()
    assert meter.answer(fcb=1) == first
    assert meter.answer(fcb=1) == first  # repeated FCB: the same telegram again
    assert meter.answer(fcb=0) == second  # toggled: the next one
    assert meter.answer(fcb=0) == second
    assert meter.answer(fcb=1) == first  # after the last, it starts over


def test_a_meter_that_ignores_the_fcb_is_a_failed_read_not_sixteen_copies():
    meter = sim.Meter(address=48, ignore_fcb=True, endless=True)
    message = _bus_error(meter, retries=2)
    assert message == (
        "telegram 2 repeats telegram 1 although the FCB was toggled: the meter ignores the FCB"
    )
    assert req_ud2_c_fields(meter) == [0x7B, 0x5B]  # no retry: it answered, wrongly


def test_a_meter_that_never_stops_is_a_failed_read_after_sixteen_telegrams():
    meter = sim.Meter(address=48, multi=True, endless=True)  # halves in turn, each "more"
    message = _bus_error(meter, retries=0)
    assert message == "still 'more records follow' after 16 telegrams: gave up"
    assert req_ud2_c_fields(meter) == [0x7B, 0x5B] * 8
    assert mbus.MAX_TELEGRAMS == 16


# --- retries and corrupt answers ---------------------------------------------------


def quiet_period(bus) -> float:
    """How long the line must stay quiet before a retry (the pause, at least 4 bytes' time)."""
    return max(bus.pause, mbus.wire_seconds(4, bus.baudrate))


def test_retry_after_silence_succeeds():
    meter = sim.Meter(address=48, fail_first=1)
    bus, port, clock = make_bus([meter], timeout=0.5, retries=2)
    telegram = bus.read(48)
    assert telegram.id == "30303030"
    assert short_frames(port.written)[:2] == [bytes.fromhex("10 40 30 70 16")] * 2
    first, retry = port.sent[0][0], port.sent[1][0]
    lost = window(5, 0.5) + quiet_period(bus)  # one window lost, then a quiet line, no more
    assert lost <= retry - first <= lost + 2 * mbus.READ_SLICE


def test_silent_meter_fails_with_no_answer():
    meter = sim.Meter(address=48, silent=True)
    bus, port, _ = make_bus([meter], retries=2)
    try:
        bus.read(48)
    except kt.BusError as exc:
        message = str(exc)
    else:
        raise AssertionError("a silent meter was read")
    assert "no answer" in message
    assert len(meter.requests) == 3  # 1 + retries SND_NKE, no REQ_UD2
    assert all(f == bytes.fromhex("10 40 30 70 16") for f in short_frames(port.written))


def _bus_error(meter, **kwargs) -> str:
    bus, _, _ = make_bus([meter], **kwargs)
    try:
        bus.read(meter.address)
    except kt.BusError as exc:
        return str(exc)
    raise AssertionError("read succeeded")


def test_bad_checksum_fails_after_retries():
    meter = sim.Meter(address=48, bad_checksum=True)
    message = _bus_error(meter, retries=2)
    assert "checksum" in message
    req = [f for f in meter.requests if f[1] & 0xCF == 0x4B]
    assert len(req) == 3


def test_truncated_answer_is_cut_off():
    meter = sim.Meter(address=48, truncate=100)
    message = _bus_error(meter, retries=1)
    assert "cut off" in message
    assert "100 of 142" in message


def test_noise_before_the_frame_is_skipped():
    meter = sim.Meter(address=48, noise=b"\x00\xfd\xfe")
    bus, _, _ = make_bus([meter], retries=0)
    assert bus.read(48).records == expected_records()


def test_echoing_adapter_works():
    bus, port, _ = make_bus([sim.Meter(address=48)], echo=True, retries=0)
    telegram = bus.read(48)
    assert telegram.records == expected_records()
    assert short_frames(port.written) == [
        bytes.fromhex("10 40 30 70 16"),
        bytes.fromhex("10 7B 30 AB 16"),
    ]


def test_echoing_adapter_with_multi_telegram():
    bus, _, _ = make_bus([sim.Meter(address=48, multi=True)], echo=True, retries=0)
    assert bus.read(48).records == expected_records()


class WrongAddressMeter(sim.Meter):
    """Answers requests for its address with a frame that names another address."""

    def telegrams(self):
        frame = bytes.fromhex(sim.FRAMES[self.kind])
        return [sim.rewrite(frame, 99, self.ident)]


def test_answer_from_another_address_is_refused():
    meter = WrongAddressMeter(address=48)
    message = _bus_error(meter, retries=0)
    assert "99" in message and "48" in message


def test_address_254_reads_a_meter_at_133():
    meter = sim.Meter(address=133, ident="82937133", kind="303-heat")
    bus, port, _ = make_bus([meter], retries=0)
    telegram = bus.read(254)
    assert telegram.address == 133
    assert telegram.id == "82937133"
    assert port.written == SND_NKE_FE + REQ_UD2_FE_FCB1


# --- secondary addressing -------------------------------------------------------------


def test_select_frame_bytes():
    frame = mbus.select_secondary("82937133")
    body = bytes.fromhex("53 FD 52 33 71 93 82 FF FF FF FF")
    assert frame == bytes.fromhex("68 0B 0B 68") + body + bytes((sum(body) & 0xFF, 0x16))


def test_secondary_address_selected_with_snd_ud_to_253():
    # The meter is still selected from an earlier run, so it acknowledges the
    # SND_NKE to 253 (see test_found_bugs.py for a bus where nobody is selected).
    meter = sim.Meter(address=48, ident="30303030", selected=True)
    other = sim.Meter(address=49, ident="11111111")
    bus, port, _ = make_bus([meter, other], retries=0)
    telegram = bus.read("30303030")
    assert telegram.id == "30303030"
    frames = short_frames(port.written)
    select = frames[1]
    body = bytes.fromhex("53 FD 52 30 30 30 30 FF FF FF FF")
    assert frames[0] == bytes.fromhex("10 40 FD 3D 16")
    assert select == bytes.fromhex("68 0B 0B 68") + body + bytes((sum(body) & 0xFF, 0x16))
    assert frames[2] == bytes.fromhex("10 7B FD 78 16")
    assert not any(f[1] & 0xCF == 0x4B for f in other.requests)


def test_secondary_address_read_when_no_meter_is_selected_yet():
    """SND_NKE to 253 is answered only by a selected slave: silence there is normal."""
    meter = sim.Meter(address=48, ident="30303030")
    port = sim.FakePort(sim.SimulatedBus([meter]), timeout=0.001)
    bus = kt.Bus(port, timeout=0.05, retries=0, pause=0)
    telegram = bus.read("30303030")
    assert telegram.id == "30303030"
    assert mbus.select_secondary("30303030") in bytes(port.written)


def test_secondary_address_of_another_meter_gets_no_answer():
    meter = sim.Meter(address=48, ident="11111111", selected=True)
    message = _bus_error_secondary(meter, "30303030")
    assert "no answer" in message
    assert "30303030" in message
    assert not any(f[1] & 0xCF == 0x4B for f in meter.requests)


def _bus_error_secondary(meter, secondary) -> str:
    bus, _, _ = make_bus([meter], retries=0)
    try:
        bus.read(secondary)
    except kt.BusError as exc:
        return str(exc)
    raise AssertionError("read succeeded")


# --- several meters ---------------------------------------------------------------------


def test_several_meters_one_missing_costs_only_its_deadlines():
    meters = [
        sim.Meter(address=48),
        sim.Meter(address=133, ident="82937133", kind="303-heat"),
        sim.Meter(address=74, ident="77447744", kind="403"),
    ]
    timeout, retries = 0.5, 2
    bus, port, clock = make_bus(meters, timeout=timeout, retries=retries)
    spent = {}
    read = {}
    for address in (48, 5, 133, 74):
        start = clock.now
        try:
            read[address] = bus.read(address).id
        except kt.BusError as exc:
            read[address] = str(exc)
        spent[address] = clock.now - start
    assert read[48] == "30303030"
    assert read[133] == "82937133"
    assert read[74] == "77447744"
    assert "no answer" in read[5]
    for address, meter in ((48, meters[0]), (133, meters[1]), (74, meters[2])):
        # nothing but the wire: SND_NKE, delay, E5, REQ_UD2, delay, the answer
        answer = len(meter.telegrams()[0])
        wire = 2 * (mbus.wire_seconds(5, 2400) + meter.delay) + mbus.wire_seconds(1 + answer, 2400)
        assert spent[address] == pytest.approx(wire, abs=1e-9)
    floor = (1 + retries) * window(5, timeout) + retries * quiet_period(bus)
    assert floor <= spent[5] <= floor + (1 + 2 * retries) * mbus.READ_SLICE
    to_5 = [f for f in short_frames(port.written) if f[2] == 5]
    assert to_5 == [bytes.fromhex("10 40 05 45 16")] * (1 + retries)


def test_read_meters_reports_each_address(monkeypatch):
    meters = [sim.Meter(address=48), sim.Meter(address=133, ident="82937133", kind="303-heat")]
    port = sim.FakePort(sim.SimulatedBus(meters), timeout=0.001)
    monkeypatch.setattr(kt, "open_port", lambda url, baudrate: port)
    readings = kt.read_meters("fake", [48, 5, 133], baudrate=2400, timeout=0.05, retries=0,
                              log=None)  # fmt: skip
    assert [r.address for r in readings] == [48, 5, 133]
    assert [r.telegram is not None for r in readings] == [True, False, True]
    assert "no answer" in readings[1].error
    assert readings[2].telegram.id == "82937133"
    assert port.closed


# --- the line going away -----------------------------------------------------------------


def test_disconnect_mid_frame_is_a_bus_error():
    meter = sim.Meter(address=48, disconnect_at=30)
    bus, _, _ = make_bus([meter], retries=0)
    try:
        bus.read(48)
    except kt.BusError as exc:
        message = str(exc)
    except serial.SerialException as exc:  # pragma: no cover - the bug this guards against
        raise AssertionError(f"SerialException escaped the bus layer: {exc}") from None
    else:
        raise AssertionError("read succeeded")
    assert "port failed" in message
    assert "\n" not in message


def test_verbose_log_shows_frames():
    lines = []
    meter = sim.Meter(address=48)
    port = sim.FakePort(sim.SimulatedBus([meter]), timeout=0)
    bus = kt.Bus(port, timeout=0.5, retries=0, pause=0, log=lines.append)
    bus.read(48)
    assert lines[0] == "> 10 40 30 70 16"
    assert lines[1] == "< E5"
    assert lines[2] == "> 10 7B 30 AB 16"
    assert lines[3].startswith("< 68 88 88 68 08 30 72")


def test_application_error_is_reported_at_once_not_retried():
    meter = sim.Meter(address=48, application_error=8)
    port = sim.FakePort(sim.SimulatedBus([meter]), timeout=0.001)
    bus = kt.Bus(port, timeout=0.2, retries=2, pause=0)
    with pytest.raises(kt.BusError) as caught:
        bus.read(48)
    assert str(caught.value) == "meter reports an application error: application busy"
    requests = [frame for frame in meter.requests if frame[1] & 0xCF == 0x4B]
    assert len(requests) == 1  # the meter answered: asking again would not help


def test_timeout_is_never_below_the_standards_slowest_answer():
    port = sim.FakePort(sim.SimulatedBus([]), timeout=0.001)
    assert kt.Bus(port, baudrate=2400, timeout=0.05).timeout == 330 / 2400 + 0.05
    assert kt.Bus(port, baudrate=38400, timeout=0.05).timeout == 330 / 38400 + 0.05
    assert kt.Bus(port, baudrate=2400, timeout=1.0).timeout == 1.0


# --- answers near the deadline -------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    baudrate=st.sampled_from([300, 2400, 9600, 38400]),
    lateness=st.floats(0.0, 1.0, exclude_max=True),
    timeout=st.floats(0.05, 0.5),
    multi=st.booleans(),
)
def test_an_answer_that_begins_within_the_standards_limit_is_read_at_once(
    baudrate, lateness, timeout, multi
):
    """A meter may start answering up to 330 bit times + 50 ms after the request (EN
    13757-2), whatever --timeout says; its answer then gets its own wire time."""
    delay = lateness * mbus.slowest_answer(baudrate)
    meter = sim.Meter(address=48, delay=delay, multi=multi)
    bus, _, _ = make_bus([meter], timeout=timeout, retries=2, baudrate=baudrate)
    telegram = bus.read(48)
    assert telegram.records == expected_records()
    assert len(meter.requests) == 3 if multi else 2  # not one retry


def test_the_issues_case_an_answer_at_187_ms_with_timeout_0_1():
    meter = sim.Meter(address=48, delay=0.187)
    bus, _, _ = make_bus([meter], timeout=0.1, retries=0)
    assert bus.read(48).id == "30303030"


def test_a_retry_waits_until_a_late_answer_is_over():
    """The first answer comes after the window: the retry must not go out while it is
    still on the wire, or the answer to the retry comes too late behind it."""
    late = window(5, 0.1) + 0.02
    meter = sim.Meter(address=48, delays=[0.05, late])  # E5 in time, the frame late
    lines = []
    bus, port, _ = make_bus([meter], timeout=0.1, retries=1, pause=0.1)
    bus.log = lines.append
    telegram = bus.read(48)
    assert telegram.records == expected_records()
    assert req_ud2_c_fields(meter) == [0x7B, 0x7B]  # the retry keeps the FCB
    (first, _), (retry, _) = [s for s in port.sent if s[1][1] & 0xCF == 0x4B]
    late_end = first + mbus.wire_seconds(5, 2400) + late + mbus.wire_seconds(142, 2400)
    assert retry >= late_end + quiet_period(bus)
    assert any(line.startswith("late 68 88 88 68") for line in lines)


# --- found by a hostile review ------------------------------------------------------------


class BabblingPort(sim.FakePort):
    """A line that never stops sending ``pattern`` (a stuck adapter, a broken slave)."""

    def __init__(self, pattern: bytes, clock):
        super().__init__(sim.SimulatedBus([]), timeout=mbus.READ_SLICE, clock=clock)
        self.pattern = pattern
        self.sent_bytes = 0

    def read(self, n: int = 1) -> bytes:
        count = max(1, min(n, int(self.timeout / self.byte_time)))
        self.clock.sleep(count * self.byte_time)
        out = bytes(self.pattern[(self.sent_bytes + i) % len(self.pattern)] for i in range(count))
        self.sent_bytes += count
        return out


@pytest.mark.parametrize("pattern", [b"\x10", b"\x68\x30\x30\x68", b"\x00", b"\x10\x40"])
def test_a_babbling_line_cannot_hold_a_read_past_its_deadline(pattern):
    clock = sim.SimClock()
    bus = kt.Bus(BabblingPort(pattern, clock), timeout=1.0, retries=0, pause=0)
    bus.clock = clock
    with pytest.raises(kt.BusError):
        bus.read(48)
    # the request's window and the longest answer's (and an echo's) time, twice (adapters
    # deliver in bursts), and a stall
    most = window(5, 1.0) + 2 * mbus.wire_seconds(mbus.LONGEST_ANSWER + 5, 2400) + mbus.STALL
    assert clock.now <= most + 2 * mbus.READ_SLICE


@pytest.mark.parametrize("delay, noise", [(0.1875, b"\x00"), (0.185, b"\x00\xfe")])
def test_a_stray_byte_before_an_answer_in_time_does_not_cut_it_short(delay, noise):
    meter = sim.Meter(address=48, delay=delay, noise=noise)
    bus, _, _ = make_bus([meter], timeout=0.1, retries=0)
    assert bus.read(48).records == expected_records()


def test_a_meter_that_repeats_its_records_for_ever_is_told_apart_from_one_ignoring_the_fcb():
    meter = sim.Meter(address=48, endless=True)  # honours the FCB, same records each time
    message = _bus_error(meter, retries=0)
    assert message == (
        "telegram 2 repeats the records of telegram 1 and says more records follow again: "
        "the meter would never stop"
    )


class ExoticPort(sim.FakePort):
    def read(self, n=1):
        raise UnboundLocalError("local variable 'buf' referenced before assignment")


def test_whatever_a_port_raises_is_a_port_error():
    port = ExoticPort(sim.SimulatedBus([sim.Meter(address=48)]))
    bus = kt.Bus(port, timeout=0.2, retries=2, pause=0)
    with pytest.raises(kt.PortError, match="port failed while reading: UnboundLocalError: "):
        bus.read(48)
