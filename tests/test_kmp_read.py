"""The KMP reader (kamstrup_kmp section 3) against the simulated meter (section 4), in
process on kamstrup_sim's FakePort in simulated time: every fault of issue 17, what a
read costs the battery, exact values, the same floats as the M-Bus decoder."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kamstrup_kmp as kmp
import kamstrup_sim as sim
import kamstrup_textfile as kt

CORPUS = Path(__file__).resolve().parent / "data" / "kamstrup"


def line(meter, baudrate=kmp.BAUDRATE):
    clock = sim.SimClock()
    return sim.FakePort(meter, clock=clock, baudrate=baudrate), clock


def read(meter, baudrate=kmp.BAUDRATE, **kw):
    port, clock = line(meter, baudrate)
    log: list = []
    try:
        return kmp.read_meter(port, clock=clock, log=log.append, baudrate=baudrate, **kw), log
    except kmp.KmpError as exc:
        exc.log = log
        raise


def test_a_read_costs_two_requests_and_gives_the_303s_values():
    meter = kmp.SimulatedKmpMeter()
    reading, _ = read(meter)
    assert meter.requests == 2 and reading.requests == 2
    assert reading.serial == "30303030"
    assert reading.info_code == 0
    assert reading.values == {
        "energy": 154 * 3_600_000.0,
        "volume": 39.49,
        "on_time": 2697 * 3600.0,
        "flow_temperature": 29.3,
        "return_temperature": 28.2,
        "temperature_difference": 1.1,
        "power": 1400.0,
        "volume_flow": 1128 / 3_600_000,
    }
    assert reading.registers[kmp.VOLUME_V1].exact == Decimal("39.49")
    assert reading.registers[kmp.VOLUME_FLOW].si == Fraction(1128, 3_600_000)


@pytest.mark.parametrize("unit", ["kWh", "MWh", "GJ"])
def test_the_energy_in_any_unit_is_the_same_joules(unit):
    reading, _ = read(kmp.SimulatedKmpMeter(energy_unit=unit))
    assert reading.registers[kmp.ENERGY_E1].si == 554_400_000
    assert reading.values["energy"] == 554_400_000.0


def test_power_in_mw_and_flow_in_m3_per_hour():
    values = {kmp.POWER: (0x17, "0.0014"), kmp.VOLUME_FLOW: (0x2A, "1.128")}
    reading, _ = read(kmp.SimulatedKmpMeter(values))
    assert reading.values["power"] == 1400.0
    assert reading.values["volume_flow"] == 1128 / 3_600_000


def test_a_unit_with_no_conversion_leaves_the_register_out():
    values = {kmp.ENERGY_E1: (0x0C, "0.132")}  # Gcal: not converted
    reading, _ = read(kmp.SimulatedKmpMeter(values))
    assert "energy" not in reading.values
    assert reading.left_out == {kmp.ENERGY_E1: "energy in unit 0x0C: not in J"}


def test_stuffed_bytes_in_values_come_out_right():
    """Mantissas whose bytes are 06 0D 1B 40 80, next to each other."""
    values = {
        kmp.ENERGY_E1: (0x02, str(0x1B0D4080)),
        kmp.VOLUME_V1: (0x28, str(Decimal(0x061B1B06) / 100)),
        kmp.SERIAL_NUMBER: (0x00, str(0x40801BF2)),
    }
    meter = kmp.SimulatedKmpMeter(values)
    reading, _ = read(meter)
    assert reading.registers[kmp.ENERGY_E1].exact == 0x1B0D4080
    assert reading.registers[kmp.VOLUME_V1].exact == Decimal(0x061B1B06) / 100
    assert reading.serial == str(0x40801BF2)
    assert meter.requests == 2


@pytest.mark.parametrize(
    ("fault", "said"),
    [
        ("silent", "no answer within 1 s"),
        ("crc", "CRC 0x"),
        ("cut", "answer cut off:"),
        ("ack", "a lone ACK (06) where an answer was due"),
        ("garbage", "no answer within 1 s, 6 bytes of noise"),
    ],
)
def test_a_fault_once_is_retried(fault, said):
    meter = kmp.SimulatedKmpMeter(faults=[fault])
    reading, log = read(meter)
    assert reading.serial == "30303030"
    assert meter.requests == 3  # the retry costs one more
    assert any(entry.startswith("! GetRegister") and said in entry for entry in log), log


@pytest.mark.parametrize("fault", ["silent", "crc", "cut", "ack", "garbage"])
def test_a_fault_every_time_is_one_line(fault):
    meter = kmp.SimulatedKmpMeter(faults=[fault] * 3)
    with pytest.raises(kmp.KmpError) as caught:
        read(meter)
    message = str(caught.value)
    assert message.startswith("GetRegister 60,68,1004,86,87,89,80,74: ")
    assert message.endswith("(after 3 tries)")
    assert "\n" not in message
    assert meter.requests == 3


def test_echo_and_noise_are_skipped_without_a_retry():
    meter = kmp.SimulatedKmpMeter(echo=True, faults=["noise", "noise"])
    reading, log = read(meter)
    assert reading.serial == "30303030"
    assert meter.requests == 2
    assert sum(entry.startswith("echo ") for entry in log) == 2
    assert sum(entry.startswith("noise 00 FF 0D 12") for entry in log) == 2


def test_the_wrong_rate_is_silence():
    meter = kmp.SimulatedKmpMeter()  # hears 1200 baud only
    with pytest.raises(kmp.KmpError, match="no answer within 1 s"):
        read(meter, baudrate=2400)
    assert meter.requests == 0


def test_the_deadline_counts_from_the_end_of_the_request():
    """A meter that answers 0.9 s after the request has left is in time (1 s), though the
    request itself took 23 bytes x 11 bits / 1200 baud = 0.21 s to send."""
    meter = kmp.SimulatedKmpMeter(delay=0.9)
    reading, _ = read(meter)
    assert meter.requests == 2 and reading.serial == "30303030"


class Babbler:
    """A line that never stops: a 40 and bytes, forever, and never a 0D."""

    def __init__(self):
        self.clock = sim.SimClock()
        self.written = b""

    def write(self, data):
        self.written += data
        return len(data)

    def read(self, n=1):
        self.clock.sleep(n * 11 / 1200)
        return (b"\x40" + b"\x55" * 63)[:n] if n == 1 else b"\x55" * n


def test_a_babbling_line_ends():
    port = Babbler()
    with pytest.raises(kmp.KmpError, match="a babbling line: .* bytes and no answer"):
        kmp.read_meter(port, clock=port.clock, retries=0)
    assert port.clock() < 30


class Broken:
    def write(self, data):
        raise OSError(5, "Input/output error")

    def read(self, n=1):
        raise AssertionError("not reached")


def test_a_port_failure_is_not_retried():
    with pytest.raises(kmp.KmpError, match="^port failed while writing: Input/output error$"):
        kmp.read_meter(Broken())


def test_a_meter_without_register_1001_is_asked_its_serial_number():
    meter = kmp.SimulatedKmpMeter({kmp.SERIAL_NUMBER: (0x00, "12345")})
    known = meter.registers
    meter.registers = lambda ids: [r for r in known(ids) if r.id != kmp.SERIAL_NUMBER]
    reading, _ = read(meter)
    assert reading.serial == "00012345"
    assert meter.requests == 3  # only such a meter costs a third request


def test_get_type_and_get_serial():
    port, clock = line(kmp.SimulatedKmpMeter())
    meter = kmp.KmpMeter(port, clock=clock)
    assert meter.get_type() == (4, "F1")
    assert meter.get_serial() == 30303030
    assert meter.requests == 2


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(kmp.FAULTS), max_size=4), st.booleans())
def test_any_faults_give_a_reading_or_one_line(faults, echo):
    meter = kmp.SimulatedKmpMeter(faults=faults, echo=echo)
    try:
        reading, _ = read(meter)
    except kmp.KmpError as exc:
        assert "\n" not in str(exc) and str(exc).endswith("(after 3 tries)")
    else:
        assert reading.values["energy"] == 554_400_000.0
    assert meter.requests <= 2 + 2 * 2  # at most two retries per request


# -- the same floats as the M-Bus decoder -----------------------------------------

# quantity -> (KMP register, the unit code a 303 sends, KMP value per M-Bus raw unit)
SAME = {
    "energy": (kmp.ENERGY_E1, 0x02, 1),  # kWh, both
    "volume": (kmp.VOLUME_V1, 0x28, Decimal("0.01")),  # M-Bus 0.01 m3 -> m3
    "on_time": (kmp.HOUR_COUNTER, 0x2E, 1),  # h
    "flow_temperature": (kmp.T1, 0x25, Decimal("0.01")),  # 0.01 degC -> degC
    "return_temperature": (kmp.T2, 0x25, Decimal("0.01")),
    "temperature_difference": (kmp.T1_T2, 0x26, Decimal("0.01")),  # 0.01 K -> K
    "power": (kmp.POWER, 0x16, Decimal("0.1")),  # M-Bus 100 W -> kW
    "volume_flow": (kmp.VOLUME_FLOW, 0x29, 1),  # l/h, both
}
# The raw numbers of the M-Bus records, from tests/data/kamstrup/README.md's table.
RAW = {
    "multical303_heat": {"energy": 13, "volume": 307, "on_time": 4270,
                         "flow_temperature": 2376, "return_temperature": 2327,
                         "temperature_difference": 49, "power": 0, "volume_flow": 0},
    "multical303_heat_cooling": {"energy": 154, "volume": 3949, "on_time": 2697,
                                 "flow_temperature": 2930, "return_temperature": 2820,
                                 "temperature_difference": 110, "power": 14,
                                 "volume_flow": 1128},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(RAW))
def test_kmp_values_are_the_m_bus_decoders_floats(name):
    """The same raw numbers in KMP's units give the very floats the M-Bus decoder gives
    (1128 l/h: 1128/3600000 through either port), under the same names and units."""
    telegram = kt.decode_telegram(kt.parse_hex((CORPUS / f"{name}.hex").read_text()))
    mbus = {
        r.quantity: r
        for r in telegram.records
        if r.current and r.quantity in SAME and not r.modifiers  # not cooling energy E3
    }
    assert sorted(mbus) == sorted(SAME)
    registers = {kmp.SERIAL_NUMBER: kmp.Register(kmp.SERIAL_NUMBER, 0, Decimal(telegram.id))}
    for quantity, (rid, unit, scale) in SAME.items():
        registers[rid] = kmp.Register(rid, unit, Decimal(RAW[name][quantity]) * scale)
    reading = kmp.reading_from(registers, requests=2)
    for quantity, record in mbus.items():
        assert reading.values[quantity] == record.value, quantity
        assert kmp.REGISTERS[SAME[quantity][0]] == (quantity, record.unit)
    assert reading.serial == telegram.id


def test_a_late_meters_answers_to_the_retry_do_not_fail_the_next_request():
    """A meter that answers 1.5 s late (past the 1 s timeout) is asked again; its late
    answer passes for the retry's, and the retry's own answer comes while the next
    request waits: that is a stale answer to skip, not 'register 60 sent, not asked
    for' (the M-Bus read of the same late meter reads it)."""
    meter = kmp.SimulatedKmpMeter(delay=1.5)
    reading, log = read(meter)
    assert reading.serial == "30303030"
    assert reading.values == read(kmp.SimulatedKmpMeter())[0].values
