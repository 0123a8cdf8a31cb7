"""The VIF extension tables (0xFB, 0xFD) to EN 13757-3:2018, and codes still reserved.

Each record is built here from its bytes; the expected value is worked out with
fractions.Fraction from the standard's wording (10^(nn-3) kvar ...), not from the
decoder's tables.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

import kamstrup_mbus as mbus
import kamstrup_textfile as kt

try:
    from tools import invoke
except ImportError:  # pragma: no cover - when run as a package
    from tests.tools import invoke

HEADER = bytes.fromhex("30303030 2D2C 40 04 00 00 0000".replace(" ", ""))


def records(dib_vib_data: str) -> list:
    frame = mbus.long_frame(0x08, 0x30, 0x72, HEADER + bytes.fromhex(dib_vib_data.replace(" ", "")))
    return kt.decode_telegram(frame).records


def record(dib_vib_data: str) -> kt.Record:
    (only,) = records(dib_vib_data)
    return only


# --- reserved codes: the raw value, unscaled, with its VIF bytes ----------------------

RESERVED = [
    # (record bytes, VIB, raw value)
    ("04 FB 06 E8030000", "fb06", 1000),  # FB E000 0110: reserved
    ("04 FB 86 73 E8030000", "fb8673", 1000),  # ... with a correction VIFE 10^-3
    ("04 FB 86 7D E8030000", "fb867d", 1000),  # ... with the correction VIFE x 10^3
    ("04 FB 86 79 E8030000", "fb8679", 1000),  # ... with an additive correction VIFE
    ("04 FB 86 22 E8030000", "fb8622", 1000),  # ... "per hour"
    ("0A FB 87 74 3412", "fb8774", 1234),  # FB E000 0111, 4-digit BCD, correction 10^-2
    ("02 FD FC 70 1027", "fdfc70", 10000),  # FD E111 1100: reserved, correction 10^-6
    ("02 EF 74 1027", "ef74", 10000),  # VIF E110 1111 (the third table, reserved)
    ("02 FB 40 FEFF", "fb40", -2),  # FB E100 0000: reserved, signed 16-bit
]


@pytest.mark.parametrize("hexes, vib, raw", RESERVED)
def test_a_reserved_code_keeps_its_raw_value_unscaled(hexes, vib, raw):
    r = record(hexes)
    assert r.quantity == "reserved"
    assert r.unit == ""
    assert type(r.value) is int and r.value == raw
    assert r.vib.hex() == vib
    assert r.to_json()["vib"] == vib


def test_a_reserved_real32_is_the_number_sent():
    r = record("05 FB 86 73 0000C03F")  # 1.5 as a 32-bit real, correction 10^-3
    assert (r.quantity, r.value) == ("reserved", 1.5)


def test_a_reserved_code_is_exported_raw_by_its_vif_bytes():
    frame = mbus.long_frame(0x08, 0x30, 0x72, HEADER + bytes.fromhex("04FB8673E803000002FB40FEFF"))
    text = kt.exposition([kt.Reading(48, kt.decode_telegram(frame))])
    assert 'kamstrup_reserved_register{meter="30303030",vib="fb8673"} 1000\n' in text
    assert 'kamstrup_reserved_register{meter="30303030",vib="fb40"} -2\n' in text
    assert "# TYPE kamstrup_reserved_register gauge\n" in text


def test_vib_is_a_label_the_tool_sets(tmp_path, monkeypatch):
    # never the real port and /var/lib/prometheus/node-exporter, should the check regress
    monkeypatch.setattr(kt, "open_port", lambda *a, **k: pytest.fail("port opened"))
    out = tmp_path / "k.prom"
    result = invoke(["--once", "--label", "vib=x", "--output", str(out)])
    assert result.exit_code == 2
    assert "'vib' is set by the tool itself" in result.stderr
    assert not out.exists()


# --- the 0xFB table, EN 13757-3:2018 -------------------------------------------------

F = Fraction
FT3 = F("0.028316846592")  # m3, by definition (1 ft = 0.3048 m)
TWO_TO_MINUS_12 = F(1, 4096)

# Codes the 2018 edition assigned that earlier editions (and this decoder) left reserved:
# (VIFE, quantity, SI unit, value of one raw unit). Wording of the standard in comments.
FB_2018 = [
    (0x04, "apparent_energy", "VAh", F(10) ** 3),  # E000 010n: 10^n kVAh
    (0x05, "apparent_energy", "VAh", F(10) ** 4),
    (0x14, "reactive_power", "var", F(1, 1000) * 1000),  # E001 01nn: 10^(nn-3) kvar
    (0x15, "reactive_power", "var", F(1, 100) * 1000),
    (0x16, "reactive_power", "var", F(1, 10) * 1000),
    (0x17, "reactive_power", "var", F(1) * 1000),
    (0x20, "volume", "m3", FT3),  # E010 0000: volume feet^3
    (0x2A, "phase_voltage_voltage", "deg", F(1, 10)),  # E010 1010: phase U-U, 0.1 degree
    (0x2B, "phase_voltage_current", "deg", F(1, 10)),  # E010 1011: phase U-I, 0.1 degree
    (0x2C, "frequency", "Hz", F(1, 1000)),  # E010 11nn: 10^(nn-3) Hz
    (0x2D, "frequency", "Hz", F(1, 100)),
    (0x2E, "frequency", "Hz", F(1, 10)),
    (0x2F, "frequency", "Hz", F(1)),
    (0x34, "apparent_power", "VA", F(1, 1000) * 1000),  # E011 01nn: 10^(nn-3) kVA
    (0x35, "apparent_power", "VA", F(1, 100) * 1000),
    (0x36, "apparent_power", "VA", F(1, 10) * 1000),
    (0x37, "apparent_power", "VA", F(1) * 1000),
    # heat cost allocator rating factors (EN 834), fixed point 2^-12
    (0x68, "resulting_rating_factor", "", TWO_TO_MINUS_12),  # K
    (0x6A, "thermal_coupling_rating_factor", "", TWO_TO_MINUS_12),  # Kc, overall
    (0x6B, "thermal_coupling_rating_factor_room", "", TWO_TO_MINUS_12),  # Kcr
    (0x6C, "thermal_coupling_rating_factor_heater", "", TWO_TO_MINUS_12),  # Kch
    (0x6D, "low_temperature_rating_factor", "", TWO_TO_MINUS_12),  # Kt
    (0x6E, "display_output_scaling_factor", "", TWO_TO_MINUS_12),  # KD
]


@pytest.mark.parametrize("code, quantity, unit, scale", FB_2018, ids=lambda x: repr(x))
@pytest.mark.parametrize("raw", [1, 12345, -7])
def test_fb_2018_codes(code, quantity, unit, scale, raw):
    data = raw.to_bytes(4, "little", signed=True).hex()
    r = record(f"04 FB {code:02X} {data}")
    assert (r.quantity, r.unit) == (quantity, unit)
    assert r.value == float(raw * scale)
    assert r.vib == bytes((0xFB, code))


@pytest.mark.parametrize("code, quantity, unit, scale", FB_2018[:17], ids=lambda x: repr(x))
def test_fb_2018_codes_take_correction_vifes(code, quantity, unit, scale):
    r = record(f"0A FB {0x80 | code:02X} 73 3412")  # 4-digit BCD 1234, correction 10^-3
    assert (r.quantity, r.unit) == (quantity, unit)
    assert r.value == float(1234 * scale / 1000)


def test_fb_thermal_output_rating_factor_is_kept_raw():
    # Kq (E110 1001): public decoders disagree on its scale (2^-12 W, or 1): we keep
    # the number the meter sent, as for a reserved code.
    r = record("02 FB E9 73 0010")
    assert (r.quantity, r.unit, r.value) == ("thermal_output_rating_factor", "", 4096)


@pytest.mark.parametrize(
    "code",
    [0x06, 0x07, 0x0A, 0x0B, 0x12, 0x13, 0x1C, 0x1D, 0x1E, 0x1F, 0x27, 0x32, 0x33]
    + list(range(0x38, 0x58))
    + [0x6F],
)
def test_fb_codes_still_reserved(code):
    r = record(f"02 FB {code:02X} 0A00")
    assert (r.quantity, r.unit, r.value) == ("reserved", "", 10)


def test_fb_codes_of_earlier_editions_keep_their_meaning():
    # US gallons and degrees Fahrenheit were dropped by the 2018 edition (reserved there,
    # not given another meaning): a meter built to an older edition still sends them.
    assert record("04 FB 23 01000000").value == float(F("0.003785411784"))  # 1 US gallon
    r = record("02 FB 59 8813")  # flow temperature 10^-2 degF: 50.00 degF = 10 degC
    assert (r.quantity, r.unit, r.value) == ("flow_temperature", "degC", 10.0)


# --- the 0xFD table, EN 13757-3:2018 -------------------------------------------------

FD_2018 = [
    # (record bytes, quantity, unit, value)
    ("04 FD 19 78563412", "security_key", "", 0x12345678),  # E001 1001
    ("02 FD 23 0102", "tariff_subunit_descriptor", "", 0x0201),  # E010 0011
    ("0D FD 3B 03 0A0B0C", "wireless_mbus_container", "", "\x0c\x0b\x0a"),  # LVAR 03: text
    ("0D FD 3B E3 0A0B0C", "wireless_mbus_container", "", "0A 0B 0C"),  # LVAR E3: binary
    ("02 FD 3C 0A00", "nominal_transmission_period", "s", 10.0),  # E011 11nn: s..d
    ("02 FD 3D 0A00", "nominal_transmission_period", "s", 600.0),
    ("02 FD 3E 0A00", "nominal_transmission_period", "s", 36000.0),
    ("02 FD 3F 0A00", "nominal_transmission_period", "s", 864000.0),
    # E111 1101: the second level of the FD table (FD FD xx)
    ("01 FD FD 00 05", "currently_selected_application", "", 5),
    ("01 FD FD 02 12", "remaining_battery_life_months", "month", 18.0),
    ("01 FD FD 03 0A", "remaining_battery_life_years", "year", 10.0),
]


@pytest.mark.parametrize("hexes, quantity, unit, value", FD_2018)
def test_fd_2018_codes(hexes, quantity, unit, value):
    r = record(hexes)
    assert (r.quantity, r.unit, r.value) == (quantity, unit, value)


@pytest.mark.parametrize("code", [0x01, 0x04, 0x7F])
def test_fd_second_level_codes_still_reserved(code):
    r = record(f"02 FD FD {code:02X} 0A00")
    assert (r.quantity, r.value) == ("reserved", 10)
    assert r.vib == bytes((0xFD, 0xFD, code))


def test_fd_second_level_without_its_code_is_unknown():
    r = record("02 FD 7D 0A00")
    assert (r.quantity, r.value) == ("unknown", 10)


@pytest.mark.parametrize("code", range(0x77, 0x7D))
def test_fd_codes_still_reserved(code):
    assert record(f"02 FD {code:02X} 0A00").quantity == "reserved"


def test_every_fb_and_fd_code_decodes():
    for table in (0xFB, 0xFD):
        for code in range(0x80):
            r = record(f"02 {table:02X} {code:02X} 0100")
            assert r.quantity, (table, code)


# --- metric names for the new quantities ---------------------------------------------

ELECTRICITY = (
    "04 FB 17 0A000000"  # reactive power 10 kvar
    "04 FB 37 0B000000"  # apparent power 11 kVA
    "04 FB 05 0C000000"  # apparent energy 12 x 10 kVAh
    "04 FB 03 0D000000"  # reactive energy 13 x 10 kvarh
    "02 FB 2D 8613"  # frequency 49.98 Hz
    "02 FB 2B 5802"  # phase U-I 60.0 degrees
)


def test_names_of_the_electrical_quantities():
    frame = mbus.long_frame(0x08, 0x30, 0x72, HEADER + bytes.fromhex(ELECTRICITY))
    text = kt.exposition([kt.Reading(48, kt.decode_telegram(frame))])
    meter = '{meter="30303030"}'
    assert f"kamstrup_reactive_power_vars{meter} 10000\n" in text
    assert f"kamstrup_apparent_power_volt_amperes{meter} 11000\n" in text
    assert f"kamstrup_apparent_energy_volt_ampere_hours_total{meter} 120000\n" in text
    assert f"kamstrup_reactive_energy_var_hours_total{meter} 130000\n" in text
    assert f"kamstrup_frequency_hertz{meter} 49.98\n" in text
    assert f"kamstrup_phase_voltage_current_degrees{meter} 60\n" in text
    assert "# TYPE kamstrup_apparent_energy_volt_ampere_hours_total counter\n" in text
    assert "# TYPE kamstrup_reactive_power_vars gauge\n" in text


# --- real 2018 codes: Gran-System electricity meters (tests/data/frames/README.md) ------

FRAMES = Path(__file__).resolve().parent / "data" / "frames"


def wired(name: str) -> bytes:
    """A wireless M-Bus telegram's application layer (it has CI 0x78: no header) in a
    wired RSP_UD long frame, the link layer written here."""
    telegram = bytes.fromhex((FRAMES / name).read_text().strip())
    assert telegram[0] == len(telegram) - 1 and telegram[10] == 0x78
    return mbus.long_frame(0x08, 0x01, 0x78, telegram[11:])


@pytest.mark.parametrize(
    "name, hertz, volts",
    [("gransystems_101.wmbus.hex", 49.98, 235.0), ("gransystems_301.wmbus.hex", 50.0, 234.1)],
)
def test_gran_system_frequency(name, hertz, volts):
    # wmbusmeters' expected output for these telegrams: frequency_hz 49.98 and 50,
    # voltage_at_phase_1_v 235 and 234.1 (simulations/simulation_t1.txt).
    t = kt.decode_telegram(wired(name))
    (frequency,) = [r for r in t.records if r.vib == b"\xfb\x2d"]
    assert (frequency.quantity, frequency.unit, frequency.value) == ("frequency", "Hz", hertz)
    voltages = [r.value for r in t.records if r.quantity == "voltage"]
    assert voltages[0] == volts  # phase 1: subunit 0 on the 101, subunit 1 on the 301


def test_gran_system_101_energy_and_clock():
    # wmbusmeters: total_energy_consumption_kwh 0.916, device_datetime 2021-01-28 19:15
    t = kt.decode_telegram(wired("gransystems_101.wmbus.hex"))
    assert t.records[0].value == "2021-01-28T19:15"
    assert t.records[1].value == 0.916 * 3_600_000


def test_a_security_key_is_never_exported():
    """FD 19 (2018): a key, like a password, stays out of the .prom (it is in the JSON,
    which a user asks for)."""
    frame = mbus.long_frame(0x08, 0x30, 0x72, HEADER + bytes.fromhex("04FD1978563412"))
    text = kt.exposition([kt.Reading(48, kt.decode_telegram(frame))])
    assert "security_key" not in text
    assert str(0x12345678) not in text
