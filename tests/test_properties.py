"""Properties of the frame and record layers (hypothesis).

(i) Whatever bytes arrive, decode_telegram gives a Telegram or raises FrameError.
(ii) Records built by the small EN 13757-3 encoder below decode back to what was put
in, with the value equal to raw x scale computed exactly here (fractions.Fraction).
The encoder is this test's own: it shares no table or code with the decoder.
"""

from __future__ import annotations

import datetime as dt
import json
import struct
from fractions import Fraction

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import kamstrup_textfile as k

try:
    from tools import shortest_float32_decimal
except ImportError:  # pragma: no cover - when run as a package
    from tests.tools import shortest_float32_decimal

QUICK = settings(max_examples=300, deadline=None, database=None)
MANY = settings(
    max_examples=2000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# The 12-byte header of the MULTICAL 303 heat frame (corpus/kamstrup): ID 82937133,
# KAM, version 0x40, heat, access number 0x43, status 0x10, signature 0.
HEADER = bytes.fromhex("33719382 2D2C 40 04 43 10 0000".replace(" ", ""))
MAX_DATA = 252 - len(HEADER)  # L is at most 255: C, A, CI and 252 data bytes


def frame(c: int, a: int, ci: int, data: bytes) -> bytes:
    """A long frame with correct length, checksum and stop byte (written out here)."""
    body = bytes((c, a, ci)) + data
    assert len(body) <= 255
    return bytes((0x68, len(body), len(body), 0x68)) + body + bytes((sum(body) % 256, 0x16))


def decodes_or_frame_error(buf: bytes) -> None:
    try:
        telegram = k.decode_telegram(buf)
    except k.FrameError as error:
        assert str(error)
        return
    assert isinstance(telegram, k.Telegram)
    json.dumps(telegram.to_json(), allow_nan=False)
    for record in telegram.records:
        assert isinstance(record, k.Record)


# --- (i) any bytes ------------------------------------------------------------------


@QUICK
@given(st.binary(max_size=300))
@example(b"")
@example(b"\x68")
@example(bytes.fromhex("680303680801707916"))
def test_any_bytes(buf):
    decodes_or_frame_error(buf)


@QUICK
@given(
    c=st.sampled_from([0x08, 0x18, 0x28, 0x38, 0x53, 0x73]),
    a=st.integers(0, 255),
    ci=st.sampled_from([0x70, 0x72, 0x73, 0x78, 0x7A]) | st.integers(0, 255),
    data=st.binary(max_size=252),
)
def test_any_data_in_a_valid_frame(c, a, ci, data):
    decodes_or_frame_error(frame(c, a, ci, data))


# Bytes that steer the record parser into its branches: filler, manufacturer blocks,
# DIFs with DIFEs, every data coding, the extension and plain-text VIFs, VIFEs,
# LVAR bytes of each range, dates.
INTERESTING = st.sampled_from(
    [0x2F, 0x0F, 0x1F, 0x8F, 0x0D, 0x8D, 0x05, 0x06, 0x07, 0x0E, 0x84, 0xC4, 0x80, 0x00]
    + [0x7C, 0xFC, 0xFD, 0xFB, 0x7F, 0xFF, 0x6C, 0x6D, 0xED, 0x7B, 0x7D, 0x3C, 0xBC]
    + [0xBF, 0xC3, 0xD3, 0xE3, 0xF0, 0xF4, 0xF5, 0xF6, 0xF7, 0xFE]
).map(lambda b: bytes((b,)))
RECORDISH = st.lists(INTERESTING | st.binary(min_size=1, max_size=8), max_size=60).map(
    lambda parts: b"".join(parts)[:MAX_DATA]
)


@MANY
@given(header=st.just(HEADER) | st.binary(min_size=12, max_size=12), records=RECORDISH)
def test_any_records_after_a_valid_header(header, records):
    decodes_or_frame_error(frame(0x08, 0x01, 0x72, header + records))


@MANY
@given(records=st.binary(max_size=MAX_DATA))
def test_any_record_bytes_after_a_valid_header(records):
    decodes_or_frame_error(frame(0x08, 0x01, 0x72, HEADER + records))


# --- (ii) an encoder and round trips ----------------------------------------------

WH = Fraction(3600)  # J
HOUR = Fraction(3600)  # s


def ten(exponent: int) -> Fraction:
    return Fraction(10) ** exponent


# Primary VIF families: (first code, count, quantity, SI unit, scale of code first+n).
VIF_FAMILIES = [
    (0x00, 8, "energy", "J", lambda n: ten(n - 3) * WH),
    (0x08, 8, "energy", "J", lambda n: ten(n)),
    (0x10, 8, "volume", "m3", lambda n: ten(n - 6)),
    (0x18, 8, "mass", "kg", lambda n: ten(n - 3)),
    (0x20, 4, "on_time", "s", lambda n: Fraction((1, 60, 3600, 86400)[n])),
    (0x24, 4, "operating_time", "s", lambda n: Fraction((1, 60, 3600, 86400)[n])),
    (0x28, 8, "power", "W", lambda n: ten(n - 3)),
    (0x30, 8, "power", "W", lambda n: ten(n) / HOUR),  # J/h
    (0x38, 8, "volume_flow", "m3/s", lambda n: ten(n - 6) / HOUR),  # m3/h
    (0x40, 8, "volume_flow", "m3/s", lambda n: ten(n - 7) / 60),  # m3/min
    (0x48, 8, "volume_flow", "m3/s", lambda n: ten(n - 9)),
    (0x50, 8, "mass_flow", "kg/s", lambda n: ten(n - 3) / HOUR),  # kg/h
    (0x58, 4, "flow_temperature", "degC", lambda n: ten(n - 3)),
    (0x5C, 4, "return_temperature", "degC", lambda n: ten(n - 3)),
    (0x60, 4, "temperature_difference", "K", lambda n: ten(n - 3)),
    (0x64, 4, "external_temperature", "degC", lambda n: ten(n - 3)),
    (0x68, 4, "pressure", "Pa", lambda n: ten(n - 3) * 100000),  # bar
    (0x70, 4, "averaging_duration", "s", lambda n: Fraction((1, 60, 3600, 86400)[n])),
    (0x74, 4, "actuality_duration", "s", lambda n: Fraction((1, 60, 3600, 86400)[n])),
]
VIFS = [
    (first + n, quantity, unit, scale(n))
    for first, count, quantity, unit, scale in VIF_FAMILIES
    for n in range(count)
]
FUNCTIONS = ["instantaneous", "maximum", "minimum", "error"]
INT_CODINGS = {0x01: 1, 0x02: 2, 0x03: 3, 0x04: 4, 0x06: 6, 0x07: 8}  # DIF -> bytes
BCD_CODINGS = {0x09: 2, 0x0A: 4, 0x0B: 6, 0x0C: 8, 0x0E: 12}  # DIF -> digits


def encode_dib(coding: int, function: int, storage: int, tariff: int, subunit: int, n: int):
    """DIF and ``n`` DIFEs: storage bit 0 in the DIF, 4 more bits, 2 tariff bits and
    1 subunit bit in each DIFE, least significant first."""
    assert storage < 2 ** (1 + 4 * n) and tariff < 4**n and subunit < 2**n
    difes = []
    for i in range(n):
        dife = (storage >> (1 + 4 * i)) & 0x0F
        dife |= ((tariff >> (2 * i)) & 0x03) << 4
        dife |= ((subunit >> i) & 0x01) << 6
        difes.append(dife | (0x80 if i < n - 1 else 0))
    dif = coding | function << 4 | (storage & 1) << 6 | (0x80 if n else 0)
    return bytes([dif] + difes)


def encode_int(raw: int, size: int) -> bytes:
    return (raw % 256**size).to_bytes(size, "little")  # two's complement


def encode_bcd(raw: int, digits: int) -> bytes:
    """Packed BCD, least significant byte first; negative: 0xF as the top nibble."""
    if raw < 0:
        text = "f" + f"{-raw:0{digits - 1}d}"
    else:
        text = f"{raw:0{digits}d}"
    assert len(text) == digits
    return bytes.fromhex(text)[::-1]


def encode_date_g(day: dt.date) -> bytes:
    year = day.year % 100
    return bytes((day.day | (year & 0x07) << 5, day.month | (year >> 3) << 4))


def encode_datetime_f(moment: dt.datetime) -> bytes:
    """Type F: minute, hour with the hundred-year bits (5-6) as meters send them, date."""
    hundred_year = (moment.year - 1900) // 100
    return bytes((moment.minute, moment.hour | hundred_year << 5)) + encode_date_g(moment.date())


def shortest_float32(x32: float) -> Fraction:
    return Fraction(shortest_float32_decimal(x32))


@st.composite
def places(draw):
    """(number of DIFEs, storage, tariff, subunit) that the DIFEs can carry."""
    n = draw(st.integers(0, 10))
    storage = draw(st.integers(0, 2 ** (1 + 4 * n) - 1) | st.integers(0, 1))
    tariff = draw(st.integers(0, 4**n - 1))
    subunit = draw(st.integers(0, 2**n - 1))
    return n, storage, tariff, subunit


@st.composite
def numbers(draw):
    """(DIF coding, data bytes, the exact number the meter means)."""
    kind = draw(st.sampled_from(["int", "real32", "bcd", "lvar_bcd", "lvar_negative_bcd"]))
    if kind == "int":
        coding = draw(st.sampled_from(sorted(INT_CODINGS)))
        size = INT_CODINGS[coding]
        raw = draw(st.integers(-(2 ** (8 * size - 1)), 2 ** (8 * size - 1) - 1))
        return coding, encode_int(raw, size), Fraction(raw)
    if kind == "real32":
        # Normal float32s and zero: see test_real32_subnormal_is_the_shortest_decimal.
        x = draw(st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False))
        return 0x05, struct.pack("<f", x), shortest_float32(x)
    if kind == "bcd":
        coding = draw(st.sampled_from(sorted(BCD_CODINGS)))
        digits = BCD_CODINGS[coding]
        raw = draw(st.integers(0, 10**digits - 1) | st.integers(-(10 ** (digits - 1) - 1), 0))
        return coding, encode_bcd(raw, digits), Fraction(raw)
    size = draw(st.integers(0, 9))
    raw = draw(st.integers(0, 10 ** (2 * size) - 1)) if size else 0
    data = encode_bcd(raw, 2 * size) if size else b""
    if kind == "lvar_bcd":
        return 0x0D, bytes((0xC0 + size,)) + data, Fraction(raw)
    return 0x0D, bytes((0xD0 + size,)) + data, Fraction(-raw)


@st.composite
def records(draw):
    """(record bytes, expected (storage, tariff, subunit, function, quantity, unit, value))."""
    n, storage, tariff, subunit = draw(places())
    function = draw(st.integers(0, 3))
    kind = draw(st.sampled_from(["number", "number", "number", "text", "binary", "date"]))
    if kind == "number":
        code, quantity, unit, scale = draw(st.sampled_from(VIFS))
        coding, data, exact = draw(numbers())
        correction = draw(st.none() | st.integers(0, 7))  # VIFE 0x70-0x77: 10^(nnn-6)
        if correction is None:
            vib = bytes((code,))
        else:
            vib = bytes((code | 0x80, 0x70 + correction))
            scale *= ten(correction - 6)
        value = float(exact * scale)
    elif kind == "date":
        code, quantity, unit = draw(st.sampled_from([(0x6C, "date", ""), (0x6D, "datetime", "")]))
        vib = bytes((code,))
        day = draw(st.dates(dt.date(1981, 1, 1), dt.date(2080, 12, 31)))
        if code == 0x6C:
            coding, data, value = 0x02, encode_date_g(day), day.isoformat()
        else:
            moment = dt.datetime.combine(day, draw(st.times()))
            coding, data = 0x04, encode_datetime_f(moment)
            value = f"{day.isoformat()}T{moment.hour:02d}:{moment.minute:02d}"
    else:
        code, quantity, unit, _ = draw(st.sampled_from(VIFS))
        vib = bytes((code,))
        coding = 0x0D
        if kind == "text":  # LVAR 0x00-0xBF: characters, last one first on the wire
            text = draw(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40))
            data = bytes((len(text),)) + text.encode("ascii")[::-1]
            value = text
        else:  # LVAR 0xE0-0xEF: binary, hex dump in wire order
            blob = draw(st.binary(max_size=15))
            data = bytes((0xE0 + len(blob),)) + blob
            value = blob.hex(" ").upper()
    dib = encode_dib(coding, function, storage, tariff, subunit, n)
    expected = (storage, tariff, subunit, FUNCTIONS[function], quantity, unit, value)
    return dib + vib + data, expected


@st.composite
def telegrams(draw):
    """Records (with idle filler between them) that fit in one long frame."""
    built = draw(st.lists(records(), min_size=1, max_size=8))
    payload = b""
    expected = []
    for record, values in built:
        filler = b"\x2f" * draw(st.integers(0, 2))
        if len(payload) + len(filler) + len(record) > MAX_DATA:
            break
        payload += filler + record
        expected.append(values)
    return payload, expected


def decoded(record: k.Record) -> tuple:
    return (
        record.storage,
        record.tariff,
        record.subunit,
        record.function,
        record.quantity,
        record.unit,
        record.value,
    )


@settings(max_examples=500, deadline=None, database=None)
@given(telegrams(), st.integers(0, 250))
def test_round_trip(built, address):
    payload, expected = built
    telegram = k.decode_telegram(frame(0x08, address, 0x72, HEADER + payload))
    assert (telegram.address, telegram.id, telegram.manufacturer) == (address, "82937133", "KAM")
    assert [decoded(r) for r in telegram.records] == expected
    for record, values in zip(telegram.records, expected):
        if isinstance(values[-1], float):  # exactly float(Fraction(raw) * scale)
            assert type(record.value) is float and record.value == values[-1]


@QUICK
@given(records(), st.integers(0, 250))
def test_one_record_round_trip(built, address):
    record, values = built
    (decoded_record,) = k.decode_telegram(frame(0x08, address, 0x72, HEADER + record)).records
    assert decoded(decoded_record) == values
    assert record.startswith(decoded_record.dib + decoded_record.vib)


# --- the encoder itself against real bytes -------------------------------------------


def test_encoder_matches_real_records():
    # MULTICAL 603 (corpus/kamstrup): 84 80 40 14 = volume at subunit 2.
    assert encode_dib(0x04, 0, 0, 0, 2, 2) == bytes.fromhex("848040")
    # MULTICAL 303: 44 = storage 1, 32-bit; 33 = value during error state, 24-bit.
    assert encode_dib(0x04, 0, 1, 0, 0, 0) == bytes.fromhex("44")
    assert encode_dib(0x03, 3, 0, 0, 0, 0) == bytes.fromhex("33")
    # MULTICAL 303 heat: target date 2024-06-01 is 42 6C 01 36.
    assert encode_date_g(dt.date(2024, 6, 1)) == bytes.fromhex("0136")
    # MULTICAL 603: date and time 2024-01-15 11:46 is 04 6D 2E 2B 0F 31.
    assert encode_datetime_f(dt.datetime(2024, 1, 15, 11, 46)) == bytes.fromhex("2E2B0F31")
    # MULTICAL 601 (libmbus): 0C 78, 8 BCD digits of the fabrication number 06855817.
    assert encode_bcd(6855817, 8) == bytes.fromhex("17588506")
    assert encode_bcd(-123, 4) == bytes.fromhex("23F1")
    assert encode_int(-2, 4) == bytes.fromhex("FEFFFFFF")


def test_real32_subnormal_is_the_shortest_decimal():
    for bits in ("0D000000", "01000000", "FFFF7F00", "0D000080"):
        x32 = struct.unpack("<f", bytes.fromhex(bits))[0]
        record = bytes.fromhex("052B" + bits)  # power, W (10^0), 32-bit real
        (decoded_record,) = k.decode_telegram(frame(0x08, 1, 0x72, HEADER + record)).records
        assert decoded_record.value == float(shortest_float32(x32)), bits


def test_real32_not_a_number_is_none():
    for bits in (b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff"):
        record = bytes.fromhex("052B") + bits  # power, W, 32-bit real
        (decoded_record,) = k.decode_telegram(frame(0x08, 1, 0x72, HEADER + record)).records
        assert decoded_record.value is None


def test_no_date_bytes():
    # 00 00 and FF FF are "no date" (type G); FF FF FF FF has the invalid bit set (type F).
    for record in ("026C0000", "026CFFFF", "046D00000000", "046DFFFFFFFF", "046DAE0B0F31"):
        (decoded_record,) = k.decode_telegram(
            frame(0x08, 1, 0x72, HEADER + bytes.fromhex(record))
        ).records
        assert decoded_record.value is None, record
