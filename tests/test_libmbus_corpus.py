"""Layer 2 against libmbus: every frame of rscada/libmbus's test corpus, record by record.

The expected values are libmbus's own normalised output (``.norm.xml``), turned into
our SI units here. Where we differ from libmbus on purpose, the record is in one of
the named lists below, with the reason, and the test asserts what we give instead.
"""

from __future__ import annotations

import re
from fractions import Fraction

import pytest

import kamstrup_textfile as k

try:
    from tools import shortest_float32_decimal
except ImportError:  # pragma: no cover - when run as a package
    from tests.tools import shortest_float32_decimal

try:
    from corpus import LIBMBUS, frames, hex_bytes, norm_records, slave_information
except ImportError:  # tests/ imported as a package
    from tests.corpus import LIBMBUS, frames, hex_bytes, norm_records, slave_information

TEST_FRAMES = frames("test-frames")
ERROR_FRAMES = frames("error-frames")
UNSUPPORTED_FRAMES = frames("unsupported-frames")

# libmbus's normalised unit -> (our SI unit, the factor from libmbus's value to ours).
LIBMBUS_UNITS = {
    "Wh": ("J", Fraction(3600)),
    "J": ("J", Fraction(1)),
    "m^3": ("m3", Fraction(1)),
    "kg": ("kg", Fraction(1)),
    "s": ("s", Fraction(1)),
    "W": ("W", Fraction(1)),
    "J/h": ("W", Fraction(1, 3600)),
    "m^3/h": ("m3/s", Fraction(1, 3600)),
    "m^3/min": ("m3/s", Fraction(1, 60)),
    "m^3/s": ("m3/s", Fraction(1)),
    "°C": ("degC", Fraction(1)),
    "K": ("K", Fraction(1)),
    "bar": ("Pa", Fraction(100000)),
    "V": ("V", Fraction(1)),
    "A": ("A", Fraction(1)),
}
# Units libmbus prints for values without a physical unit (ids, dates, text, custom
# VIFs, H.C.A., reserved): the value is compared as it is and our unit is empty.
UNITLESS = {"", "-", "Reserved", "Units for H.C.A."}

FUNCTIONS = {
    "Instantaneous value": "instantaneous",
    "Maximum value": "maximum",
    "Minimum value": "minimum",
    "Value during error state": "error",
}
# libmbus's function text for a DIF 0x0F / 0x1F manufacturer data block.
MANUFACTURER_BLOCKS = {"Manufacturer specific": 0x0F, "More records follow": 0x1F}

# libmbus's medium text (mbus_data_variable_medium_lookup) -> the header's medium code,
# for every medium in this corpus.
MEDIUM_CODES = {
    "Other": 0x00,
    "Oil": 0x01,
    "Electricity": 0x02,
    "Gas": 0x03,
    "Heat: Outlet": 0x04,
    "Warm water (30-90°C)": 0x06,
    "Water": 0x07,
    "Heat Cost Allocator": 0x08,
    "Heat: Inlet": 0x0C,
    "Heat / Cooling load meter": 0x0D,
    "Bus/System": 0x0E,
    "Cold water": 0x16,
    "Breaker: Electricity": 0x20,
}

# %f: six decimals, so libmbus's value is within 5e-7 of the exact one (in its unit).
PRINTF_F = re.compile(r"-?\d+\.\d{6}")
HALF_LAST_DIGIT = Fraction(5, 10**7)

# --- deliberate differences ---------------------------------------------------

# (a) Type G / F dates that cannot be: libmbus prints the fields as they are, we give
# None (no date rather than a wrong one).
IMPOSSIBLE_DATES = {
    ("ACW_Itron-BM-plus-m", 2): "2000-00-00",
    ("itron_bm_+m", 2): "2000-00-00",
    ("siemens_water", 3): "2000-00-00",
    ("siemens_wfh21", 3): "2000-00-00",
    ("REL-Relay-Padpuls2", 1): "1900-01-00T00:00:00Z",
    # year field 127 (all seven bits set, E1 F1): past the 0-99 a type F year can be;
    # libmbus's century rule makes it 2027
    ("landis+gyr_ultraheat_t230", 32): "2027-01-01T00:00:00Z",
}

# (b) Date and time (VIF 0x6D): libmbus appends "Z" (and ":00" seconds to a type F
# value, which has none), although the meter sends its local time. We print type F as
# 2015-04-02T23:48 and type I (6 bytes, with seconds) as 2016-07-22T08:00:00, no Z.
# Handled by a rule on the record's bytes: see expected_datetime().
TYPE_F = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d")
TYPE_I = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")

# (c) Binary variable-length data: we dump it in wire order like every other hex dump;
# libmbus since commit 9b4b824 prints it LSB-first (only this file expects that).
BINARY_LVAR_REVERSED = {("example_binary16_lvar", 0)}

# (d) 32-bit reals (DIF coding 5): we give the shortest decimal that round-trips the
# float32 (18511.912), libmbus prints the float with %f (18511.912109). Compared with
# a relative tolerance of 1e-7 (float32 has 24 bits: 6e-8), by a rule on the DIF.
REAL32_RELATIVE = Fraction(1, 10**7)
# Our value is the float32 itself (VIF exponent 0): W, flow and return temperature, K.
REAL32_UNSCALED_VIFS = {0x2B, 0x5B, 0x5F, 0x63}

# (e) BCD with non-decimal nibbles ("value during error state" records: BD EB DD DD):
# not a number, we give None; libmbus turns the hex digits into a number.
NON_DECIMAL_BCD = {
    ("ELS_Elster-F96-Plus", 4): "13131113.000000",
    ("ELS_Elster-F96-Plus", 5): "131.113000",
    ("abb_f95", 2): "1311041.300000",
    ("abb_f95", 3): "11.041300",
}

# (f) CI 0x73 fixed data structure: libmbus keeps the raw counters and the units' names;
# we convert to SI. "reserved but historic" is counter 1's unit, a storage-1 value.
# (frame, record) -> (libmbus unit, libmbus value, our storage, quantity, unit, value)
FIXED_STRUCTURE = {
    ("manual_frame2", 0): ("l", "1", 0, "volume", "m3", 1 / 1000),
    ("manual_frame2", 1): ("reserved but historic", "135", 1, "volume", "m3", 135 / 1000),
    ("sen_pollusonic_2", 0): ("kWh", "6531", 0, "energy", "J", 6531 * 3_600_000.0),
    ("sen_pollusonic_2", 1): ("l", "69", 0, "volume", "m3", 69 / 1000),
}

# (g) VIF 0x7B (the 0xFB extension code without its extension bit, so no VIFE): libmbus
# prints an empty record, we keep it as quantity "unknown" with the raw BCD value.
EMPTY_IN_LIBMBUS = {("sen_pollutherm", 2): 302}


def normalise(text: str) -> str:
    """Lower case, punctuation dropped: "More than 10 DIFE´s" -> "more than 10 difes"."""
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^a-z0-9 ]", "", text)
    return " ".join(text.split())


def libmbus_hex2bin(text: str) -> bytes:
    """What libmbus's mbus_hex2bin makes of a .hex file.

    Whitespace is skipped; every other pair of characters is read with strtoul(.., 16),
    which stops at the first non-hex character ("D " is 0x0D); a pair without a hex
    digit ends the input, and so does a lone last character.
    """
    out = bytearray()
    i = 0
    while i + 1 < len(text):
        if text[i].isspace():
            i += 1
            continue
        digits = re.match(r"[0-9A-Fa-f]*", text[i : i + 2]).group()
        i += 2
        if not digits:
            break
        out.append(int(digits, 16))
    return bytes(out)


def expected_datetime(record: k.Record, libmbus: str) -> str:
    """(b): libmbus's text for our date-and-time value."""
    coding = record.dib[0] & 0x0F
    if coding == 0x04:  # type F: minutes
        assert TYPE_F.fullmatch(record.value), record.value
        return record.value + ":00Z"
    assert coding == 0x06, coding  # type I: seconds
    assert TYPE_I.fullmatch(record.value), record.value
    return record.value + "Z"


def decode(path):
    return k.decode_telegram(hex_bytes(path))


def test_corpus_inventory():
    assert len(TEST_FRAMES) == 76
    assert len(ERROR_FRAMES) == 20
    assert len(UNSUPPORTED_FRAMES) == 7
    for path in TEST_FRAMES:
        assert path.with_suffix(".norm.xml").exists(), path.name


@pytest.mark.parametrize("path", TEST_FRAMES, ids=lambda p: p.stem)
def test_hex_is_read_as_libmbus_reads_it(path):
    assert hex_bytes(path) == libmbus_hex2bin(path.read_text(encoding="latin-1"))


@pytest.mark.parametrize("path", TEST_FRAMES, ids=lambda p: p.stem)
def test_header(path):
    telegram = decode(path)
    info = slave_information(path.with_suffix(".norm.xml"))
    # libmbus prints the BCD identification number as a decimal without leading zeros
    # (and the hex digits of a non-decimal one: 500023E).
    assert (telegram.id.lstrip("0") or "0") == info["Id"]
    assert telegram.access_number == int(info["AccessNumber"])
    assert f"{telegram.status:02X}" == info["Status"]
    if telegram.ci == 0x73:  # fixed structure: no manufacturer, version, signature
        assert set(info) == {"Id", "Medium", "AccessNumber", "Status"}
        assert telegram.manufacturer is None and telegram.medium is None
        assert telegram.fixed_medium == info["Medium"].lower()
        return
    assert telegram.ci == 0x72
    assert telegram.manufacturer == info["Manufacturer"]
    assert telegram.version == int(info["Version"])
    assert f"{telegram.signature:04X}" == info["Signature"]
    assert info["Medium"] in MEDIUM_CODES, info["Medium"]
    assert telegram.medium == MEDIUM_CODES[info["Medium"]]


@pytest.mark.parametrize("path", TEST_FRAMES, ids=lambda p: p.stem)
def test_records(path):
    telegram = decode(path)
    expected = norm_records(path.with_suffix(".norm.xml"))
    assert len(telegram.records) == len(expected)
    for index, (libmbus, record) in enumerate(zip(expected, telegram.records)):
        key = (path.stem, index)
        try:
            compare_record(key, libmbus, record, telegram)
        except AssertionError as error:
            raise AssertionError(f"record {index}: {libmbus} vs {record}: {error}") from None


def compare_record(key, libmbus: dict, record: k.Record, telegram: k.Telegram) -> None:
    if key in EMPTY_IN_LIBMBUS:  # (g)
        assert libmbus == {}
        assert record.vib == b"\x7b"
        assert record.quantity == "unknown"
        assert record.value == EMPTY_IN_LIBMBUS[key]
        return
    if key in FIXED_STRUCTURE:  # (f)
        unit, raw, storage, quantity, our_unit, value = FIXED_STRUCTURE[key]
        assert telegram.ci == 0x73
        assert libmbus == {"Function": "Actual value", "Unit": unit, "Value": raw}
        assert (record.storage, record.tariff, record.subunit) == (storage, 0, 0)
        assert record.function == "instantaneous"
        assert (record.quantity, record.unit, record.value) == (quantity, our_unit, value)
        return

    function = libmbus["Function"]
    if function in MANUFACTURER_BLOCKS:
        assert record.dib == bytes((MANUFACTURER_BLOCKS[function],))
        assert record.quantity == "manufacturer_data"
        assert record.function == "instantaneous"
        assert telegram.more_records_follow == (function == "More records follow")
    else:
        assert record.function == FUNCTIONS[function]
        assert record.dib[0] & 0x0F != 0x0F
    assert record.storage == int(libmbus.get("StorageNumber", 0))
    assert record.tariff == int(libmbus.get("Tariff", 0))
    assert record.subunit == int(libmbus.get("Device", 0))
    if "Tariff" in libmbus or "Device" in libmbus:  # libmbus prints them for DIFEs only
        assert len(record.dib) > 1

    unit = libmbus.get("Unit", "")
    if unit in LIBMBUS_UNITS:
        our_unit, factor = LIBMBUS_UNITS[unit]
        assert record.unit == our_unit
    else:
        assert unit in UNITLESS, f"libmbus unit {unit!r} has no conversion here"
        assert record.unit == ""
        factor = Fraction(1)
    if record.vib[:1] in (b"\x7c", b"\xfc"):  # plain-text VIF: libmbus names it Quantity
        assert record.text_unit == libmbus["Quantity"]

    text = libmbus["Value"]
    if key in IMPOSSIBLE_DATES:  # (a)
        assert text == IMPOSSIBLE_DATES[key]
        assert record.vib[0] & 0x7F in (0x6C, 0x6D)
        assert record.value is None
    elif key in NON_DECIMAL_BCD:  # (e)
        assert text == NON_DECIMAL_BCD[key]
        assert record.function == "error"
        assert 0x09 <= record.dib[0] & 0x0F <= 0x0E
        assert record.value is None
    elif key in BINARY_LVAR_REVERSED:  # (c)
        assert record.value == " ".join(reversed(text.split()))
        assert record.value == "96 07 5B 2A 27 A6 93 01 3D B5 1A B3 DC D1 3E 17"
    elif record.vib[:1] in (b"\x6d", b"\xed"):  # (b)
        assert text == expected_datetime(record, text)
    elif PRINTF_F.fullmatch(text):
        compare_number(text, factor, record)
    else:  # dates, text, hex dumps of manufacturer data
        assert record.value == text


def compare_number(text: str, factor: Fraction, record: k.Record) -> None:
    assert isinstance(record.value, (int, float)) and not isinstance(record.value, bool)
    expected = Fraction(text) * factor
    tolerance = HALF_LAST_DIGIT * factor
    if record.dib[0] & 0x0F == 0x05:  # (d)
        tolerance = max(tolerance, abs(expected) * REAL32_RELATIVE)
        if record.vib[0] in REAL32_UNSCALED_VIFS:
            assert repr(record.value) == repr(float(shortest_float32_decimal(record.value)))
    assert abs(Fraction(record.value) - expected) <= tolerance


def test_deliberate_differences_named_here_are_the_only_ones():
    """Every named exception is a record of the corpus (no stale entries)."""
    names = {path.stem: path for path in TEST_FRAMES}
    lists = [
        IMPOSSIBLE_DATES,
        BINARY_LVAR_REVERSED,
        NON_DECIMAL_BCD,
        FIXED_STRUCTURE,
        EMPTY_IN_LIBMBUS,
    ]
    for listing in lists:
        for stem, index in listing:
            assert index < len(norm_records(names[stem].with_suffix(".norm.xml")))


def test_real32_examples():
    # (d) written out: the shortest decimals of the float32s, not libmbus's %f.
    edc = decode(LIBMBUS / "test-frames" / "EDC.hex")
    assert repr(edc.records[14].value) == "18511.912"
    pollustat = decode(LIBMBUS / "test-frames" / "SEN_Pollustat.hex")
    assert repr(pollustat.records[7].value) == "-170.72178"
    assert pollustat.records[11].value == -0.045776367


def test_type_f_local_time_example():
    # (b) written out: MULTICAL 601 clock, libmbus "2011-01-05T15:26:00Z".
    telegram = decode(LIBMBUS / "test-frames" / "kamstrup_multical_601.hex")
    assert telegram.records[16].value == "2011-01-05T15:26"


def test_raw_registers_are_int_whatever_their_coding():
    """BCD raw registers are ints like binary ones (they were floats before 2e11630)."""
    cases = [
        ("abb_delta", 11, 1000000),  # 0C FF 92 00: 8-digit BCD, manufacturer specific
        ("berg_dz_plus", 11, 0),  # 0B FF 12: 6-digit BCD, manufacturer specific
        ("sen_pollutherm", 2, 302),  # 0C 7B: 8-digit BCD, unknown VIF
    ]
    for stem, index, value in cases:
        record = decode(LIBMBUS / "test-frames" / f"{stem}.hex").records[index]
        assert record.quantity in ("manufacturer_specific", "unknown")
        assert type(record.value) is int and record.value == value, (stem, index)


# --- error frames -------------------------------------------------------------

APPLICATION_ERROR_FRAMES = [p for p in ERROR_FRAMES if p.with_suffix(".xml").exists()]
MALFORMED_FRAMES = [p for p in ERROR_FRAMES if not p.with_suffix(".xml").exists()]


def test_error_frames_split():
    assert len(APPLICATION_ERROR_FRAMES) == 10
    assert len(MALFORMED_FRAMES) == 10


@pytest.mark.parametrize("path", APPLICATION_ERROR_FRAMES, ids=lambda p: p.stem)
def test_application_error_frames(path):
    libmbus_error = slave_information(path.with_suffix(".xml"))["Error"]
    with pytest.raises(k.ApplicationError) as info:
        decode(path)
    assert isinstance(info.value, k.FrameError)
    assert normalise(libmbus_error) in normalise(str(info.value))


def test_application_error_texts_normalise():
    assert normalise("More than 10 DIFE´s") == normalise("more than 10 DIFEs")
    assert normalise("Unimplemented CI-Field") == normalise("unimplemented CI field")
    assert normalise("Buffer too long, truncated") == "buffer too long truncated"


def test_application_error_without_a_code_is_unspecified():
    # error-frames/error.hex: CI 0x70 and no error byte at all; libmbus "Unspecified error".
    raw = hex_bytes(LIBMBUS / "error-frames" / "error.hex")
    assert raw == bytes.fromhex("680303680801707916")
    with pytest.raises(k.ApplicationError, match="(?i)unspecified error"):
        k.decode_telegram(raw)


@pytest.mark.parametrize("path", MALFORMED_FRAMES, ids=lambda p: p.stem)
def test_malformed_frames(path):
    with pytest.raises(k.FrameError) as info:
        decode(path)
    assert not isinstance(info.value, k.ApplicationError)
    assert str(info.value).strip()
    if "dife" in path.stem:
        assert "DIFE" in str(info.value)
    if "vife" in path.stem:
        assert "VIFE" in str(info.value)


# --- unsupported frames -------------------------------------------------------


@pytest.mark.parametrize("path", UNSUPPORTED_FRAMES, ids=lambda p: p.stem)
def test_unsupported_frames_give_a_telegram_or_a_frame_error(path):
    raw = libmbus_hex2bin(path.read_text(encoding="latin-1"))
    try:
        telegram = k.decode_telegram(raw)
    except k.FrameError as error:
        assert str(error).strip()
    else:
        assert isinstance(telegram, k.Telegram)


def test_manual_frame1_stray_digit():
    path = LIBMBUS / "unsupported-frames" / "manual_frame1.hex"
    # libmbus reads "D 04 04 68 ..." as 0D 04 04 68 ...: no long frame start.
    raw = libmbus_hex2bin(path.read_text(encoding="latin-1"))
    assert raw == bytes.fromhex("0D040468 53FE5010B116".replace(" ", ""))
    with pytest.raises(k.FrameError, match="start"):
        k.decode_telegram(raw)
    # The corpus helper pairs hex digits across the stray one: an odd count, refused.
    with pytest.raises(ValueError):
        hex_bytes(path)


def test_master_frames_are_not_answers():
    for stem in ("manual_frame4", "manual_frame5", "manual_frame6"):
        with pytest.raises(k.FrameError, match="C field 0x53"):
            decode(LIBMBUS / "unsupported-frames" / f"{stem}.hex")


def test_svm_f22_telegram2_is_one_manufacturer_block():
    telegram = decode(LIBMBUS / "unsupported-frames" / "svm_f22_telegram2.hex")
    assert (telegram.id, telegram.manufacturer) == ("01006089", "SVM")
    assert [r.quantity for r in telegram.records] == ["manufacturer_data"]
    assert telegram.records[0].dib == b"\x1f"
    assert telegram.more_records_follow
    first = decode(LIBMBUS / "test-frames" / "svm_f22_telegram1.hex")
    assert first.more_records_follow and first.id == telegram.id
