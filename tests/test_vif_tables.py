"""The VIF extension tables (0xFB, 0xFD) to EN 13757-3:2018, and codes still reserved.

Each record is built here from its bytes; the expected value is worked out with
fractions.Fraction from the standard's wording (10^(nn-3) kvar ...), not from the
decoder's tables.
"""

from __future__ import annotations

import pytest

import kamstrup_textfile as kt

try:
    from tools import invoke
except ImportError:  # pragma: no cover - when run as a package
    from tests.tools import invoke

HEADER = bytes.fromhex("30303030 2D2C 40 04 00 00 0000".replace(" ", ""))


def records(dib_vib_data: str) -> list:
    frame = kt.long_frame(0x08, 0x30, 0x72, HEADER + bytes.fromhex(dib_vib_data.replace(" ", "")))
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
    frame = kt.long_frame(0x08, 0x30, 0x72, HEADER + bytes.fromhex("04FB8673E803000002FB40FEFF"))
    text = kt.exposition([kt.Reading(48, kt.decode_telegram(frame))])
    assert 'kamstrup_reserved_register{meter="30303030",vib="fb8673"} 1000\n' in text
    assert 'kamstrup_reserved_register{meter="30303030",vib="fb40"} -2\n' in text
    assert "# TYPE kamstrup_reserved_register gauge\n" in text


def test_vib_is_a_label_the_tool_sets():
    result = invoke(["--once", "--label", "vib=x"])
    assert result.exit_code == 2
    assert "'vib' is set by the tool itself" in result.stderr
