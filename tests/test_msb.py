"""CI 0x76 (and 0x77): the variable (fixed) data structure with multi-byte fields most
significant byte first (EN 1434-3 "mode 2"; libmbus's MBUS_CONTROL_INFO_RESP_VARIABLE_MSB).

A 0x76 answer is a 0x72 answer with every multi-byte field reversed: the header's
identification number, manufacturer and signature, and every data field (integers, BCD,
32-bit reals, dates, variable-length data) and a plain-text VIF's unit.  Single bytes
(DIF, DIFEs, VIF, VIFEs, version, medium, access number, status, LVAR) stay as they are.
The twin of a 0x72 frame is built here from the encoder's own field boundaries, never
from the decoder's.
"""

from __future__ import annotations

import datetime as dt
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kamstrup_textfile as k

try:
    from test_properties import (
        VIFS,
        decoded,
        encode_bcd,
        encode_date_g,
        encode_datetime_f,
        encode_dib,
        encode_int,
        frame,
        numbers,
        places,
    )
except ImportError:  # pragma: no cover - when run as a package
    from tests.test_properties import (
        VIFS,
        decoded,
        encode_bcd,
        encode_date_g,
        encode_datetime_f,
        encode_dib,
        encode_int,
        frame,
        numbers,
        places,
    )

FRAMES = Path(__file__).resolve().parent / "data" / "frames"

# The MULTICAL 303's header (ID 82937133, KAM, version 0x40, heat, access 0x43, status
# 0x10, signature 0x1234), as the fields, and in both byte orders.
IDENT, MANUFACTURER, SIGNATURE = "82937133", 0x2C2D, 0x1234
SINGLES = bytes((0x40, 0x04, 0x43, 0x10))


def header(msb: bool) -> bytes:
    order = "big" if msb else "little"
    ident = bytes.fromhex(IDENT)
    return (
        (ident if msb else ident[::-1])
        + MANUFACTURER.to_bytes(2, order)
        + SINGLES
        + SIGNATURE.to_bytes(2, order)
    )


class Field:
    """A record as DIB + VIB (single bytes), an optional LVAR byte, and its data field."""

    def __init__(self, head: bytes, field: bytes, lvar: bytes = b""):
        self.head, self.field, self.lvar = head, field, lvar

    def wire(self, msb: bool) -> bytes:
        return self.head + self.lvar + (self.field[::-1] if msb else self.field)


def twins(fields, address=0x30) -> tuple:
    """(the 0x72 frame, its 0x76 twin) of these records."""
    lsb = header(False) + b"".join(f.wire(False) for f in fields)
    msb = header(True) + b"".join(f.wire(True) for f in fields)
    return frame(0x08, address, 0x72, lsb), frame(0x08, address, 0x76, msb)


def both(fields) -> tuple:
    lsb, msb = twins(fields)
    return k.decode_telegram(lsb), k.decode_telegram(msb)


# --- the header -----------------------------------------------------------------------


def test_header_fields_are_read_most_significant_byte_first():
    t = k.decode_telegram(twins([])[1])
    assert t.ci == 0x76
    assert (t.id, t.manufacturer, t.signature) == (IDENT, "KAM", SIGNATURE)
    assert (t.version, t.medium, t.access_number, t.status) == (0x40, 0x04, 0x43, 0x10)


def test_header_json_is_the_0x72_json():
    lsb, msb = both([])
    assert msb.to_json() == lsb.to_json()
    assert k.telegram_json(msb) == k.telegram_json(lsb)


def test_a_short_0x76_header_is_a_frame_error():
    with pytest.raises(k.FrameError, match="header of 11 bytes, expected 12"):
        k.decode_telegram(frame(0x08, 1, 0x76, bytes(11)))


# --- every data coding, both byte orders ------------------------------------------------

ENERGY_WH = bytes((0x03,))  # VIF 0x03: energy in Wh


def number_fields():
    """One record per fixed data coding: (DIF, data LSB first, value in J)."""
    out = []
    for coding, size in ((1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (7, 8)):
        raw = -(2 ** (8 * size - 1)) + 123  # negative: the sign is in the top byte
        out.append((coding, encode_int(raw, size), raw * 3600.0))
    for coding, digits in ((9, 2), (10, 4), (11, 6), (12, 8), (14, 12)):
        raw = int("123456789012"[:digits])
        out.append((coding, encode_bcd(raw, digits), raw * 3600.0))
    out.append((0x0A, encode_bcd(-123, 4), -123 * 3600.0))  # F in the top nibble
    out.append((5, struct.pack("<f", 1.5), 1.5 * 3600))
    return out


@pytest.mark.parametrize("coding, data, value", number_fields(), ids=lambda x: repr(x))
def test_every_fixed_number_coding(coding, data, value):
    fields = [Field(bytes((coding,)) + ENERGY_WH, data)]
    lsb, msb = both(fields)
    assert [r.value for r in lsb.records] == [value]
    assert [decoded(r) for r in msb.records] == [decoded(r) for r in lsb.records]
    assert msb.records == lsb.records


def test_the_twin_is_not_its_own_mirror():
    """The fields reversed here are not palindromes: the 0x76 twin read least significant
    byte first (as if it were 0x72) gives another meter and other values."""
    fields = [
        Field(bytes((coding,)) + ENERGY_WH, data)
        for coding, data, _ in number_fields()
        if len(data) > 1  # a single byte reads the same both ways
    ]
    lsb_frame, msb_frame = twins(fields)
    misread = k.decode_telegram(frame(0x08, 0x30, 0x72, msb_frame[7:-2]))
    lsb = k.decode_telegram(lsb_frame)
    assert (misread.id, misread.manufacturer) != (lsb.id, lsb.manufacturer)
    for wrong, right in zip(misread.records, lsb.records):
        assert wrong.value != right.value, right


DATES = [
    # (record head, data LSB first, value)
    (b"\x02\x6c", encode_date_g(dt.date(2024, 6, 1)), "2024-06-01"),
    (b"\x04\x6d", encode_datetime_f(dt.datetime(2024, 1, 15, 11, 46)), "2024-01-15T11:46"),
    (
        b"\x06\x6d",
        bytes((7,)) + encode_datetime_f(dt.datetime(2016, 7, 22, 8, 0)) + b"\x00",
        "2016-07-22T08:00:07",
    ),  # fmt: skip
    (b"\x03\x6d", bytes((5, 4, 3)), "03:04:05"),  # type J: time of day
]


@pytest.mark.parametrize("head, data, value", DATES, ids=lambda x: repr(x))
def test_dates_and_times(head, data, value):
    lsb, msb = both([Field(head, data)])
    assert lsb.records[0].value == value
    assert msb.records == lsb.records


VARIABLE = [
    # (LVAR, content LSB first (as a 0x72 answer sends it), value)
    (b"\x05", b"olleh", "hello"),  # text, last character first
    (b"\xc3", encode_bcd(123456, 6), 123456 * 3600.0),  # BCD
    (b"\xd2", encode_bcd(1234, 4), -1234 * 3600.0),  # negative BCD
    (b"\xe4", bytes.fromhex("01020304"), "01 02 03 04"),  # binary: a hex dump, wire order
    (b"\x00", b"", ""),  # empty text
]


@pytest.mark.parametrize("lvar, content, value", VARIABLE, ids=lambda x: repr(x))
def test_variable_length_data(lvar, content, value):
    lsb, msb = both([Field(b"\x0d\x03", content, lvar)])
    assert lsb.records[0].value == value
    assert msb.records == lsb.records


def test_plain_text_unit():
    """VIF 0x7C: the unit's text is a multi-byte field too (last character first in a
    0x72 answer, first character first in a 0x76 one)."""
    unit = b"hcnarb"  # "branch" as a 0x72 answer sends it
    lsb = Field(b"\x02\xfc" + bytes((len(unit),)) + unit + b"\x74", bytes.fromhex("0A00"))
    msb = Field(b"\x02\xfc" + bytes((len(unit),)) + unit[::-1] + b"\x74", bytes.fromhex("0A00"))
    a = k.decode_telegram(frame(0x08, 1, 0x72, header(False) + lsb.wire(False)))
    b = k.decode_telegram(frame(0x08, 1, 0x76, header(True) + msb.wire(True)))
    assert a.records[0].text_unit == "branch"
    assert [decoded(r) for r in b.records] == [decoded(r) for r in a.records]
    assert b.records[0].text_unit == "branch"


def test_manufacturer_data_is_not_reversed():
    """DIF 0x0F: the manufacturer's bytes to the end of the frame, structure unknown: kept
    in wire order in both."""
    lsb, msb = both([Field(b"\x0f\x01\x02\x03", b"")])
    assert lsb.records[0].value == msb.records[0].value == "01 02 03"


def test_kamstrup_info_code_and_extension_vifs():
    fields = [
        Field(b"\x02\xff\x22", bytes.fromhex("0104")),  # Kamstrup info code: bits
        Field(b"\x04\xfb\x17", encode_int(-5, 4)),  # reactive power (FB table)
        Field(b"\x04\xfd\x17", encode_int(0x01020304, 4)),  # error flags (FD table)
        Field(b"\x02\xfd\x3c", encode_int(900, 2)),  # nominal transmission period
    ]
    lsb_frame, msb_frame = twins(fields)
    lsb, msb = k.decode_telegram(lsb_frame), k.decode_telegram(msb_frame)
    assert [r.value for r in lsb.records] == [0x0401, -5000.0, 0x01020304, 900.0]
    assert msb.records == lsb.records


def test_the_same_json_and_metrics_as_the_0x72_twin():
    fields = [Field(bytes((coding,)) + ENERGY_WH, data) for coding, data, _ in number_fields()]
    fields += [Field(head, data) for head, data, _ in DATES]
    lsb, msb = both(fields)
    assert k.telegram_json(msb) == k.telegram_json(lsb)
    assert json.loads(k.render_json([k.Reading(48, msb)])) == json.loads(
        k.render_json([k.Reading(48, lsb)])
    )
    assert stable(k.exposition([k.Reading(48, msb)])) == stable(k.exposition([k.Reading(48, lsb)]))


def stable(text: str) -> list:
    """The exposition without the time of the run (kamstrup_last_success_...)."""
    return [line for line in text.splitlines() if not line.startswith("kamstrup_last_success")]


# --- any 0x72 frame and its 0x76 twin ----------------------------------------------------


@st.composite
def fields(draw):
    """A record the encoder of test_properties can build, with its field boundaries."""
    n, storage, tariff, subunit = draw(places())
    function = draw(st.integers(0, 3))
    kind = draw(st.sampled_from(["number", "number", "date", "datetime", "text", "binary"]))
    if kind == "number":
        code, _, _, _ = draw(st.sampled_from(VIFS))
        coding, data, _ = draw(numbers())
        correction = draw(st.none() | st.integers(0, 7))
        vib = bytes((code,)) if correction is None else bytes((code | 0x80, 0x70 + correction))
        lvar, field = (data[:1], data[1:]) if coding == 0x0D else (b"", data)
    elif kind == "date":
        day = draw(st.dates(dt.date(1981, 1, 1), dt.date(2080, 12, 31)))
        coding, vib, lvar, field = 0x02, b"\x6c", b"", encode_date_g(day)
    elif kind == "datetime":
        moment = draw(st.datetimes(dt.datetime(1981, 1, 1), dt.datetime(2080, 12, 31)))
        coding, vib, lvar, field = 0x04, b"\x6d", b"", encode_datetime_f(moment)
    elif kind == "text":
        text = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20))
        coding, vib = 0x0D, bytes((draw(st.sampled_from(VIFS))[0],))
        lvar, field = bytes((len(text),)), text.encode("ascii")[::-1]
    else:
        blob = draw(st.binary(max_size=15))
        coding, vib = 0x0D, bytes((draw(st.sampled_from(VIFS))[0],))
        lvar, field = bytes((0xE0 + len(blob),)), blob
    dib = encode_dib(coding, function, storage, tariff, subunit, n)
    return Field(dib + vib, field, lvar)


@settings(max_examples=400, deadline=None, database=None)
@given(st.lists(fields(), min_size=0, max_size=8), st.integers(0, 250))
def test_any_0x72_frame_and_its_0x76_twin_decode_alike(records, address):
    wire = 0
    kept = []
    for record in records:  # what fits in one long frame
        wire += len(record.wire(False))
        if 12 + wire > 252:
            break
        kept.append(record)
    lsb_frame, msb_frame = twins(kept, address)
    lsb, msb = k.decode_telegram(lsb_frame), k.decode_telegram(msb_frame)
    assert (msb.address, msb.id, msb.manufacturer, msb.signature) == (
        address, IDENT, "KAM", SIGNATURE
    )  # fmt: skip
    assert msb.records == lsb.records
    assert len(msb.records) == len(kept)
    assert k.telegram_json(msb) == k.telegram_json(lsb)


# --- a real CI 0x76 answer --------------------------------------------------------------


def test_apator_elf_heat_meter():
    """A real answer (rscada/libmbus issue #150, tests/data/frames/README.md): libmbus
    refuses it ("Unknown control information 0x76").  Read most significant byte first,
    its values are those of a heat meter: 26.9 and 22.8 degC, 33.4 GJ, 506.785 m3; read
    least significant byte first they would be 690.2 and 822.0 degC.  pyMeterBus 0.8.5,
    which reads 0x76 too, gives the same values (bench/.venv-pymeterbus, by hand)."""
    t = k.decode_telegram(k.parse_hex((FRAMES / "apator_elf_ci76.hex").read_text()))
    assert (t.address, t.ci, t.id) == (1, 0x76, "00619155")
    assert (t.version, t.medium_name, t.access_number, t.status) == (0x51, "heat", 0x5A, 0)
    got = [(r.storage, r.tariff, r.subunit, r.function, r.quantity, r.unit, r.value)
           for r in t.records]  # fmt: skip
    hour = 3600.0
    assert got == [
        (0, 0, 0, "instantaneous", "date", "", "2018-10-09"),
        (0, 0, 0, "instantaneous", "energy", "J", 334065031 * 100.0),
        (0, 0, 0, "instantaneous", "volume", "m3", 506.785),
        (0, 1, 0, "instantaneous", "volume", "m3", 382.799),
        (0, 2, 0, "instantaneous", "volume", "m3", 0.0),
        (0, 3, 0, "instantaneous", "volume", "m3", 0.0),
        (0, 0, 1, "instantaneous", "volume", "m3", 0.0),
        (0, 0, 0, "instantaneous", "volume_flow", "m3/s", 0.0),
        (0, 0, 0, "instantaneous", "power", "W", 0.0),
        (0, 0, 0, "instantaneous", "flow_temperature", "degC", 26.9),
        (0, 0, 0, "instantaneous", "return_temperature", "degC", 22.8),
        (0, 0, 0, "instantaneous", "on_time", "s", 60422 * hour),
        (0, 0, 0, "error", "on_time", "s", 34688 * hour),
        (0, 0, 0, "instantaneous", "any_vif", "", 17012.0),
    ]


def test_apator_elf_through_decode(tmp_path):
    """The command line decodes it as any other answer."""
    try:
        from tools import invoke
    except ImportError:  # pragma: no cover
        from tests.tools import invoke
    result = invoke(["--decode", str(FRAMES / "apator_elf_ci76.hex"), "--output", "-"])
    assert result.exit_code == 0, result.stderr
    assert 'kamstrup_temperature_celsius{meter="00619155",sensor="flow"} 26.9\n' in result.stdout
    assert 'kamstrup_volume_cubic_meters_total{meter="00619155"} 506.785\n' in result.stdout


# --- CI 0x77: the fixed data structure, most significant byte first --------------------


def fixed(msb: bool, counters=(1, 135)) -> bytes:
    """CI 0x73/0x77: ID 12345678, access 5, status 0x00 (BCD counters), litres (0x29),
    counter values in BCD."""
    ident = bytes.fromhex("12345678")
    body = (ident if msb else ident[::-1]) + bytes((5, 0x00, 0x29, 0x29))
    for value in counters:
        data = encode_bcd(value, 8)
        body += data[::-1] if msb else data
    return frame(0x08, 2, 0x77 if msb else 0x73, body)


def test_fixed_structure_msb_first():
    lsb, msb = k.decode_telegram(fixed(False)), k.decode_telegram(fixed(True))
    assert msb.ci == 0x77
    assert msb.id == lsb.id == "12345678"
    assert [r.value for r in lsb.records] == [0.001, 0.135]
    assert msb.records == lsb.records
    assert msb.to_json() == lsb.to_json()


@settings(max_examples=1000, deadline=None, database=None)
@given(
    ci=st.sampled_from([0x76, 0x77]),
    head=st.binary(min_size=12, max_size=12),
    records=st.binary(max_size=240),
)
def test_any_bytes_after_a_0x76_header_decode_or_are_a_frame_error(ci, head, records):
    try:
        telegram = k.decode_telegram(frame(0x08, 1, ci, head + records))
    except k.FrameError as error:
        assert str(error)
        return
    json.loads(k.telegram_json(telegram))
