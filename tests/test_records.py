"""Facts of the EN 13757-3 tables that the corpora do not reach, each with real bytes."""

from __future__ import annotations

import pytest

import kamstrup_mbus as mbus
import kamstrup_textfile as kt

HEADER = bytes.fromhex("30303030 2D2C 40 04 00 00 0000".replace(" ", ""))


def record(dib_vib_data: str) -> kt.Record:
    frame = mbus.long_frame(0x08, 0x30, 0x72, HEADER + bytes.fromhex(dib_vib_data))
    (only,) = kt.decode_telegram(frame).records
    return only


@pytest.mark.parametrize(
    "hexes, quantity, unit, value",
    [
        ("04FB0C01000000", "energy", "J", 418680.0),  # 0.1 MCal
        ("04FB0F01000000", "energy", "J", 418680000.0),  # 100 MCal
        ("04FB0001000000", "energy", "J", 360000000.0),  # 0.1 MWh
        ("04FB0901000000", "energy", "J", 1000000000.0),  # 1 GJ
        ("04FB2901000000", "power", "W", 1000000.0),  # 1 MW
        ("04FB1101000000", "volume", "m3", 1000.0),  # 1000 m3
        ("02FD480500", "voltage", "V", 0.5),  # 5 x 0.1 V (FD 48: 10^(8-9))
        ("02FD590100", "current", "A", 0.001),  # 1 mA (FD 59: 10^(9-12))
        ("026A0100", "pressure", "Pa", 10000.0),  # 0.1 bar (VIF 6A: 10^(2-3) bar)
    ],
)
def test_extension_and_primary_table_values(hexes, quantity, unit, value):
    r = record(hexes)
    assert (r.quantity, r.unit, r.value) == (quantity, unit, value)


def test_type_g_year_beyond_99_is_no_date():
    assert record("026C01FF").value is None  # year bits all set: 127
    assert record("026C0136").value == "2024-06-01"


def test_reset_counter_is_a_counter_named_without_counter():
    telegram = kt.decode_telegram(
        mbus.long_frame(0x08, 0x30, 0x72, HEADER + bytes.fromhex("01FD6007"))
    )
    base, counter, labels, value = kt.record_series(telegram, telegram.records[0])
    assert (base, counter, value) == ("resets", True, 7)


def test_negative_accumulation_of_a_volume_is_not_the_volume_counter():
    """Only energy turns 0x3C into a name (cooling energy); elsewhere it stays apart."""
    telegram = kt.decode_telegram(
        mbus.long_frame(
            0x08, 0x30, 0x72, HEADER + bytes.fromhex("0494 3C 01000000".replace(" ", ""))
        )
    )
    base, counter, labels, value = kt.record_series(telegram, telegram.records[0])
    assert base == "register_volume"
    assert counter is False
    assert ("vife", "negative_accumulation") in labels
    assert ("unit", "m3") in labels
