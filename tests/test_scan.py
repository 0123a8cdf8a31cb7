"""Finding meters: the primary scan, the secondary search, baud-rate detection and the
collisions of a bus with several meters, in simulated time (fast and exact).

Through a paced pty the same is in test_sim_paths.py (slow)."""

from __future__ import annotations

import io
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_textfile import parse_prom, series
from tools import SimTime, invoke

import kamstrup_mbus as mbus
import kamstrup_sim as sim
import kamstrup_textfile as kt


@pytest.fixture
def fake_bus_in_time(monkeypatch):
    """Meters on an in-process bus behind open_port, in simulated time (kt.time too)."""
    meters: list = []
    clock = sim.SimClock()
    monkeypatch.setattr(kt, "time", SimTime(clock))
    monkeypatch.setattr(mbus, "time", SimTime(clock))
    buses: list = []  # one bus, made at the first open (the test adds its meters first)

    def open_port(url, baudrate, wait=10.0):
        if not buses:
            buses.append(sim.SimulatedBus(meters))
        return sim.FakePort(buses[0], timeout=mbus.READ_SLICE, clock=clock, baudrate=baudrate)

    monkeypatch.setattr(kt, "open_port", open_port)
    return meters


def make_bus(meters, baudrate=2400, timeout=0.0, retries=2):
    clock = sim.SimClock()
    port = sim.FakePort(sim.SimulatedBus(meters), timeout=mbus.READ_SLICE, clock=clock,
                        baudrate=baudrate)  # fmt: skip
    bus = kt.Bus(port, baudrate=baudrate, timeout=timeout, retries=retries)
    bus.clock = clock
    return bus, port, clock


def floor(baudrate: int, found_reads: float = 0.0) -> float:
    """EN 13757-2's floor for a scan of 0-250: each probe's wire time and window."""
    probe = mbus.wire_seconds(5, baudrate) + mbus.slowest_answer(baudrate)
    return 251 * probe + found_reads


def read_time(meter, baudrate) -> float:
    """What confirming a found meter costs on the wire: a quiet line, REQ_UD2, its answer."""
    answer = len(meter.telegrams()[0])
    return 0.1 + mbus.wire_seconds(5 + answer, baudrate) + meter.delay


# --- the primary scan -----------------------------------------------------------------------


@pytest.mark.parametrize("baudrate", [2400, 9600])
def test_primary_scan_at_the_standards_speed(baudrate):
    meter = sim.Meter(address=133, ident="82937133", kind="303-heat", baudrate=baudrate)
    bus, port, clock = make_bus([meter], baudrate)
    notes = []
    found = kt.scan_primary(bus, note=notes.append)
    assert [(f.telegram.address, f.telegram.id, f.baudrate) for f in found] == [
        (133, "82937133", baudrate)
    ]
    assert notes == []
    probed = [frame[2] for _, frame in port.sent if frame[:2] == b"\x10\x40"]
    assert probed == [254, *range(251)]  # one to wake a sleepy meter first
    wake = mbus.wire_seconds(6, baudrate) + meter.delay + 0.1  # its E5, then a quiet line
    least = floor(baudrate, read_time(meter, baudrate)) + wake
    # what the algorithm costs beyond the floor: the answer's first byte (11 bits) per
    # probe, a quiet line after the found meter's frame (a second meter at its address
    # that answers later), and at the end a listen for late answers to the last probes
    # (the last wait before each deadline is a select(), so no read overshoots it)
    extra = 251 * mbus.wire_seconds(1, baudrate) + 0.1 + mbus.LATE_WINDOW + 1e-6
    assert least <= clock.now <= least + extra
    assert clock.now <= 1.10 * least


def test_a_late_meter_is_found_and_never_credited_to_a_later_address():
    """A meter that answers 250 ms after a 9600-baud probe (window 84 ms): its E5 lands in
    a later probe's window; that address is not listed, the late one is, with advice."""
    late = sim.Meter(address=60, ident="11111111", delay=0.25, baudrate=9600)
    bus, _, _ = make_bus([late], 9600)
    notes = []
    found = kt.scan_primary(bus, note=notes.append)
    assert [(f.telegram.address, f.telegram.id) for f in found] == [(60, "11111111")]
    assert notes == [
        "address 60 answered 0.25 s after the request, after the 0.0844 s window: try --timeout 0.4"
    ]


@settings(max_examples=40, deadline=None)
@given(
    address=st.integers(1, 250),
    delay=st.floats(0.09, 0.9),
    baudrate=st.sampled_from([2400, 9600]),
)
def test_no_phantom_whatever_the_lateness(address, delay, baudrate):
    late = sim.Meter(address=address, ident="11111111", delay=delay, baudrate=baudrate)
    bus, _, _ = make_bus([late], baudrate)
    found = kt.scan_primary(bus, note=lambda text: None)
    # found where it is (within the re-probe's 1 s), never at another address
    assert [f.telegram.address for f in found] in ([address], [])
    if delay + mbus.wire_seconds(6, baudrate) < mbus.LATE_WINDOW:
        assert [f.telegram.address for f in found] == [address]


@settings(max_examples=40, deadline=None)
@given(late_by=st.floats(0.002, 0.7), baudrate=st.sampled_from([2400, 9600, 38400]))
def test_a_meter_late_once_is_found_and_not_said_lost(late_by, baudrate):
    """A meter on time but for the answer to its own probe (a busy gateway, a scheduling
    hiccup of the simulator's thread in CI): the re-probe finds it, in time; it may have
    sent the late E5, so nothing is "lost" (a false LOST failed the scan with exit 1),
    and a note that does not fail the scan says it answered only when asked again."""
    once = mbus.slowest_answer(baudrate) + late_by  # after the window
    # the first answer is to the wake-up at 254, the second to the probe of 48
    meter = sim.Meter(address=48, delay=0.05, delays=[0.05, once])
    bus, _, _ = make_bus([meter, sim.Meter(address=133, ident="82937133")], baudrate)
    notes = []
    found = kt.scan_primary(bus, note=notes.append)
    assert [f.telegram.address for f in found] == [48, 133]
    assert notes == [f"address 48 {mbus.ASKED_AGAIN}"]  # not failing (not in FAILING)


def test_a_meter_that_missed_its_probe_does_not_hide_a_lost_one():
    """47 answers its probe 0.6 s late and never again in time for a re-probe; 48 missed
    the wake-up and its own probe (a dropped request) and answers the re-probe in time.
    48 may have sent the late E5 or not: the scan cannot tell, so it says so (not a
    failure) rather than nothing at all (a lost meter missing in silence, exit 0)."""
    late = sim.Meter(address=47, ident="47474747", delay=500.0, delays=[0.05, 0.6])
    missed = sim.Meter(address=48, ident="48484848", fail_first=2)
    bus, _, _ = make_bus([late, missed], 2400)
    notes = []
    found = kt.scan_primary(bus, note=notes.append)
    assert [f.telegram.address for f in found] == [48]
    assert notes == [f"address 48 {mbus.ASKED_AGAIN}"]
    assert mbus.ASKED_AGAIN not in kt.FAILING


def test_a_collision_at_a_primary_address_is_reported_never_listed():
    meters = [
        sim.Meter(address=200, ident="22222222"),
        sim.Meter(address=200, ident="22222223", kind="403"),
        sim.Meter(address=48),
    ]
    bus, _, _ = make_bus(meters)
    notes = []
    found = kt.scan_primary(bus, note=notes.append)
    assert [f.telegram.address for f in found] == [48]
    assert notes == [f"address 200: {mbus.COLLISION}"]


def test_the_scan_cli_lines_and_settings(fake_bus_in_time):
    fake_bus_in_time.extend([sim.Meter(address=48), sim.Meter(address=133, ident="82937133")])
    result = invoke(["--scan"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        "address 48  id 30303030  manufacturer KAM  version 64  medium heat/cooling  baudrate 2400",
        "address 133  id 82937133  manufacturer KAM  version 64  medium heat/cooling  "
        "baudrate 2400",
        'KAMSTRUP_ADDRESS="48 133"',
        "KAMSTRUP_BAUDRATE=2400",
    ]


def test_progress_is_a_line_every_ten_seconds_off_a_terminal(fake_bus_in_time):
    fake_bus_in_time.append(sim.Meter(address=48))
    result = invoke(["--scan"])
    lines = result.stderr.splitlines()
    # 53 s of scan at 2400 baud: a line at 10, 20, 30, 40 and 50 s
    assert len(lines) == 5, result.stderr
    assert lines[0].startswith("scanned ") and lines[0].endswith(
        " of 251 addresses, 0 meters found"
    )
    assert lines[-1].endswith(" of 251 addresses, 1 meter found")
    numbers = [int(line.split()[1]) for line in lines]
    assert numbers == sorted(numbers) and 40 <= numbers[0] <= 52


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_is_a_bar_or_a_count_on_one_line(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with kt._Progress("selections", None, "9600 baud") as progress:  # no total known
        progress(5, 1)
        progress(6, 2)
    assert terminal.getvalue() == (
        "\rSearching at 9600 baud: 5 selections, 1 meter found"
        "\rSearching at 9600 baud: 6 selections, 2 meters found\n"
    )
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with kt._Progress("addresses", 251, "") as progress:
        assert progress.bar is not None
        progress.bar.short_limit = 0  # click 7 draws no bar that is done in 0.5 s
        progress(251, 0)
    assert "Scanning" in terminal.getvalue() and "100%" in terminal.getvalue()


def test_nothing_on_the_bus(fake_bus_in_time):
    result = invoke(["--scan"])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        "kamstrup-textfile: no meter answered on addresses 0-250"
    )
    assert result.stdout == ""


# --- baud rates ---------------------------------------------------------------------------


def test_rates_in_use_finds_the_rate_a_meter_hears():
    bus, port, _ = make_bus([sim.Meter(address=133, baudrate=9600)])
    assert kt.rates_in_use(bus, kt.AUTO_RATES) == [9600]
    sent_at = [port_rate for port_rate in (2400, 9600, 300)]
    assert sent_at == list(kt.AUTO_RATES)


@pytest.mark.parametrize("baudrate, delay", [(2400, 0.2), (2400, 0.25), (2400, 0.9),
                                             (9600, 0.5), (9600, 0.9)])  # fmt: skip
def test_a_meter_that_answers_the_wake_up_late_makes_its_rate_in_use(baudrate, delay):
    """Its E5s come while the wake-up waits for a quiet line or listens: they count."""
    bus, _, _ = make_bus([sim.Meter(address=48, delay=delay, baudrate=baudrate)])
    assert kt.rates_in_use(bus, kt.AUTO_RATES) == [baudrate]


def test_a_late_answer_at_one_rate_is_not_taken_for_the_next_rates():
    """A meter 250 ms late at 9600: its E5 must not land in the 300-baud wake-up (a
    five-minute scan at 300 baud for nothing)."""
    meters = [sim.Meter(address=133, baudrate=9600), sim.Meter(address=60, baudrate=9600,
                                                             delay=0.25)]  # fmt: skip
    bus, _, _ = make_bus(meters)
    assert kt.rates_in_use(bus, kt.AUTO_RATES) == [9600]


def test_rates_in_use_counts_a_garbled_answer():
    """Two meters at 254 out of step: no clean E5, but something is there."""
    meters = [sim.Meter(address=1, delay=0.05), sim.Meter(address=2, delay=0.0520)]
    bus, _, _ = make_bus(meters)
    assert bus.probe(254) == "garbled"
    assert kt.rates_in_use(bus, [2400]) == [2400]


def test_scan_auto_scans_only_where_something_answered(fake_bus_in_time):
    fake_bus_in_time.append(sim.Meter(address=133, ident="82937133", baudrate=9600))
    result = invoke(["--scan", "--baudrate", "auto", "-v"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ['KAMSTRUP_ADDRESS="133"', "KAMSTRUP_BAUDRATE=9600"]
    assert "baudrate 9600" in result.stdout.splitlines()[0]
    probes = [line for line in result.stderr.splitlines() if line.startswith("> 10 40")]
    to_254 = [line for line in probes if line == "> 10 40 FE 3E 16"]
    # 254 at each rate (three tries where nobody answers), a wake-up, then one scan
    assert len(to_254) == 3 + 1 + 3 + 1
    assert len(probes) - len(to_254) == 251


def test_once_auto_reads_each_meter_at_its_rate(fake_bus_in_time, tmp_path):
    fake_bus_in_time.extend(
        [sim.Meter(address=48, baudrate=2400), sim.Meter(address=133, ident="82937133",
                                                         baudrate=9600)]
    )  # fmt: skip
    out = tmp_path / "k.prom"
    result = invoke(["--once", "--baudrate", "auto", "--address", "48", "--address", "133",
                     "--output", str(out), "-v"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "address 48: answered at 2400 baud" in result.stderr
    assert "address 133: answered at 9600 baud" in result.stderr
    families = parse_prom(out.read_text())
    assert len(series(families, "kamstrup_energy_joules_total")) == 2


def test_once_auto_with_no_meter_says_which_rates(fake_bus_in_time, tmp_path):
    out = tmp_path / "k.prom"
    result = invoke(["--once", "--baudrate", "auto", "--address", "48", "--output", str(out)])
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("kamstrup-textfile: address 48: no answer at 2400, 9600, 300 baud: ")


# --- the secondary search -----------------------------------------------------------------

THREE = ("82937133", "82937134", "71234567")  # two of them one digit apart


def three_on_one_address(baudrate=9600):
    return [sim.Meter(address=0, ident=ident, baudrate=baudrate) for ident in THREE]


def test_secondary_search_finds_three_meters_on_one_primary_address():
    meters = three_on_one_address()
    bus, port, clock = make_bus(meters, 9600)
    notes = []
    found, probes = kt.scan_secondary(bus, note=notes.append)
    assert sorted(f.telegram.id for f in found) == sorted(THREE)
    assert notes == []
    # all F, then a digit at each of the 8 places under 8293713, and the first digits
    assert probes == 1 + 10 * 8
    assert clock.now <= 30.0  # the target for three such meters at 9600 baud
    assert not any(m.selected for m in meters)  # deselected at the end
    assert port.sent[-1][1] == bytes.fromhex("10 40 FD 3D 16")


def test_secondary_search_with_one_meter_is_one_selection():
    bus, _, _ = make_bus([sim.Meter(address=48)])
    found, probes = kt.scan_secondary(bus)
    assert [f.telegram.id for f in found] == ["30303030"]
    assert probes == 1


@settings(max_examples=40, deadline=None)
@given(
    ids=st.lists(
        st.from_regex(r"[0-9]{8}", fullmatch=True), min_size=1, max_size=5, unique=True
    ),  # fmt: skip
    addresses=st.lists(st.integers(0, 3), min_size=5, max_size=5),
)
def test_secondary_search_finds_any_set_of_distinct_ids(ids, addresses):
    meters = [sim.Meter(address=a, ident=i) for i, a in zip(ids, addresses)]
    bus, _, _ = make_bus(meters, 9600)
    found, _ = kt.scan_secondary(bus)
    assert sorted(f.telegram.id for f in found) == sorted(ids)


def test_scan_secondary_cli_gives_secondary_addresses(fake_bus_in_time):
    fake_bus_in_time.extend(three_on_one_address(baudrate=None))
    result = invoke(["--scan-secondary", "--baudrate", "9600"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-2] == 'KAMSTRUP_ADDRESS="71234567 82937133 82937134"'
    assert lines[0] == (
        "address 0  id 71234567  manufacturer KAM  version 64  medium heat/cooling  baudrate 9600"
    )


# --- several meters at 254 ----------------------------------------------------------------


def test_several_meters_at_254_is_a_failed_read_that_says_so(fake_bus_in_time, tmp_path):
    fake_bus_in_time.extend([sim.Meter(address=48), sim.Meter(address=74, ident="77447744",
                                                               kind="403")])  # fmt: skip
    out = tmp_path / "k.prom"
    result = invoke(["--once", "--output", str(out)])
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(
        "kamstrup-textfile: address 254: several meters answered at 254: give each its "
        "--address, see --scan"
    )
    text = out.read_text()
    assert 'kamstrup_up{address="254",bus="k"} 0\n' in text
    assert "kamstrup_energy_joules_total" not in text


def test_a_secondary_read_deselects_the_meter(fake_bus_in_time, tmp_path):
    meter = sim.Meter(address=48)
    fake_bus_in_time.append(meter)
    result = invoke(["--once", "--address", "30303030", "--output", str(tmp_path / "k.prom")])
    assert result.exit_code == 0, result.stderr
    assert meter.selected is False
    assert meter.requests[-1] == bytes.fromhex("10 40 FD 3D 16")


# --- the simulator's side of it -----------------------------------------------------------


def test_answers_in_step_and_out_of_step():
    assert sim._smear([(0.05, b"\xe5", False), (0.05, b"\xe5", False)], 11 / 2400) == [
        (0.05, b"\xe5", False)
    ]
    out = sim._smear([(0.05, b"\xe5", False), (0.0515, b"\xe5", False)], 11 / 2400)
    assert [data for _, data, _ in out] != [b"\xe5"]  # garbage
    apart = sim._smear([(0.05, b"\xe5", False), (0.09, b"\xe5", False)], 11 / 2400)
    assert [data for _, data, _ in apart] == [b"\xe5", b"\xe5"]  # two bytes, one after the other


def test_a_meter_at_another_rate_hears_garbage_and_stays_silent():
    meter = sim.Meter(address=48, baudrate=9600)
    bus = sim.SimulatedBus([meter])
    assert bus.feed(bytes.fromhex("10 40 30 70 16"), rate=2400) == []
    assert bus.feed(bytes.fromhex("10 40 30 70 16"), rate=9600) == [(0.05, b"\xe5", False)]


def test_answers_to_different_requests_overlap_on_the_line():
    """A late answer to one request and a prompt one to the next meet on the wire: where
    their bytes overlap both are framing errors (00); nothing waits for a free line."""
    late, prompt = sim.Meter(address=1, delay=0.3), sim.Meter(address=2)
    bus, port, clock = make_bus([late, prompt], baudrate=2400)
    port.write(mbus.snd_nke(1))
    clock.now += 0.252
    port.write(mbus.snd_nke(2))  # its E5 comes 2 ms before the late one's has ended
    clock.now += 1.0
    assert port.read(10) == b"\x00\x00"


def test_flush_waits_until_the_request_has_left_as_tcdrain_does():
    bus, port, clock = make_bus([], baudrate=2400)
    port.write(bytes(10))
    port.flush()
    assert clock.now == pytest.approx(10 * 11 / 2400)


RATES = st.sampled_from([300, 600, 1200, 2400, 4800, 9600, 19200, 38400])


@settings(deadline=None)
@given(st.binary(min_size=1, max_size=40), RATES)
def test_a_uart_at_the_senders_rate_reads_what_was_sent(data, rate):
    """The UART model samples the line; at the sender's rate that gives the bytes back,
    each at the end of its 11 bits."""
    read = sim.uart_receive(data, rate, rate)
    assert bytes(b for _, b in read) == data
    assert [t for t, _ in read] == pytest.approx([(i + 1) * 11 / rate for i in range(len(data))])


@settings(deadline=None)
@given(st.binary(min_size=1, max_size=40), RATES, RATES)
def test_a_uart_at_another_rate_reads_no_more_bytes_than_start_bits_it_saw(data, sent, rate):
    read = sim.uart_receive(data, sent, rate)
    levels = "".join("0" + f"{b:08b}"[::-1] + str(bin(b).count("1") & 1) + "1" for b in data)
    assert len(read) <= ("1" + levels).count("10")  # every byte read begins at an edge
    assert all(0 < t <= len(levels) / sent + 11 / rate for t, _ in read)
    if sent >= 32 * rate and len(data) == 1:
        assert read == []  # one byte far too fast: over before the start bit's middle


def test_a_late_answer_read_after_the_master_changed_its_rate_is_garbage():
    """An E5 at 2400 still on its way when the master goes to 9600 is read as the 9600
    UART reads it (bytes of garbage); at the old rate it is an E5."""
    for rate, expected in ((2400, b"\xe5"), (9600, None)):
        bus, port, clock = make_bus([sim.Meter(address=48, delay=0.25)], baudrate=2400)
        port.write(mbus.snd_nke(48))
        clock.now += 0.1  # the E5 comes at 0.27 s
        port.baudrate = rate
        clock.now += 1.0
        got = port.read(10)
        if expected is not None:
            assert got == expected
        else:
            assert got and b"\xe5" not in got


def test_a_late_answer_at_one_rate_is_not_garbage_at_the_next():
    """Two meters at 2400, one a little late (200 ms): its E5 comes after the line was
    quiet for 0.1 s, during the wake-up at 9600, read at that rate as garbage, which
    must not make 9600 a rate in use (a needless scan at 9600)."""
    meters = [sim.Meter(address=133, baudrate=2400),
              sim.Meter(address=60, delay=0.2, baudrate=2400)]  # fmt: skip
    bus, _, _ = make_bus(meters)
    assert kt.rates_in_use(bus, kt.AUTO_RATES) == [2400]


@pytest.mark.parametrize("c", [0x53, 0x73])
def test_selection_with_either_fcb(c):
    meter = sim.Meter(address=48, ident="30303030")
    bus = sim.SimulatedBus([meter])
    frame = bytearray(mbus.select_secondary("30303030"))
    frame[4] = c
    frame[-2] = sum(frame[4:-2]) & 0xFF
    assert bus.feed(bytes(frame)) == [(0.05, b"\xe5", False)]
    assert meter.selected


def test_wildcards_manufacturer_version_and_medium():
    meter = sim.Meter(address=48, ident="30303030")  # KAM, version 0x40, medium 0x0D
    assert meter.matches(bytes.fromhex("30 30 30 30 FF FF FF FF"))
    assert meter.matches(bytes.fromhex("FF FF 30 30 2D 2C 40 0D"))  # 3030FFFF, KAM, 64
    assert not meter.matches(bytes.fromhex("FF FF 30 30 2D 2C 41 FF"))
    assert not meter.matches(bytes.fromhex("FF FF FF FF 01 02 FF FF"))
    assert not meter.matches(bytes.fromhex("31 30 30 30 FF FF FF FF"))


# --- found by a hostile review ------------------------------------------------------------


def scan(meters, baudrate=9600, echo=False, timeout=0.0, retries=2):
    clock = sim.SimClock()
    port = sim.FakePort(sim.SimulatedBus(meters, echo=echo), timeout=mbus.READ_SLICE,
                        clock=clock, baudrate=baudrate)  # fmt: skip
    bus = kt.Bus(port, baudrate=baudrate, timeout=timeout, retries=retries)
    bus.clock = clock
    notes: list = []
    found = kt.scan_primary(bus, note=notes.append)
    return [f.telegram.address for f in found], notes, clock.now


@pytest.mark.parametrize("baudrate, delay", [(9600, 0.6), (2400, 0.8), (9600, 0.3)])
def test_every_late_meter_of_a_slow_gateway_is_found(baudrate, delay):
    meters = [sim.Meter(address=a, ident=f"1000{a:04d}", delay=delay) for a in (100, 101, 104)]
    found, notes, _ = scan(meters, baudrate)
    assert found == [100, 101, 104], notes
    assert not any(mbus.COLLISION in n or mbus.LOST in n for n in notes), notes


@settings(max_examples=60, deadline=None)
@given(
    addresses=st.lists(st.integers(0, 250), min_size=1, max_size=3, unique=True),
    delay=st.floats(0.1, 0.9),
    baudrate=st.sampled_from([2400, 9600]),
)
def test_late_meters_are_found_or_said_lost_never_a_false_collision(addresses, delay, baudrate):
    meters = [sim.Meter(address=a, ident=f"1000{a:04d}", delay=delay) for a in addresses]
    found, notes, _ = scan(meters, baudrate)
    assert set(found) <= set(addresses)  # never a phantom
    assert not any(mbus.COLLISION in n for n in notes), notes  # one meter an address
    if set(found) != set(addresses):
        assert any(mbus.LOST in n for n in notes), (found, notes)  # never missed in silence


def test_a_sleepy_meter_is_woken_before_the_scan():
    found, notes, _ = scan([sim.Meter(address=48, fail_first=1)], 2400)
    assert found == [48], notes


def test_a_meter_that_answers_with_an_application_error_is_no_collision():
    found, notes, _ = scan([sim.Meter(address=48, application_error=1)], 9600)
    assert found == []
    assert notes == [
        "address 48 answered SND_NKE, but not REQ_UD2: meter reports an application "
        "error: unimplemented CI field"
    ]


def test_a_scan_with_a_meter_that_answers_wrongly_fails(fake_bus_in_time):
    """Found meters are listed, but the run fails: a meter on the bus cannot be read."""
    fake_bus_in_time += [sim.Meter(address=7, ident="00000007", application_error=1),
                         sim.Meter(address=48, ident="82937133")]  # fmt: skip
    result = invoke(["--scan", "--baudrate", "9600"])
    assert result.stdout.splitlines()[-2:] == ['KAMSTRUP_ADDRESS="48"', "KAMSTRUP_BAUDRATE=9600"]
    assert "address 7 answered SND_NKE, but not REQ_UD2: " in result.stderr
    assert result.exit_code == 1


def test_a_scan_where_only_a_wrong_answering_meter_is_says_none_could_be_read(
    fake_bus_in_time,
):
    fake_bus_in_time.append(sim.Meter(address=7, ident="00000007", application_error=1))
    result = invoke(["--scan", "--baudrate", "9600"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        "kamstrup-textfile: no meter could be read on addresses 0-250"
    )


def test_a_scan_through_an_echoing_adapter_keeps_the_standards_speed():
    _, _, took = scan([sim.Meter(address=48)], 9600, echo=True)
    meter = sim.Meter(address=48)
    least = floor(9600, read_time(meter, 9600))
    assert took <= 1.10 * least


def test_a_stray_byte_of_noise_is_no_late_meter():
    """A lone 00 on the line 30 ms after the probe of address 30 (line noise)."""

    class NoisyLine(sim.FakePort):
        def write(self, data):
            n = super().write(data)
            if data == mbus.snd_nke(30):
                self.incoming.append((self.clock() + 0.03, 0x00))
                self.incoming.sort()
            return n

    clock = sim.SimClock()
    port = NoisyLine(sim.SimulatedBus([sim.Meter(address=48)]), timeout=mbus.READ_SLICE,
                     clock=clock, baudrate=9600)  # fmt: skip
    bus = kt.Bus(port, baudrate=9600, timeout=0.0, retries=2)
    bus.clock = clock
    notes: list = []
    found = kt.scan_primary(bus, note=notes.append)
    assert [f.telegram.address for f in found] == [48]
    assert notes == []


def test_no_advice_on_a_meter_that_answered_in_time():
    meters = [sim.Meter(address=101, ident="10000101", delay=0.325),
              sim.Meter(address=102, ident="10000102")]  # fmt: skip
    found, notes, _ = scan(meters, 9600)
    assert found == [101, 102], notes
    assert [n for n in notes if "answered 0.05 s" in n] == []


@pytest.mark.parametrize("baudrate, delays", [(2400, (0.03, 0.10)), (9600, (0.02, 0.05))])
def test_two_meters_at_one_address_in_time_are_a_collision_and_nothing_else(baudrate, delays):
    """Both answer within the window, one after the other: the second E5 is theirs, no
    late meter to look for (no 1 s re-probes, no "lost" advice)."""
    meters = [sim.Meter(address=100, ident="11111111", delay=delays[0]),
              sim.Meter(address=100, ident="22222222", delay=delays[1], kind="403"),
              sim.Meter(address=48, ident="48484848")]  # fmt: skip
    found, notes, took = scan(meters, baudrate)
    assert found == [48]
    assert notes == [f"address 100: {mbus.COLLISION}"]
    assert took <= 1.10 * floor(baudrate) + 3 * mbus.LATE_WINDOW


@pytest.mark.parametrize("baudrate", [2400, 9600])
def test_two_meters_at_one_address_one_late_are_a_collision_there(baudrate):
    """The late one's answers come after the prompt one's frame: a collision at 100, not a
    meter, and nothing blamed on 101."""
    meters = [sim.Meter(address=100, ident="11111111", kind="403"),
              sim.Meter(address=100, ident="22222222", kind="403", delay=0.3),
              sim.Meter(address=101, ident="10101010")]  # fmt: skip
    found, notes, _ = scan(meters, baudrate)
    assert found == [101]
    assert f"address 100: {mbus.COLLISION}" in notes
    assert not any(n.startswith("address 101") for n in notes), notes


@pytest.mark.parametrize("delay", [0.3, 0.6])
def test_two_late_meters_at_one_address_are_a_collision_not_a_lost_meter(delay):
    meters = [sim.Meter(address=100, ident="11111111", delay=delay),
              sim.Meter(address=100, ident="22222222", delay=delay + 0.02, kind="403"),
              sim.Meter(address=48)]  # fmt: skip
    found, notes, _ = scan(meters, 9600)
    assert found == [48]
    assert notes == [f"address 100: {mbus.COLLISION}"]


def test_secondary_search_with_a_prompt_and_a_late_meter_finds_both():
    meters = [sim.Meter(address=0, ident="11111111"),
              sim.Meter(address=0, ident="22222222", delay=0.3)]  # fmt: skip
    bus, _, _ = make_bus(meters, 9600)
    notes: list = []
    found, _ = kt.scan_secondary(bus, note=notes.append)
    assert sorted(f.telegram.id for f in found) == ["11111111", "22222222"]


@pytest.mark.parametrize("delay", [0.262, 0.266, 0.268, 0.48, 0.695])
def test_a_late_meter_whose_e5_meets_a_neighbours_is_found(delay):
    """The late E5 and the neighbour's prompt one meet on the line (00s): look again."""
    neighbour = 101 + int(delay > 0.4) + int(delay > 0.6)  # 1, 2 or 3 probes later
    meters = [sim.Meter(address=100, ident="14444444", delay=delay),
              sim.Meter(address=neighbour, ident="20000000")]  # fmt: skip
    found, notes, _ = scan(meters, 2400)
    assert found[0] == 100, notes
    assert any(n.startswith("address 100 answered") for n in notes), notes


@pytest.mark.parametrize("address", [100, 248, 250])
def test_a_meter_just_under_a_second_late_is_found(address):
    found, notes, _ = scan([sim.Meter(address=address, delay=0.98)], 9600)
    assert found == [address], notes
    assert mbus.LOST not in notes


def test_scan_auto_with_meters_that_detect_the_rate_lists_each_once(fake_bus_in_time):
    """Meters that answer at every rate are scanned at every rate (another meter may
    be at one of them only) and listed once, at the first."""
    fake_bus_in_time.extend([sim.Meter(address=48), sim.Meter(address=133, ident="82937133")])
    result = invoke(["--scan", "--baudrate", "auto"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-2:] == ['KAMSTRUP_ADDRESS="48 133"', "KAMSTRUP_BAUDRATE=2400"]
    assert len(lines) == 4
    assert "address 133 answered at 2400, 9600 and 300 baud (it detects the rate)" in (
        result.stderr
    )


def test_scan_auto_finds_a_fixed_rate_meter_beside_one_that_detects_the_rate(
    fake_bus_in_time,
):
    fake_bus_in_time.extend([sim.Meter(address=5, ident="00000005"),
                             sim.Meter(address=7, ident="00000007", baudrate=9600)])  # fmt: skip
    result = invoke(["--scan", "--baudrate", "auto"])
    assert result.exit_code == 0, result.stderr
    assert [line.split()[1] for line in result.stdout.splitlines()[:-2]] == ["5", "7"]
    assert result.stdout.splitlines()[-2:] == ['KAMSTRUP_ADDRESS="5 7"', "KAMSTRUP_BAUDRATE=auto"]


def test_scan_auto_finds_meters_of_two_rates_at_one_address(fake_bus_in_time):
    fake_bus_in_time.extend([sim.Meter(address=1, ident="00000001", baudrate=2400),
                             sim.Meter(address=1, ident="10000001", baudrate=9600),
                             sim.Meter(address=9, ident="00000009", baudrate=9600)])  # fmt: skip
    result = invoke(["--scan", "--baudrate", "auto"])
    found = [(line.split()[1], line.split()[3], line.split()[-1])
             for line in result.stdout.splitlines()[:-2]]  # fmt: skip
    assert found == [
        ("1", "00000001", "2400"),
        ("1", "10000001", "9600"),
        ("9", "00000009", "9600"),
    ]
    assert result.stdout.splitlines()[-2] == 'KAMSTRUP_ADDRESS="1 9"'
    assert "address 1 is used at 2400 and 9600 baud" in result.stderr
    assert result.exit_code == 1  # --once cannot read both: for the user to fix


def test_scan_auto_through_a_network_gateway_scans_once(fake_bus_in_time):
    """socket://: the gateway talks to the meters at its own rate; ours goes nowhere."""
    fake_bus_in_time.extend([sim.Meter(address=48), sim.Meter(address=133, ident="82937133")])
    result = invoke(["--scan", "--baudrate", "auto", "--port", "socket://192.0.2.10:10001",
                     "-v"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == [
        'KAMSTRUP_ADDRESS="48 133"',
        "KAMSTRUP_BAUDRATE=2400",
    ]
    assert "a network gateway (socket://) talks to the meters at its own rate" in result.stderr
    probes = [line for line in result.stderr.splitlines() if line.startswith("> 10 40")]
    assert len(probes) == 1 + 251  # the wake-up and one scan


def test_scan_secondary_auto_through_a_gateway_lists_each_meter_once(fake_bus_in_time):
    fake_bus_in_time.extend(three_on_one_address(baudrate=None))
    result = invoke(["--scan-secondary", "--baudrate", "auto"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[-2] == 'KAMSTRUP_ADDRESS="71234567 82937133 82937134"'
    assert len(result.stdout.splitlines()) == 5


def test_secondary_search_with_a_late_meter_says_so_and_finds_it():
    meters = [sim.Meter(address=0, ident="82937133"),
              sim.Meter(address=0, ident="82937134", delay=0.3),
              sim.Meter(address=0, ident="71234567")]  # fmt: skip
    bus, _, _ = make_bus(meters, 9600)
    notes = []
    found, _ = kt.scan_secondary(bus, note=notes.append)
    assert sorted(f.telegram.id for f in found) == ["71234567", "82937133", "82937134"]
    assert any("searching with --timeout 0.5" in n for n in notes), notes


def test_a_meter_without_an_id_does_not_break_the_scan_output(fake_bus_in_time):
    class Headerless(sim.Meter):
        def telegrams(self):  # CI 0x78: no header, so no id, manufacturer, version, medium
            records = bytes.fromhex("04 06 9A 00 00 00")
            return [sim._long(bytes((0x08, self.address, 0x78)) + records)]

    fake_bus_in_time.append(Headerless(address=48))
    for mode in ("--scan", "--scan-secondary"):
        result = invoke([mode])
        assert "Traceback" not in result.stderr
        assert result.stdout.splitlines()[0].startswith("address 48  id -"), result.stdout


def test_meters_found_before_the_adapter_went_away_are_listed(fake_bus_in_time):
    fake_bus_in_time.extend([sim.Meter(address=5, ident="00000005"),
                             sim.Meter(address=200, disconnect_at=20)])  # fmt: skip
    result = invoke(["--scan"])
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0].startswith("address 5  id 00000005")
    assert "port failed while reading" in result.stderr
    # the settings of an unfinished scan would look final in /etc/default/kamstrup
    assert "KAMSTRUP_" not in result.stdout
    assert result.stderr.splitlines()[-1].endswith(kt.UNFINISHED)
