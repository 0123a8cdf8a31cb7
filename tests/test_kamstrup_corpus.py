"""Layer 2 against five real Kamstrup MULTICAL answers (corpus/kamstrup/README.md).

The figures are the README's, in the meter's units; the conversions to SI are written
out here so that each one can be checked by eye (1 kWh = 3 600 000 J, 1 l/h =
1/3 600 000 m3/s, 1 h = 3600 s).
"""

from __future__ import annotations

import pytest

import kamstrup_textfile as k

try:
    from corpus import KAMSTRUP, hex_bytes
except ImportError:  # tests/ imported as a package
    from tests.corpus import KAMSTRUP, hex_bytes

KWH = 3_600_000  # J
MWH = 3_600_000_000  # J
HOUR = 3600  # s
LITRE_PER_HOUR = 3_600_000  # m3/s is l/h divided by this
M3_PER_HOUR = 3600  # m3/s is m3/h divided by this


def raw(name: str) -> bytes:
    return hex_bytes(KAMSTRUP / f"{name}.hex")


def telegram(name: str) -> k.Telegram:
    return k.decode_telegram(raw(name))


def by_bytes(t: k.Telegram, dib: str, vib: str) -> k.Record:
    """The one record with these DIF(E)s and VIF(E)s (hex)."""
    found = [r for r in t.records if r.dib.hex() == dib and r.vib.hex() == vib]
    assert len(found) == 1, (dib, vib, found)
    return found[0]


def value(t: k.Telegram, dib: str, vib: str):
    return by_bytes(t, dib, vib).value


# --- headers -------------------------------------------------------------------

HEADERS = {
    # file: (address, ID, version, medium, access number, status)
    "multical303_heat": (133, "82937133", 0x40, 0x04, 0x43, 0x10),
    "multical303_heat_cooling": (48, "30303030", 0x40, 0x0D, 0x00, 0x00),
    "multical403": (74, "77447744", 0x34, 0x04, 0x06, 0x00),
    "multical603": (230, "32323232", 0x35, 0x04, 0x19, 0x00),
    "multical302": (183, "67211183", 0x30, 0x04, 0x21, 0x00),
}


def test_all_five_frames_are_here():
    assert sorted(p.stem for p in KAMSTRUP.glob("*.hex")) == sorted(HEADERS)


@pytest.mark.parametrize("name", sorted(HEADERS))
def test_header(name):
    t = telegram(name)
    address, ident, version, medium, access, status = HEADERS[name]
    assert t.ci == 0x72
    assert t.address == address
    assert t.id == ident
    assert t.manufacturer == "KAM"
    assert t.version == version
    assert t.medium == medium
    assert t.access_number == access
    assert t.status == status
    assert t.signature == 0
    assert not t.more_records_follow


def test_medium_names():
    assert telegram("multical303_heat").medium_name == "heat"
    assert telegram("multical303_heat_cooling").medium_name == "heat/cooling"


# --- MULTICAL 303 -----------------------------------------------------------------

# (DIF, VIF(E)s, function, heat, heat/cooling): the README's table in SI.
MC303 = [
    ("04", "06", "instantaneous", 13 * KWH, 154 * KWH),
    ("04", "14", "instantaneous", 3.07, 39.49),
    ("03", "22", "instantaneous", 4270 * HOUR, 2697 * HOUR),
    ("33", "22", "error", 150 * HOUR, 0 * HOUR),
    ("02", "59", "instantaneous", 23.76, 29.30),
    ("02", "5d", "instantaneous", 23.27, 28.20),
    ("02", "61", "instantaneous", 0.49, 1.10),
    ("02", "2d", "instantaneous", 0 * 100, 14 * 100),
    ("12", "2d", "maximum", 90 * 100, 180 * 100),
    ("02", "3b", "instantaneous", 0 / LITRE_PER_HOUR, 1128 / LITRE_PER_HOUR),
    ("12", "3b", "maximum", 1383 / LITRE_PER_HOUR, 1146 / LITRE_PER_HOUR),
]
MC303_UNITS = {"06": "J", "14": "m3", "22": "s", "59": "degC", "5d": "degC", "61": "K"}
MC303_UNITS.update({"2d": "W", "3b": "m3/s"})


@pytest.mark.parametrize("dif, vif, function, heat, heat_cooling", MC303)
def test_303_registers(dif, vif, function, heat, heat_cooling):
    for name, expected in (("multical303_heat", heat), ("multical303_heat_cooling", heat_cooling)):
        record = by_bytes(telegram(name), dif, vif)
        assert record.value == expected, name
        assert isinstance(record.value, float)
        assert record.function == function
        assert record.unit == MC303_UNITS[vif]
        assert (record.storage, record.tariff, record.subunit) == (0, 0, 0)


def test_303_si_values_written_out():
    heat = telegram("multical303_heat")
    cooling = telegram("multical303_heat_cooling")
    assert value(heat, "04", "06") == 46800000.0
    assert value(cooling, "02", "3b") == 1128 / 3600000
    assert value(heat, "03", "22") == 15372000.0


def test_volume_is_exactly_the_decimal():
    assert repr(value(telegram("multical303_heat_cooling"), "04", "14")) == "39.49"
    assert repr(value(telegram("multical303_heat"), "04", "14")) == "3.07"
    assert repr(value(telegram("multical403"), "04", "14")) == "2232.49"
    assert repr(value(telegram("multical302"), "04", "14")) == "348.12"


def test_303_e8_e9_are_manufacturer_registers():
    for name, e8, e9 in (("multical303_heat", 125, 114), ("multical303_heat_cooling", 1394, 1260)):
        t = telegram(name)
        for vib, manufacturer_vife, raw_value in (("ff07", b"\x07", e8), ("ff08", b"\x08", e9)):
            record = by_bytes(t, "04", vib)
            assert record.quantity == "manufacturer_specific"
            assert record.manufacturer_vife == manufacturer_vife
            assert record.unit == ""
            assert record.value == raw_value and type(record.value) is int
            assert record.quantity != by_bytes(t, "04", "06").quantity
            assert record.quantity != by_bytes(t, "04", "14").quantity


def test_303_cooling_energy_is_not_heat_energy():
    t = telegram("multical303_heat_cooling")
    heat, cooling = by_bytes(t, "04", "06"), by_bytes(t, "04", "863c")
    assert cooling.quantity == heat.quantity == "energy"
    assert cooling.value == 0.0
    assert cooling.modifiers == ("negative_accumulation",)
    assert heat.modifiers == ()
    assert cooling.vib != heat.vib
    assert "negative_accumulation" not in by_bytes(t, "44", "06").modifiers
    assert by_bytes(t, "44", "863c").modifiers == ("negative_accumulation",)
    assert not any(r.vib == b"\x86\x3c" for r in telegram("multical303_heat").records)


def test_hours_in_error_differ_by_function():
    for name in ("multical303_heat", "multical303_heat_cooling"):
        t = telegram(name)
        hours, in_error = by_bytes(t, "03", "22"), by_bytes(t, "33", "22")
        assert hours.quantity == in_error.quantity == "on_time"
        assert (hours.function, in_error.function) == ("instantaneous", "error")
        assert hours.current and not in_error.current


def test_303_info_code_is_an_unsigned_bit_field():
    record = by_bytes(telegram("multical303_heat"), "02", "ff22")
    assert record.value == 0x0100  # V1 air or weak signal
    assert type(record.value) is int
    assert record.manufacturer_vife == b"\x22"
    assert by_bytes(telegram("multical303_heat_cooling"), "02", "ff22").value == 0


def test_info_code_with_the_top_bit_stays_positive():
    # The 303 heat frame with its info code changed from 00 01 to 00 81 (bit 15 set).
    frame = bytearray(raw("multical303_heat"))
    at = frame.index(bytes.fromhex("02FF220001")) + 3
    frame[at + 1] = 0x81
    frame[-2] = sum(frame[4:-2]) & 0xFF
    record = by_bytes(k.decode_telegram(bytes(frame)), "02", "ff22")
    assert record.value == 0x8100


def test_error_flags_fd17_unsigned():
    t = telegram("multical302")
    record = by_bytes(t, "02", "fd17")
    assert record.value == 0 and type(record.value) is int
    frame = bytearray(raw("multical302"))
    at = frame.index(bytes.fromhex("02FD170000")) + 3
    frame[at : at + 2] = b"\xff\xff"
    frame[-2] = sum(frame[4:-2]) & 0xFF
    assert by_bytes(k.decode_telegram(bytes(frame)), "02", "fd17").value == 0xFFFF


@pytest.mark.parametrize(
    "dib, vib, expected",
    [
        ("44", "06", 0.0),
        ("44", "14", 0.0),
        ("44", "ff07", 0),
        ("44", "ff08", 0),
        ("52", "2d", 0.0),
        ("52", "3b", 0.0),
    ],
)
def test_303_storage_1(dib, vib, expected):
    for name in ("multical303_heat", "multical303_heat_cooling"):
        record = by_bytes(telegram(name), dib, vib)
        assert record.storage == 1
        assert record.value == expected


def test_303_heat_cooling_storage_1_cooling():
    record = by_bytes(telegram("multical303_heat_cooling"), "44", "863c")
    assert (record.storage, record.value) == (1, 0.0)


def test_303_target_date():
    heat = by_bytes(telegram("multical303_heat"), "42", "6c")
    assert (heat.storage, heat.value) == (1, "2024-06-01")
    # 00 00: no valid date.
    assert by_bytes(telegram("multical303_heat_cooling"), "42", "6c").value is None


def test_303_has_no_clock():
    for name in ("multical303_heat", "multical303_heat_cooling"):
        assert not [r for r in telegram(name).records if r.vib[:1] == b"\x6d"]


def test_303_record_counts():
    assert len(telegram("multical303_heat").records) == 21
    assert len(telegram("multical303_heat_cooling").records) == 23


# --- MULTICAL 403 -----------------------------------------------------------------


def test_403_values():
    t = telegram("multical403")
    assert value(t, "04", "06") == 34510 * KWH
    assert value(t, "04", "ff07") == 148532
    assert value(t, "04", "ff08") == 118520
    assert value(t, "04", "14") == 2232.49
    assert value(t, "04", "3b") == 527 / LITRE_PER_HOUR
    assert value(t, "02", "59") == 64.60
    assert value(t, "02", "5d") == 45.16
    info = by_bytes(t, "04", "ff22")
    assert info.value == 0 and type(info.value) is int


def test_403_operating_time_in_minutes_with_a_manufacturer_vife():
    record = by_bytes(telegram("multical403"), "04", "a5ff21")
    assert record.quantity == "operating_time"
    assert record.unit == "s"
    assert record.value == 2609351 * 60 == 156561060.0
    assert record.manufacturer_vife == b"\x21"
    assert "manufacturer_specific" in record.modifiers


# --- MULTICAL 603 -----------------------------------------------------------------


def test_603_values():
    t = telegram("multical603")
    energy = by_bytes(t, "04", "fb00")
    assert (energy.quantity, energy.unit) == ("energy", "J")
    assert energy.value == 33632 * MWH // 10 == 3363.2 * MWH
    assert value(t, "04", "16") == 85656.0
    subunit_1, subunit_2 = by_bytes(t, "8440", "14"), by_bytes(t, "848040", "14")
    assert (subunit_1.subunit, subunit_1.value) == (1, 0.0)
    assert (subunit_2.subunit, subunit_2.value) == (2, 0.0)
    assert value(t, "04", "22") == 17232 * HOUR
    assert value(t, "34", "22") == 28 * HOUR
    assert by_bytes(t, "34", "22").function == "error"
    assert value(t, "02", "59") == 81.37
    assert value(t, "02", "5d") == 44.31
    assert value(t, "02", "61") == 37.06
    assert value(t, "04", "2e") == 560_000.0
    assert value(t, "14", "2e") == 869_000.0
    assert value(t, "04", "3c") == 13.16 / M3_PER_HOUR == 1316 / 360_000
    assert value(t, "14", "3c") == 2275 / 360_000
    assert value(t, "04", "ff22") == 0
    assert value(t, "42", "6c") == "2024-01-01"
    fabrication = by_bytes(t, "0c", "78")
    assert fabrication.value == 84853230 and type(fabrication.value) is int


def test_603_date_and_time():
    record = by_bytes(telegram("multical603"), "04", "6d")
    assert record.value == "2024-01-15T11:46"


# --- MULTICAL 302 -----------------------------------------------------------------


def test_302_values():
    t = telegram("multical302")
    assert value(t, "0c", "78") == 67211183
    assert value(t, "04", "06") == 3392 * KWH
    assert value(t, "04", "14") == 348.12
    assert value(t, "04", "22") == 393 * HOUR
    assert value(t, "34", "22") == 2 * HOUR
    assert value(t, "02", "59") == 54.02
    assert value(t, "02", "5d") == 46.72
    assert value(t, "02", "61") == 7.30
    assert value(t, "04", "2d") == 180 * 100
    assert value(t, "14", "2d") == 285 * 100
    assert value(t, "04", "3b") == 2151 / LITRE_PER_HOUR
    assert value(t, "14", "3b") == 2339 / LITRE_PER_HOUR
    assert value(t, "04", "6d") == "2015-04-02T23:48"


def test_302_storage_1():
    t = telegram("multical302")
    assert value(t, "44", "06") == 2473 * KWH
    assert value(t, "44", "14") == 245.74
    assert value(t, "54", "2d") == 294 * 100
    assert value(t, "54", "3b") == 2327 / LITRE_PER_HOUR
    assert value(t, "42", "6c") == "2015-03-31"
    for dib in ("44", "54", "42"):
        assert all(r.storage == 1 for r in t.records if r.dib.hex() == dib)


def test_302_cooling_energy_has_a_manufacturer_vife():
    t = telegram("multical302")
    cooling, heat = by_bytes(t, "04", "86ff02"), by_bytes(t, "04", "06")
    assert cooling.value == 0.0
    assert cooling.manufacturer_vife == b"\x02"
    assert heat.manufacturer_vife == b""
    assert "manufacturer_specific" in cooling.modifiers
    assert not heat.modifiers


def test_302_error_flags_and_manufacturer_records():
    t = telegram("multical302")
    flags = by_bytes(t, "02", "fd17")
    assert flags.quantity == "error_flags"
    for dib, vib in (("07", "ff0f"), ("04", "ff11"), ("04", "ff12"), ("02", "ff1a")):
        record = by_bytes(t, dib, vib)
        assert record.quantity == "manufacturer_specific"
        assert type(record.value) is int
    assert by_bytes(t, "02", "fd0e").quantity == "firmware_version"
    assert t.records[-1].vib == b"\xfd\x0e"


# --- what sets the registers apart ---------------------------------------------


def test_every_register_is_told_apart_by_its_decoded_fields():
    """E8/E9, cooling energy, hours in error: no two records of a frame look the same
    once decoded (without their raw DIB/VIB), so the metrics layer can tell them apart."""
    for name in sorted(HEADERS):
        t = telegram(name)
        keys = [
            (r.quantity, r.unit, r.storage, r.tariff, r.subunit, r.function)
            + (r.modifiers, r.manufacturer_vife)
            for r in t.records
        ]
        assert len(set(keys)) == len(keys), name
