#!/usr/bin/env python3
"""Read Kamstrup MULTICAL heat meters over wired M-Bus into a node_exporter textfile.

``kamstrup_textfile.py --once`` opens the serial port (pyserial), reads every
configured meter once (EN 13757-2 link layer, EN 13757-3 application layer,
both implemented here), writes one ``.prom`` file atomically into
node_exporter's textfile directory and exits.  A systemd timer runs it.

Needs Python 3.9+, pyserial and click, nothing else; the single file can be
copied to /usr/local/bin and run with Debian's python3-serial and python3-click.

The module reads top to bottom in the order the data flows:
1. frames (bytes <-> link layer frames), 2. records (telegram decoding),
3. bus (the only code that touches a port), 4. metrics (exposition text),
5. output (atomic write), 6. the click command line.
"""

from __future__ import annotations

import math
import os
import re
import struct
import sys
import time
from typing import Any, Sequence

__version__ = "0.1.0"

# ---------------------------------------------------------------------------
# 1. Frames (EN 13757-2)
# ---------------------------------------------------------------------------

ACK = 0xE5
START_SHORT = 0x10
START_LONG = 0x68
STOP = 0x16

C_SND_NKE = 0x40
C_SND_UD = 0x53
C_REQ_UD2 = 0x5B
FCB = 0x20
ANSWER_C_FIELDS = frozenset((0x08, 0x18, 0x28, 0x38))  # RSP_UD with ACD/DFC bits

ADDRESS_SECONDARY = 0xFD  # 253: the slave selected by secondary address
ADDRESS_ANY = 0xFE  # 254: every slave answers (one meter on the bus)
ADDRESS_BROADCAST = 0xFF


class FrameError(ValueError):
    """A frame or the telegram inside it is malformed."""


class ApplicationError(FrameError):
    """The meter answered with an application error (CI 0x70)."""


def short_frame(c: int, a: int) -> bytes:
    return bytes((START_SHORT, c, a, (c + a) & 0xFF, STOP))


def long_frame(c: int, a: int, ci: int, data: bytes = b"") -> bytes:
    body = bytes((c, a, ci)) + data
    length = len(body)
    if length > 255:
        raise FrameError(f"frame body of {length} bytes is longer than 255")
    return bytes((START_LONG, length, length, START_LONG)) + body + bytes((sum(body) & 0xFF, STOP))


def snd_nke(address: int) -> bytes:
    return short_frame(C_SND_NKE, address)


def req_ud2(address: int, fcb: bool) -> bytes:
    return short_frame(C_REQ_UD2 | (FCB if fcb else 0), address)


def select_secondary(secondary: str) -> bytes:
    """SND_UD to 253 that selects the meter whose identification number is ``secondary``.

    Manufacturer, version and medium are wildcards (FF FF, FF, FF).
    """
    ident = bytes.fromhex(secondary)[::-1]
    return long_frame(C_SND_UD, ADDRESS_SECONDARY, 0x52, ident + b"\xff\xff\xff\xff")


class _Plain:
    """Equality and repr from ``__slots__``: what dataclasses give, without their import."""

    __slots__ = ()

    def _key(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other):
        return type(other) is type(self) and self._key() == other._key()

    __hash__ = None

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


class LongFrame(_Plain):
    __slots__ = ("c", "a", "ci", "data")

    def __init__(self, c: int, a: int, ci: int, data: bytes):
        self.c = c
        self.a = a
        self.ci = ci
        self.data = data


def long_frame_length(buf: bytes) -> int | None:
    """The whole length of the long frame at the start of ``buf``, once its header is in.

    None while fewer than 4 bytes are there; FrameError when the header is impossible.
    """
    if len(buf) < 4:
        return None
    if buf[0] != START_LONG or buf[3] != START_LONG:
        raise FrameError(f"bad long frame start {buf[:4].hex(' ').upper()}")
    if buf[1] != buf[2]:
        raise FrameError(f"length bytes differ: 0x{buf[1]:02X} and 0x{buf[2]:02X}")
    if buf[1] < 3:
        raise FrameError(f"length 0x{buf[1]:02X} is too short for C, A and CI")
    return buf[1] + 6


def parse_long_frame(buf: bytes) -> LongFrame:
    """Check a whole long frame ``68 L L 68 C A CI ... CS 16`` and take it apart."""
    if len(buf) < 4:
        raise FrameError(f"frame of {len(buf)} bytes is too short")
    length = long_frame_length(buf)
    assert length is not None
    if len(buf) < length:
        raise FrameError(f"frame truncated: {len(buf)} of {length} bytes")
    if len(buf) > length:
        raise FrameError(f"{len(buf) - length} bytes after the end of the frame")
    body = buf[4:-2]
    checksum = sum(body) & 0xFF
    if buf[-2] != checksum:
        raise FrameError(f"checksum 0x{buf[-2]:02X}, expected 0x{checksum:02X}")
    if buf[-1] != STOP:
        raise FrameError(f"stop byte 0x{buf[-1]:02X}, expected 0x16")
    c = body[0]
    if c not in ANSWER_C_FIELDS:
        raise FrameError(f"C field 0x{c:02X} is not an answer (RSP_UD)")
    return LongFrame(c, body[1], body[2], bytes(body[3:]))


def parse_hex(text: str) -> bytes:
    """Hex digits in any case, separated or not by white space (the libmbus .hex layout)."""
    for number, line in enumerate(text.splitlines(), 1):
        bad = re.search(r"[^0-9A-Fa-f\s]", line)
        if bad:
            raise FrameError(f"line {number}: {bad.group()!r} is not a hex digit")
    digits = "".join(text.split())
    if not digits:
        raise FrameError("no hex digits")
    if len(digits) % 2:
        raise FrameError(f"odd number of hex digits ({len(digits)})")
    return bytes.fromhex(digits)


def split_frames(data: bytes) -> list:
    """The long frames one after another in ``data``."""
    frames = []
    pos = 0
    while pos < len(data):
        if data[pos] != START_LONG:
            raise FrameError(f"no frame at byte {pos}: 0x{data[pos]:02X} is not 0x68")
        length = long_frame_length(data[pos : pos + 4])
        if length is None or pos + length > len(data):
            raise FrameError(f"truncated frame at byte {pos}: {len(data) - pos} bytes left")
        frames.append(data[pos : pos + length])
        pos += length
    return frames


# ---------------------------------------------------------------------------
# 2. Records (EN 13757-3)
# ---------------------------------------------------------------------------

MEDIUMS = {
    0x00: "other",
    0x01: "oil",
    0x02: "electricity",
    0x03: "gas",
    0x04: "heat",
    0x05: "steam",
    0x06: "warm water",
    0x07: "water",
    0x08: "heat cost allocator",
    0x09: "compressed air",
    0x0A: "cooling (outlet)",
    0x0B: "cooling (inlet)",
    0x0C: "heat (inlet)",
    0x0D: "heat/cooling",
    0x0E: "bus/system component",
    0x0F: "unknown",
    0x10: "irrigation water",
    0x11: "water data logger",
    0x12: "gas data logger",
    0x13: "gas converter",
    0x14: "calorific value",
    0x15: "hot water",
    0x16: "cold water",
    0x17: "dual register water",
    0x18: "pressure",
    0x19: "A/D converter",
    0x1A: "smoke detector",
    0x1B: "room sensor",
    0x1C: "gas detector",
    0x20: "breaker (electricity)",
    0x21: "valve (gas or water)",
    0x25: "customer unit",
    0x28: "waste water",
    0x29: "garbage",
    0x2A: "carbon dioxide",
    0x31: "communication controller",
    0x32: "unidirectional repeater",
    0x33: "bidirectional repeater",
    0x36: "radio converter (system side)",
    0x37: "radio converter (meter side)",
}

# Fixed data structure (CI 0x73): 4-bit medium and 6-bit counter units.
FIXED_MEDIUMS = (
    "other", "oil", "electricity", "gas", "heat", "steam", "hot water", "water",
    "heat cost allocator", "reserved", "gas", "heat", "hot water", "water",
    "heat cost allocator", "reserved",
)  # fmt: skip

APPLICATION_ERRORS = {
    0: "unspecified error",
    1: "unimplemented CI field",
    2: "buffer too long, truncated",
    3: "too many records",
    4: "premature end of record",
    5: "more than 10 DIFEs",
    6: "more than 10 VIFEs",
    7: "reserved",
    8: "application busy",
    9: "too many readouts",
}

FUNCTIONS = ("instantaneous", "maximum", "minimum", "error")


class Record(_Plain):
    """One data record, its value already in SI base units."""

    __slots__ = (
        "storage", "tariff", "subunit", "function", "quantity", "unit", "value",
        "dib", "vib", "modifiers", "manufacturer_vife", "text_unit",
    )  # fmt: skip

    def __init__(
        self, storage, tariff, subunit, function, quantity, unit, value,
        dib=b"", vib=b"", modifiers=(), manufacturer_vife=b"", text_unit="",
    ):  # fmt: skip
        self.storage = storage
        self.tariff = tariff
        self.subunit = subunit
        self.function = function
        self.quantity = quantity
        self.unit = unit
        self.value = value
        self.dib = dib  # DIF and DIFEs as sent
        self.vib = vib  # VIF and VIFEs as sent
        self.modifiers = modifiers  # combinable VIFEs, by name
        self.manufacturer_vife = manufacturer_vife  # after a manufacturer-specific VIF(E)
        self.text_unit = text_unit  # the unit of a plain-text VIF (0x7C/0xFC)

    @property
    def current(self) -> bool:
        return (
            self.storage == 0
            and self.tariff == 0
            and self.subunit == 0
            and self.function == "instantaneous"
        )

    def to_json(self) -> dict:
        out = {
            "storage": self.storage,
            "tariff": self.tariff,
            "subunit": self.subunit,
            "function": self.function,
            "quantity": self.quantity,
            "unit": self.unit,
            "value": self.value,
            "dib": self.dib.hex(),
            "vib": self.vib.hex(),
        }
        if self.modifiers:
            out["modifiers"] = list(self.modifiers)
        if self.text_unit:
            out["text_unit"] = self.text_unit
        return out


class Telegram(_Plain):
    """A decoded RSP_UD: the meter's header and its data records."""

    __slots__ = (
        "address", "ci", "id", "manufacturer", "version", "medium", "access_number",
        "status", "signature", "records", "more_records_follow", "fixed_medium",
    )  # fmt: skip

    def __init__(
        self, address: int, ci: int, id: str | None = None, manufacturer: str | None = None,
        version: int | None = None, medium: int | None = None,
        access_number: int | None = None, status: int | None = None,
        signature: int | None = None, records: list | None = None,
        more_records_follow: bool = False, fixed_medium: str | None = None,
    ):  # fmt: skip
        self.address = address
        self.ci = ci
        self.id = id
        self.manufacturer = manufacturer
        self.version = version
        self.medium = medium
        self.access_number = access_number
        self.status = status
        self.signature = signature
        self.records = [] if records is None else records
        self.more_records_follow = more_records_follow
        self.fixed_medium = fixed_medium  # CI 0x73 has its own 4-bit medium table

    @property
    def medium_name(self) -> str:
        if self.fixed_medium is not None:
            return self.fixed_medium
        if self.medium is None:
            return "unknown"
        return MEDIUMS.get(self.medium, f"reserved 0x{self.medium:02X}")

    def to_json(self) -> dict:
        out = self.header_json()
        out["records"] = [r.to_json() for r in self.records]
        return out

    def header_json(self) -> dict:
        return {
            "address": self.address,
            "id": self.id,
            "manufacturer": self.manufacturer,
            "version": self.version,
            "medium": self.medium_name,
            "medium_code": self.medium,
            "access_number": self.access_number,
            "status": self.status,
            "signature": self.signature,
        }


# --- VIF tables -------------------------------------------------------------
#
# Each table maps a 7-bit code to (quantity, unit, kind, num, den): the SI value
# is raw * num / den.  ``kind`` says how the data field is read: "number",
# "date" (type G), "datetime" (type F/I/J by length), "bits" (unsigned bit
# field), "id" (an identification number, kept as an integer), "text".
# num/den are exact integers so that int/int true division gives the decimal
# the meter meant, correctly rounded (3949 * 1/100 -> 39.49).

_DURATION_SECONDS = (1, 60, 3600, 86400)


def _pow10(exponent: int) -> tuple:
    return (10**exponent, 1) if exponent >= 0 else (1, 10**-exponent)


def _scaled(quantity, unit, first, count, exponent0, num=1, den=1, kind="number"):
    """Codes ``first .. first+count-1`` with a decimal exponent ``exponent0 + n``."""
    table = {}
    for n in range(count):
        p, q = _pow10(exponent0 + n)
        table[first + n] = (quantity, unit, kind, p * num, q * den)
    return table


def _durations(quantity, first, units=_DURATION_SECONDS, kind="number"):
    return {first + n: (quantity, "s", kind, seconds, 1) for n, seconds in enumerate(units)}


def _single(code, quantity, unit="", kind="number"):
    return {code: (quantity, unit, kind, 1, 1)}


PRIMARY_VIFS: dict = {
    **_scaled("energy", "J", 0x00, 8, -3, num=3600),  # 10^(n-3) Wh
    **_scaled("energy", "J", 0x08, 8, 0),  # 10^n J
    **_scaled("volume", "m3", 0x10, 8, -6),
    **_scaled("mass", "kg", 0x18, 8, -3),
    **_durations("on_time", 0x20),
    **_durations("operating_time", 0x24),
    **_scaled("power", "W", 0x28, 8, -3),
    **_scaled("power", "W", 0x30, 8, 0, den=3600),  # 10^n J/h
    **_scaled("volume_flow", "m3/s", 0x38, 8, -6, den=3600),  # m3/h
    **_scaled("volume_flow", "m3/s", 0x40, 8, -7, den=60),  # m3/min
    **_scaled("volume_flow", "m3/s", 0x48, 8, -9),
    **_scaled("mass_flow", "kg/s", 0x50, 8, -3, den=3600),  # kg/h
    **_scaled("flow_temperature", "degC", 0x58, 4, -3),
    **_scaled("return_temperature", "degC", 0x5C, 4, -3),
    **_scaled("temperature_difference", "K", 0x60, 4, -3),
    **_scaled("external_temperature", "degC", 0x64, 4, -3),
    **_scaled("pressure", "Pa", 0x68, 4, -3, num=100000),  # bar
    **_single(0x6C, "date", kind="date"),
    **_single(0x6D, "datetime", kind="datetime"),
    **_single(0x6E, "hca_units"),
    **_single(0x6F, "reserved"),
    **_durations("averaging_duration", 0x70),
    **_durations("actuality_duration", 0x74),
    **_single(0x78, "fabrication_number", kind="id"),
    **_single(0x79, "enhanced_identification", kind="id"),
    **_single(0x7A, "bus_address"),
    **_single(0x7E, "any_vif"),
}

# VIF 0xFD: the main extension table.
FD_VIFES: dict = {
    **_scaled("credit", "currency", 0x00, 4, -3),
    **_scaled("debit", "currency", 0x04, 4, -3),
    **_single(0x08, "access_number"),
    **_single(0x09, "medium"),
    **_single(0x0A, "manufacturer"),
    **_single(0x0B, "parameter_set_id", kind="id"),
    **_single(0x0C, "model_version", kind="id"),
    **_single(0x0D, "hardware_version", kind="id"),
    **_single(0x0E, "firmware_version", kind="id"),
    **_single(0x0F, "software_version", kind="id"),
    **_single(0x10, "customer_location", kind="id"),
    **_single(0x11, "customer", kind="id"),
    **_single(0x12, "access_code_user", kind="id"),
    **_single(0x13, "access_code_operator", kind="id"),
    **_single(0x14, "access_code_system_operator", kind="id"),
    **_single(0x15, "access_code_developer", kind="id"),
    **_single(0x16, "password", kind="id"),
    **_single(0x17, "error_flags", kind="bits"),
    **_single(0x18, "error_mask", kind="bits"),
    **_single(0x19, "reserved"),
    **_single(0x1A, "digital_output", kind="bits"),
    **_single(0x1B, "digital_input", kind="bits"),
    **_single(0x1C, "baud_rate", "Bd"),
    **_single(0x1D, "response_delay_time", "bit_times"),
    **_single(0x1E, "retry"),
    **_single(0x1F, "remote_control", kind="bits"),
    **_single(0x20, "first_storage_number"),
    **_single(0x21, "last_storage_number"),
    **_single(0x22, "storage_block_size"),
    **_single(0x23, "reserved"),
    **_durations("storage_interval", 0x24),
    **_single(0x28, "storage_interval_months", "month"),
    **_single(0x29, "storage_interval_years", "year"),
    **_single(0x2A, "operator_specific"),
    **_single(0x2B, "time_step"),
    **_durations("duration_since_last_readout", 0x2C),
    **_single(0x30, "tariff_start", kind="datetime"),
    **_durations("tariff_duration", 0x31, (60, 3600, 86400)),
    **_durations("tariff_period", 0x34),
    **_single(0x38, "tariff_period_months", "month"),
    **_single(0x39, "tariff_period_years", "year"),
    **_single(0x3A, "dimensionless"),
    **_single(0x3B, "reserved"),
    **{code: ("reserved", "", "number", 1, 1) for code in range(0x3C, 0x40)},
    **_scaled("voltage", "V", 0x40, 16, -9),
    **_scaled("current", "A", 0x50, 16, -12),
    **_single(0x60, "reset_counter"),
    **_single(0x61, "cumulation_counter"),
    **_single(0x62, "control_signal", kind="bits"),
    **_single(0x63, "day_of_week"),
    **_single(0x64, "week_number"),
    **_single(0x65, "day_change_time", kind="datetime"),
    **_single(0x66, "parameter_activation_state", kind="bits"),
    **_single(0x67, "special_supplier_information", kind="id"),
    **_durations("duration_since_last_cumulation", 0x68, (3600, 86400)),
    **_single(0x6A, "duration_since_last_cumulation_months", "month"),
    **_single(0x6B, "duration_since_last_cumulation_years", "year"),
    **_durations("battery_operating_time", 0x6C, (3600, 86400)),
    **_single(0x6E, "battery_operating_time_months", "month"),
    **_single(0x6F, "battery_operating_time_years", "year"),
    **_single(0x70, "battery_change_datetime", kind="datetime"),
    **_single(0x71, "rf_level", "dBm"),
    **_single(0x72, "daylight_saving", kind="bits"),
    **_single(0x73, "listening_window", kind="bits"),
    **{0x74: ("remaining_battery_life", "s", "number", 86400, 1)},
    **_single(0x75, "meter_stop_count"),
    **_single(0x76, "manufacturer_container", kind="id"),
}

_FT3 = 28316846592  # 1 ft3 = 0.028316846592 m3 (num, with den 10^12)
_USGAL = 3785411784  # 1 US gallon = 0.003785411784 m3 (den 10^12)

# VIF 0xFB: the first extension table (large units, non-SI units).
FB_VIFES: dict = {
    **_scaled("energy", "J", 0x00, 2, -1, num=3600 * 10**6),  # 10^(n-1) MWh
    **_scaled("reactive_energy", "varh", 0x02, 2, 3),  # 10^n kvarh
    **_scaled("energy", "J", 0x08, 2, 8),  # 10^(n-1) GJ
    **_scaled("energy", "J", 0x0C, 4, 1, num=41868),  # 10^(n-1) MCal; 1 MCal = 4186800 J
    **_scaled("volume", "m3", 0x10, 2, 2),
    **_scaled("mass", "kg", 0x18, 2, 5),  # 10^(n+2) t
    **_scaled("relative_humidity", "percent", 0x1A, 2, -1),
    **{0x21: ("volume", "m3", "number", _FT3, 10**13)},  # 0.1 ft3
    **_scaled("volume", "m3", 0x22, 2, -13, num=_USGAL),  # 10^(n-1) US gallons
    **{0x24: ("volume_flow", "m3/s", "number", _USGAL, 60 * 10**15)},  # 0.001 gal/min
    **{0x25: ("volume_flow", "m3/s", "number", _USGAL, 60 * 10**12)},  # gal/min
    **{0x26: ("volume_flow", "m3/s", "number", _USGAL, 3600 * 10**12)},  # gal/h
    **_scaled("power", "W", 0x28, 2, 5),  # 10^(n-1) MW
    **_scaled("power", "W", 0x30, 2, 8, den=3600),  # 10^(n-1) GJ/h
    **_scaled("flow_temperature", "degF", 0x58, 4, -3),
    **_scaled("return_temperature", "degF", 0x5C, 4, -3),
    **_scaled("temperature_difference", "K", 0x60, 4, -3, num=5, den=9),  # in degF
    **_scaled("external_temperature", "degF", 0x64, 4, -3),
    **_scaled("temperature_limit", "degF", 0x70, 4, -3),
    **_scaled("temperature_limit", "degC", 0x74, 4, -3),
    **_scaled("cumulative_max_power", "W", 0x78, 8, -3),
}

# Combinable (orthogonal) VIFEs after a VIF with the extension bit.
_PER_TIME = {0x20: ("per_second", 1), 0x21: ("per_minute", 60), 0x22: ("per_hour", 3600),
             0x23: ("per_day", 86400)}  # fmt: skip
COMBINABLE_VIFES: dict = {
    0x24: "per_week",
    0x25: "per_month",
    0x26: "per_year",
    0x27: "per_revolution",
    0x28: "increment_per_input_pulse_0",
    0x29: "increment_per_input_pulse_1",
    0x2A: "increment_per_output_pulse_0",
    0x2B: "increment_per_output_pulse_1",
    0x2C: "per_liter",
    0x2D: "per_m3",
    0x2E: "per_kg",
    0x2F: "per_kelvin",
    0x30: "per_kwh",
    0x31: "per_gj",
    0x32: "per_kw",
    0x33: "per_kelvin_liter",
    0x34: "per_volt",
    0x35: "per_ampere",
    0x36: "multiplied_by_second",
    0x37: "multiplied_by_second_per_volt",
    0x38: "multiplied_by_second_per_ampere",
    0x39: "start_date_of",
    0x3A: "uncorrected",
    0x3B: "positive_accumulation",
    0x3C: "negative_accumulation",
    0x3D: "non_metric",
    0x3E: "value_at_base_condition",
    0x3F: "obis_declaration",
    0x40: "lower_limit",
    0x41: "lower_limit_exceed_count",
    0x42: "begin_first_lower_limit_exceed",
    0x43: "end_first_lower_limit_exceed",
    0x46: "begin_last_lower_limit_exceed",
    0x47: "end_last_lower_limit_exceed",
    0x48: "upper_limit",
    0x49: "upper_limit_exceed_count",
    0x4A: "begin_first_upper_limit_exceed",
    0x4B: "end_first_upper_limit_exceed",
    0x4E: "begin_last_upper_limit_exceed",
    0x4F: "end_last_upper_limit_exceed",
    0x7C: "reserved",
    0x7E: "future_value",
}
RECORD_ERRORS = {
    0x00: "none",
    0x01: "too_many_difes",
    0x02: "storage_not_implemented",
    0x03: "subunit_not_implemented",
    0x04: "tariff_not_implemented",
    0x05: "function_not_implemented",
    0x06: "data_class_not_implemented",
    0x07: "data_size_not_implemented",
    0x0B: "too_many_vifes",
    0x0C: "illegal_vif_group",
    0x0D: "illegal_vif_exponent",
    0x0E: "vif_dif_mismatch",
    0x0F: "unimplemented_action",
    0x15: "no_data_available",
    0x16: "data_overflow",
    0x17: "data_underflow",
    0x18: "data_error",
    0x1C: "premature_end_of_record",
}

MAX_DIFES = 10
MAX_VIFES = 10

# Data field lengths by the low nibble of the DIF (None: variable or special).
_DATA_LENGTHS = (0, 1, 2, 3, 4, 4, 6, 8, 0, 1, 2, 3, 4, None, 6, None)


def _decode_bcd(data: bytes) -> int | None:
    """Packed BCD, least significant byte first; 0xF in the top nibble means negative.

    None when a nibble is not a decimal digit (meters send FF.. for "no value").
    """
    negative = False
    digits = data[::-1].hex()
    if digits[0] == "f":
        negative = True
        digits = digits[1:] or "0"
    if not digits.isdigit():
        return None
    value = int(digits)
    return -value if negative else value


def _decode_date_g(data: bytes) -> str | None:
    day = data[0] & 0x1F
    month = data[1] & 0x0F
    year = ((data[0] & 0xE0) >> 5) | ((data[1] & 0xF0) >> 1)
    return _iso_date(year, month, day)


def _iso_date(year: int, month: int, day: int) -> str | None:
    if year > 99 or not 1 <= month <= 12 or not 1 <= day <= _days_in_month(year, month):
        return None
    return f"{2000 + year if year < 81 else 1900 + year:04d}-{month:02d}-{day:02d}"


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        return 29 if year % 4 == 0 else 28  # 2000 is a leap year; 1981-1999 by 4
    return 30 if month in (4, 6, 9, 11) else 31


def _decode_datetime(data: bytes) -> str | None:
    """Type F (4 bytes, minutes), type I (6 bytes, seconds) or type J (3 bytes, time)."""
    if len(data) == 3:  # type J: time of day
        sec, minute, hour = data[0] & 0x3F, data[1] & 0x3F, data[2] & 0x1F
        if sec > 59 or minute > 59 or hour > 23:
            return None
        return f"{hour:02d}:{minute:02d}:{sec:02d}"
    if len(data) == 6:  # type I: seconds first
        seconds = data[0] & 0x3F
        data = data[1:]
    elif len(data) == 4:
        seconds = None
    else:
        return None
    if data[0] & 0x80:  # IV: the time is invalid
        return None
    minute, hour = data[0] & 0x3F, data[1] & 0x1F
    date = _decode_date_g(data[2:4])
    if date is None or minute > 59 or hour > 23 or (seconds is not None and seconds > 59):
        return None
    if seconds is None:
        return f"{date}T{hour:02d}:{minute:02d}"
    return f"{date}T{hour:02d}:{minute:02d}:{seconds:02d}"


def _real32_decimal(data: bytes):
    """The shortest decimal that a 32-bit real stands for, as an exact (numerator,
    denominator) pair; None for NaN and infinities."""
    (value,) = struct.unpack("<f", data)
    if not math.isfinite(value):
        return None
    for digits in range(1, 10):
        text = f"{value:.{digits}g}"
        try:
            if struct.pack("<f", float(text)) == data:
                return _decimal_ratio(text)
        except OverflowError:  # rounded past the largest 32-bit real
            continue
    return value.as_integer_ratio()


def _decimal_ratio(text: str) -> tuple:
    """'18511.912' -> (18511912, 1000), '1.8e-44' -> (18, 10**45): exact, no float."""
    mantissa, _, exponent = text.partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = int(whole + fraction)
    power = (int(exponent) if exponent else 0) - len(fraction)
    return (digits * 10**power, 1) if power >= 0 else (digits, 10**-power)


def _scale(raw, num: int, den: int, offset=None):
    """raw * num / den as the float nearest the exact result (raw: int or (n, d) pair)."""
    if isinstance(raw, tuple):
        raw_num, raw_den = raw
    else:
        raw_num, raw_den = raw, 1
    if offset is None:
        den *= raw_den
        return float(raw_num * num) if den == 1 else (raw_num * num) / den
    from fractions import Fraction

    return float(Fraction(raw_num, raw_den) * num / den + offset)


def _fahrenheit_to_celsius(value: float) -> float:
    from fractions import Fraction

    return float((Fraction(str(value)) - 32) * 5 / 9)


class _Vib(_Plain):
    """What a VIF and its VIFEs say: quantity, SI unit, how to read and scale the data."""

    __slots__ = (
        "quantity", "unit", "kind", "num", "den", "modifiers", "manufacturer_vife",
        "text_unit", "offset", "fahrenheit", "raw", "scaled",
    )  # fmt: skip

    def __init__(self, quantity: str, unit: str, kind: str, num: int, den: int, text_unit=""):
        self.quantity = quantity
        self.unit = unit
        self.kind = kind
        self.num = num
        self.den = den
        self.modifiers: tuple = ()
        self.manufacturer_vife = b""
        self.text_unit = text_unit
        self.offset: Any = None
        self.fahrenheit = False
        self.raw = b""  # the VIF and VIFEs as sent
        self.scaled = False  # a plain number: raw integer * num / den, nothing else


_VIB_CACHE: dict = {}  # VIF+VIFE bytes -> _Vib (never mutated once made)
_VIF_CACHE: dict = {}  # the same for a lone VIF, by its value


def _finish_vib(vib: _Vib, raw: bytes) -> _Vib:
    vib.raw = bytes(raw)
    vib.scaled = (
        vib.kind == "number"
        and vib.offset is None
        and not vib.fahrenheit
        and vib.quantity not in _RAW_QUANTITIES
    )
    return vib


def _read_vib(payload: bytes, pos: int, end: int) -> tuple:
    """The VIF and its VIFEs at ``pos``; returns (_Vib, new position).

    A meter sends the same few VIBs in every answer: each is parsed once.
    """
    if pos >= end:
        raise FrameError(f"record ends before its VIF at byte {pos}")
    vif = payload[pos]
    vib = _VIF_CACHE.get(vif)  # the common case: one byte, seen before
    if vib is not None:
        return vib, pos + 1
    if vif & 0x7F == 0x7C:  # plain text: the unit is part of the VIB, not cached
        vib, stop = _parse_vib(payload, pos, end)
        return _finish_vib(vib, payload[pos:stop]), stop
    stop = pos + 1
    while payload[stop - 1] & 0x80:
        if stop >= end:
            raise FrameError(f"record ends inside its VIFEs at byte {stop}")
        stop += 1
        if stop - pos - 1 > MAX_VIFES:
            raise FrameError(f"more than {MAX_VIFES} VIFEs at byte {pos}")
    key = payload[pos:stop]
    vib = _VIB_CACHE.get(key)
    if vib is None:
        vib = _finish_vib(_parse_vib(key, 0, len(key))[0], key)
        if stop == pos + 1:
            _VIF_CACHE[vif] = vib
        elif len(_VIB_CACHE) < 4096:
            _VIB_CACHE[key] = vib
    return vib, stop


def _parse_vib(payload: bytes, pos: int, end: int) -> tuple:
    start = pos
    vif = payload[pos]
    pos += 1
    code = vif & 0x7F
    text_unit = ""
    if code == 0x7C:  # plain-text VIF: a length byte and ASCII (last character first)
        if pos >= end:
            raise FrameError(f"plain-text VIF without its length at byte {pos}")
        length = payload[pos]
        if pos + 1 + length > end:
            raise FrameError(f"plain-text VIF of {length} bytes runs past the frame")
        text_unit = payload[pos + 1 : pos + 1 + length][::-1].decode("latin-1")
        pos += 1 + length
    vifes = []
    extension = vif & 0x80
    while extension:
        if pos >= end:
            raise FrameError(f"record ends inside its VIFEs at byte {pos}")
        vifes.append(payload[pos])
        extension = payload[pos] & 0x80
        pos += 1
        if len(vifes) > MAX_VIFES:
            raise FrameError(f"more than {MAX_VIFES} VIFEs at byte {start}")
    manufacturer = b""
    rest = vifes
    if code == 0x7C:
        spec = ("plain_text_unit", "", "number", 1, 1)
    elif code == 0x7F:  # manufacturer specific: keep every VIFE, they name the register
        spec = ("manufacturer_specific", "", "number", 1, 1)
        manufacturer = bytes(vifes)
        rest = []
    elif code in (0x7B, 0x7D):
        if vifes:
            table = FB_VIFES if code == 0x7B else FD_VIFES
            spec = table.get(vifes[0] & 0x7F) or ("reserved", "", "number", 1, 1)
            rest = vifes[1:]
        else:  # an extension VIF without its VIFE: nothing says what it is
            spec = ("unknown", "", "number", 1, 1)
    else:
        spec = PRIMARY_VIFS[code]
    quantity, unit, kind, num, den = spec
    vib = _Vib(quantity, unit, kind, num, den, text_unit=text_unit)
    vib.manufacturer_vife = manufacturer
    if rest:
        _apply_vifes(vib, rest)
    if vib.unit == "degF":  # converted to degC as the value is read
        vib.unit = "degC"
        vib.fahrenheit = True
    return vib, pos


def _apply_vifes(vib: _Vib, vifes: Sequence[int]) -> None:
    modifiers = []
    for i, vife in enumerate(vifes):
        code = vife & 0x7F
        if code == 0x7F:  # the rest is the manufacturer's
            vib.manufacturer_vife = bytes(vifes[i + 1 :])
            modifiers.append("manufacturer_specific")
            break
        if code < 0x20:
            modifiers.append("error_" + RECORD_ERRORS.get(code, f"reserved_{code:02x}"))
        elif code in _PER_TIME:
            name, seconds = _PER_TIME[code]
            modifiers.append(name)
            vib.den *= seconds
            vib.unit = f"{vib.unit}/s" if vib.unit else "1/s"
        elif 0x70 <= code <= 0x77:  # multiplicative correction 10^(nnn-6)
            p, q = _pow10(code - 0x76)
            vib.num *= p
            vib.den *= q
            modifiers.append(f"correction_factor_1e{code - 0x76}")
        elif 0x78 <= code <= 0x7B:  # additive correction 10^(nn-3) in the VIF's unit
            from fractions import Fraction

            p, q = _pow10(code - 0x7B)
            vib.offset = (vib.offset or 0) + Fraction(p, q) * vib.num / vib.den
            modifiers.append(f"correction_offset_1e{code - 0x7B}")
        elif code == 0x7D:
            vib.num *= 1000
            modifiers.append("correction_factor_1e3")
        elif 0x50 <= code <= 0x6F:
            modifiers.append(f"limit_exceed_0x{code:02x}")
        else:
            modifiers.append(COMBINABLE_VIFES.get(code, f"reserved_0x{code:02x}"))
    vib.modifiers = tuple(modifiers)


_INTEGER_CODINGS = frozenset((1, 2, 3, 4, 6, 7))
_FIXED_NUMBER_CODINGS = _INTEGER_CODINGS | {0x09, 0x0A, 0x0B, 0x0C, 0x0E}  # and BCD


def _read_data(payload: bytes, pos: int, end: int, coding: int, vib: _Vib, kind: str) -> tuple:
    """The data field at ``pos`` by the DIF's coding; returns (value, new position)."""
    length = _DATA_LENGTHS[coding]
    if coding == 0x0D:  # variable length: LVAR byte first
        if pos >= end:
            raise FrameError(f"variable-length record without LVAR at byte {pos}")
        lvar = payload[pos]
        pos += 1
        if lvar <= 0xBF:
            length, how = lvar, "text"
        elif lvar <= 0xCF:
            length, how = lvar - 0xC0, "bcd"
        elif lvar <= 0xDF:
            length, how = lvar - 0xD0, "-bcd"
        elif lvar <= 0xEF:
            length, how = lvar - 0xE0, "binary"
        elif lvar <= 0xF4:
            length, how = 4 * (lvar - 0xEC), "binary"
        elif lvar == 0xF5:
            length, how = 48, "binary"
        elif lvar == 0xF6:
            length, how = 64, "binary"
        else:
            raise FrameError(f"reserved LVAR 0x{lvar:02X} at byte {pos - 1}")
        if pos + length > end:
            raise FrameError(f"variable-length data of {length} bytes runs past the frame")
        data = payload[pos : pos + length]
        pos += length
        if how == "text":
            return data[::-1].decode("latin-1"), pos
        if how == "binary":
            return data.hex(" ").upper(), pos
        value = _decode_bcd(data) if data else 0
        if value is not None and how == "-bcd":
            value = -value
        return _number(value, vib), pos
    if pos + length > end:
        raise FrameError(f"record data of {length} bytes runs past the frame at byte {pos}")
    data = payload[pos : pos + length]
    pos += length
    if length == 0:
        return None, pos
    if kind == "date" and length == 2:
        return _decode_date_g(data), pos
    if kind == "datetime" and length in (3, 4, 6):
        return _decode_datetime(data), pos
    if coding == 0x05:
        return _number(_real32_decimal(data), vib), pos
    if coding >= 0x09:
        value = _decode_bcd(data)
        if kind in ("id", "bits"):
            return value, pos
        return _number(value, vib), pos
    if kind in ("bits", "id"):
        return int.from_bytes(data, "little"), pos
    if vib.quantity in _RAW_QUANTITIES:
        return int.from_bytes(data, "little", signed=True), pos
    return _number(int.from_bytes(data, "little", signed=True), vib), pos


_RAW_QUANTITIES = frozenset(("manufacturer_specific", "unknown"))  # no unit: kept unscaled


def _number(raw, vib: _Vib):
    if raw is None:
        return None
    if vib.kind == "id" or vib.quantity in _RAW_QUANTITIES:
        return raw if isinstance(raw, int) else raw[0] / raw[1]
    value = _scale(raw, vib.num, vib.den, vib.offset)
    return _fahrenheit_to_celsius(value) if vib.fahrenheit else value


_ONE_BYTE = tuple(bytes((i,)) for i in range(256))

# Manufacturer-specific registers (VIF 0x7F/0xFF + VIFEs) that are unsigned bit
# fields, by manufacturer: Kamstrup's info code is FF 22.
BIT_FIELD_REGISTERS = {"KAM": frozenset((b"\x22",))}


def decode_records(payload: bytes, start: int = 0, manufacturer: str | None = None) -> tuple:
    """The data records of a variable data structure; returns (records, more_follow)."""
    bit_fields = BIT_FIELD_REGISTERS.get(manufacturer or "", frozenset())
    records = []
    pos = start
    end = len(payload)
    more = False
    while pos < end:
        dif = payload[pos]
        if dif == 0x2F:  # idle filler
            pos += 1
            continue
        if dif in (0x0F, 0x1F):  # manufacturer data to the end of the frame
            data = payload[pos + 1 :]
            more = dif == 0x1F
            records.append(
                Record(
                    0,
                    0,
                    0,
                    "instantaneous",
                    "manufacturer_data",
                    "",
                    data.hex(" ").upper(),
                    dib=bytes((dif,)),
                )  # fmt: skip
            )
            break
        if dif & 0x0F == 0x0F:
            raise FrameError(f"reserved special DIF 0x{dif:02X} at byte {pos}")
        dib_start = pos
        storage = (dif >> 6) & 0x01
        tariff = 0
        subunit = 0
        pos += 1
        extension = dif & 0x80
        n = 0
        while extension:  # DIFEs: storage number, tariff and subunit bits, LSB first
            if pos >= end:
                raise FrameError(f"record ends inside its DIFEs at byte {pos}")
            dife = payload[pos]
            pos += 1
            if n >= MAX_DIFES:
                raise FrameError(f"more than {MAX_DIFES} DIFEs at byte {dib_start}")
            storage |= (dife & 0x0F) << (1 + 4 * n)
            tariff |= ((dife >> 4) & 0x03) << (2 * n)
            subunit |= ((dife >> 6) & 0x01) << n
            n += 1
            extension = dife & 0x80
        dib = payload[dib_start:pos] if n else _ONE_BYTE[dif]
        vib, pos = _read_vib(payload, pos, end)
        coding = dif & 0x0F
        if vib.scaled and coding in _FIXED_NUMBER_CODINGS:  # most records: a scaled number
            stop = pos + _DATA_LENGTHS[coding]
            if stop > end:
                raise FrameError(f"record data runs past the frame at byte {pos}")
            if coding < 8:
                raw = int.from_bytes(payload[pos:stop], "little", signed=True)
            else:
                raw = _decode_bcd(payload[pos:stop])
            if raw is None:
                value = None
            else:
                value = float(raw * vib.num) if vib.den == 1 else raw * vib.num / vib.den
            pos = stop
        else:
            kind = vib.kind
            if vib.manufacturer_vife in bit_fields and vib.quantity == "manufacturer_specific":
                kind = "bits"
            value, pos = _read_data(payload, pos, end, coding, vib, kind)
        records.append(
            Record(
                storage,
                tariff,
                subunit,
                FUNCTIONS[(dif >> 4) & 0x03],
                vib.quantity,
                vib.unit,
                value,
                dib,
                vib.raw,
                vib.modifiers,
                vib.manufacturer_vife,
                vib.text_unit,
            )  # fmt: skip
        )
    return records, more


def _manufacturer_code(raw: int) -> str:
    return "".join(chr(((raw >> shift) & 0x1F) + 64) for shift in (10, 5, 0))


def _bcd_id(data: bytes) -> str:
    return data[::-1].hex().upper()


# EN 1434-3 fixed data structure counter units: (quantity, unit, num, den).
_FIXED_UNITS: dict = {
    0x02: ("energy", "J", 3600, 1), 0x03: ("energy", "J", 36000, 1),
    0x04: ("energy", "J", 360000, 1), 0x05: ("energy", "J", 3600000, 1),
    0x06: ("energy", "J", 36000000, 1), 0x07: ("energy", "J", 360000000, 1),
    0x08: ("energy", "J", 3600000000, 1), 0x09: ("energy", "J", 36000000000, 1),
    0x0A: ("energy", "J", 360000000000, 1),
    **{0x0B + n: ("energy", "J", 10 ** (3 + n), 1) for n in range(9)},  # kJ .. 100 GJ
    **{0x14 + n: ("power", "W", 10**n, 1) for n in range(9)},  # W .. 100 MW
    **{0x1D + n: ("power", "W", 10 ** (3 + n), 3600) for n in range(9)},  # kJ/h .. 100 GJ/h
    **{0x26 + n: ("volume", "m3", 1, 10 ** (6 - n)) for n in range(6)},  # ml .. 100 l
    **{0x2C + n: ("volume", "m3", 10**n, 1) for n in range(3)},
    **{0x2F + n: ("volume_flow", "m3/s", 1, 10 ** (6 - n) * 3600) for n in range(6)},
    **{0x35 + n: ("volume_flow", "m3/s", 10**n, 3600) for n in range(3)},
    0x38: ("flow_temperature", "degC", 1, 1000),
    0x39: ("hca_units", "", 1, 1),
    0x3F: ("dimensionless", "", 1, 1),
}  # fmt: skip


def _decode_fixed(telegram: Telegram, data: bytes) -> None:
    """CI 0x73: identification, access number, status, medium and units, two counters."""
    if len(data) != 16:
        raise FrameError(f"fixed data structure of {len(data)} bytes, expected 16")
    telegram.id = _bcd_id(data[0:4])
    telegram.access_number = data[4]
    telegram.status = data[5]
    type1, type2 = data[6], data[7]
    medium = ((type1 & 0xC0) >> 6) | ((type2 & 0xC0) >> 4)
    telegram.fixed_medium = FIXED_MEDIUMS[medium]
    binary = telegram.status & 0x80
    units = []
    for type_byte, counter in ((type1, data[8:12]), (type2, data[12:16])):
        code = type_byte & 0x3F
        storage = 0
        if code == 0x3E:  # the same unit as counter 1, a historic value
            code, storage = type1 & 0x3F, 1
        quantity, unit, num, den = _FIXED_UNITS.get(code, ("reserved", "", 1, 1))
        raw = int.from_bytes(counter, "little") if binary else _decode_bcd(counter)
        value = None if raw is None else _scale(raw, num, den)
        units.append(Record(storage, 0, 0, "instantaneous", quantity, unit, value))
    telegram.records = units


def decode_telegram(buf: bytes) -> Telegram:
    """A whole RSP_UD frame to a Telegram; FrameError (or ApplicationError) otherwise."""
    frame = parse_long_frame(bytes(buf))
    telegram = Telegram(address=frame.a, ci=frame.ci)
    data = frame.data
    if frame.ci == 0x70:
        code = data[0] if data else 0
        reason = APPLICATION_ERRORS.get(code, f"application error 0x{code:02X}")
        raise ApplicationError(f"meter reports an application error: {reason}")
    if frame.ci == 0x72:
        if len(data) < 12:
            raise FrameError(f"header of {len(data)} bytes, expected 12")
        telegram.id = _bcd_id(data[0:4])
        telegram.manufacturer = _manufacturer_code(data[4] | data[5] << 8)
        telegram.version = data[6]
        telegram.medium = data[7]
        telegram.access_number = data[8]
        telegram.status = data[9]
        telegram.signature = data[10] | data[11] << 8
        start = 12
    elif frame.ci == 0x7A:
        if len(data) < 4:
            raise FrameError(f"short header of {len(data)} bytes, expected 4")
        telegram.access_number = data[0]
        telegram.status = data[1]
        telegram.signature = data[2] | data[3] << 8
        start = 4
    elif frame.ci == 0x78:
        start = 0
    elif frame.ci == 0x73:
        _decode_fixed(telegram, data)
        return telegram
    else:
        raise FrameError(f"CI field 0x{frame.ci:02X} is not a data answer")
    telegram.records, telegram.more_records_follow = decode_records(
        data, start, telegram.manufacturer
    )
    return telegram


def merge_telegrams(telegrams: Sequence[Telegram]) -> Telegram:
    """One reading from the telegrams of a multi-telegram answer, records in order."""
    first = telegrams[0]
    if len(telegrams) == 1:
        return first
    merged = Telegram(**{name: getattr(first, name) for name in Telegram.__slots__})
    merged.records = []
    for telegram in telegrams[:-1]:  # drop the empty DIF 0x1F that only said "more follow"
        records = telegram.records
        if records and records[-1].dib == b"\x1f" and not records[-1].value:
            records = records[:-1]
        merged.records.extend(records)
    merged.records.extend(telegrams[-1].records)
    merged.more_records_follow = telegrams[-1].more_records_follow
    return merged


# ---------------------------------------------------------------------------
# 3. Bus: the only code that touches a port
# ---------------------------------------------------------------------------


class BusError(Exception):
    """A meter could not be read: no answer, a corrupt answer, a port problem."""


class PortError(BusError):
    """The port itself failed (an adapter unplugged, a hang-up): not retried."""


try:  # pyserial lets termios.error, which is not an OSError, out of its POSIX port
    from termios import error as _TermiosError
except ImportError:  # pragma: no cover - not POSIX

    class _TermiosError(Exception):
        pass


PORT_ERRORS = (OSError, _TermiosError)  # pyserial's SerialException is an OSError

BYTE_BITS = 11  # 8E1: start, 8 data, parity, stop
MAX_TELEGRAMS = 16  # "more records follow" is followed at most this often
READ_SLICE = 0.05  # seconds a single port read may block; the deadline is ours
STALL = 0.2  # seconds an answer that has begun may pause on top of its bytes' wire time
LONGEST_ANSWER = 261  # bytes: 68 L L 68, 255 bytes of body, CS 16


def wire_seconds(nbytes: int, baudrate: int) -> float:
    return nbytes * BYTE_BITS / baudrate


def slowest_answer(baudrate: int) -> float:
    """The latest a slave may start its answer: 330 bit times + 50 ms (EN 13757-2)."""
    return 330 / baudrate + 0.05


# What a tty says when its USB adapter has gone away (a hang-up).
_HANGUP_SIGNS = ("Input/output error", "returned no data", "No such device")


def _reason(exc: BaseException) -> str:
    """What the system said, on one line: 'Input/output error', not "(5, 'Input/...')"."""
    strerror = getattr(exc, "strerror", None)
    if strerror:
        return _one_line(strerror)
    args = exc.args
    if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):
        return _one_line(args[1])
    return _one_line(str(exc)) or type(exc).__name__


class Bus:
    """An M-Bus master on a pyserial-like port (anything with ``read(n)`` and ``write(b)``).

    ``timeout`` is how long a meter may stay silent before its answer starts (at least
    330 bit times + 50 ms, EN 13757-2's limit for a slave), counted from the end of the
    request.  Once an answer has begun, the rest gets its wire time on top (twice, for
    adapters that deliver in bursts, plus STALL), however late it began.  Before a
    retry the line must be quiet, so that the rest of an answer cut off or late does
    not pass for the answer to the retry.  The port's own read timeout should be short
    (READ_SLICE): this class keeps the deadlines.  Whatever the port raises ends the
    read of that meter at once with a PortError.
    """

    def __init__(self, port, *, baudrate=2400, timeout=1.0, retries=2, pause=0.1, log=None):
        self.port = port
        self.baudrate = baudrate
        # Never less than the standard lets a slave take: an answer that came after we
        # gave up would pass for the answer to the next request (another address's E5).
        self.timeout = max(timeout, slowest_answer(baudrate))
        self.retries = retries
        self.pause = pause
        self.log = log
        self.clock = time.monotonic
        self._deadline = 0.0  # the answer to the last request must have begun by then
        self._last = 0.0  # when the last byte came

    # -- raw I/O ---------------------------------------------------------

    def _io(self, doing: str, call, *args):
        try:
            return call(*args)
        except PORT_ERRORS as exc:
            reason = _reason(exc)
            if any(sign in reason for sign in _HANGUP_SIGNS):
                reason += " (is the M-Bus adapter still plugged in?)"
            raise PortError(f"port failed while {doing}: {reason}") from None

    def _send(self, frame: bytes, timeout: float | None = None) -> None:
        reset = getattr(self.port, "reset_input_buffer", None)
        if reset is not None:  # a late answer to an earlier request must not pass for this one
            self._io("discarding old input", reset)
        if self.log:
            self.log(f"> {frame.hex(' ').upper()}")
        self._io("writing", self.port.write, frame)
        flush = getattr(self.port, "flush", None)
        if flush is not None:
            self._io("writing", flush)
        # The slave's time starts once the request has left; its answer's first byte is
        # in once its own 11 bits are.  (flush() waits for the wire on a real UART, not
        # on a pty or a USB adapter: counting the request again costs a few ms at most.)
        wire = wire_seconds(len(frame) + 1, self.baudrate)
        self._deadline = self.clock() + wire + (self.timeout if timeout is None else timeout)

    def _fill(self, buf: bytearray, n: int) -> bool:
        """Read until ``buf`` holds ``n`` bytes; False when they do not come in time."""
        while len(buf) < n:
            limit = self._deadline
            if buf:  # the answer has begun: the rest gets its time from the last byte
                rest = wire_seconds(n - len(buf), self.baudrate)
                limit = max(limit, self._last + STALL + 2 * rest)
            if self.clock() >= limit:
                return False
            chunk = self._io("reading", self.port.read, n - len(buf))
            if chunk:
                buf += chunk
                self._last = self.clock()
        return True

    def _answer(self, request: bytes, want_frame: bool) -> bytes:
        """The slave's answer to ``request``: the byte E5, or a whole long frame.

        Skips line noise before the start byte and an echo of the request.
        """
        buf = bytearray()
        try:
            while True:
                if not self._fill(buf, 1):
                    raise BusError(_silence(self.timeout))
                first = buf[0]
                if first == request[0]:  # perhaps our own request, echoed by the adapter
                    if self._fill(buf, len(request)) and buf[: len(request)] == request:
                        self._trace("echo", buf[: len(request)])
                        del buf[: len(request)]
                        continue
                if first == ACK and not want_frame:
                    self._trace("<", buf[:1])
                    return b"\xe5"
                if first == START_LONG and want_frame:
                    if not self._fill(buf, 4):
                        raise BusError(_truncated(buf, 4))
                    try:
                        length = long_frame_length(bytes(buf[:4]))
                    except FrameError:
                        length = None
                    if length is not None:
                        if not self._fill(buf, length):
                            raise BusError(_truncated(buf, length))
                        self._trace("<", buf[:length])
                        return bytes(buf[:length])
                self._trace("noise", buf[:1])
                del buf[0]
        except BusError:
            if buf:
                self._trace("<", buf)
            raise

    def _quiet(self) -> None:
        """Wait until the line has been quiet for ``pause`` (and a few bytes' time).

        Whatever comes meanwhile (the rest of a cut-off answer, a late one) is dropped.
        A line that never stops talking is given up on after the longest answer's time.
        """
        quiet = max(self.pause, wire_seconds(4, self.baudrate))
        start = last = self.clock()
        give_up = start + quiet + 2 * wire_seconds(LONGEST_ANSWER, self.baudrate) + STALL
        dropped = bytearray()
        while True:
            now = self.clock()
            if now - last >= quiet or now >= give_up:
                break
            chunk = self._io("reading", self.port.read, LONGEST_ANSWER)
            if chunk:
                dropped += chunk
                last = self.clock()
        if dropped:
            self._trace("late", dropped)

    def _trace(self, what: str, data) -> None:
        if self.log:
            self.log(f"{what} {bytes(data).hex(' ').upper()}")

    # -- requests ----------------------------------------------------------

    def _attempts(self, what: str, action):
        """Run ``action`` until it succeeds, at most 1 + retries times, on a quiet line."""
        reason = ""
        for attempt in range(1 + self.retries):
            if attempt:
                self._quiet()
            try:
                return action()
            except PortError:  # the port itself: asking again will not help
                raise
            except ApplicationError as exc:  # the meter answered: asking again will not help
                raise BusError(str(exc)) from None
            except (BusError, FrameError) as exc:
                reason = str(exc)
                if self.log:
                    self.log(f"! {what}: {reason}")
        tries = 1 + self.retries
        raise BusError(f"{what}: {reason} (after {tries} {'try' if tries == 1 else 'tries'})")

    def _deselect(self) -> None:
        """SND_NKE to 253: only a meter that is still selected answers, so silence is fine."""
        frame = snd_nke(ADDRESS_SECONDARY)
        self._send(frame, timeout=slowest_answer(self.baudrate))
        try:
            self._answer(frame, want_frame=False)
        except PortError:
            raise
        except BusError:
            pass

    def _ack(self, frame: bytes, what: str) -> None:
        def once():
            self._send(frame)
            self._answer(frame, want_frame=False)

        self._attempts(what, once)

    def read(self, address: int | str) -> Telegram:
        """Read one meter: a primary address (0-250, 254) or an 8-digit secondary address.

        "More records follow" is followed with the FCB toggled, a retry keeps the FCB (so
        the meter sends the same telegram again); a meter that answers a toggled FCB
        with the telegram it sent before, or that never stops, is a failed read.
        """
        if isinstance(address, str):
            target = ADDRESS_SECONDARY
            self._deselect()
            self._ack(select_secondary(address), f"selecting secondary address {address}")
        else:
            target = address
            self._ack(snd_nke(address), "SND_NKE")
        telegrams: list = []
        fcb = True  # after SND_NKE the first REQ_UD2 carries FCB=1
        while True:
            request = req_ud2(target, fcb)

            def once(request=request):
                self._send(request)
                telegram = decode_telegram(self._answer(request, want_frame=True))
                if target not in (ADDRESS_ANY, ADDRESS_SECONDARY) and telegram.address != target:
                    raise BusError(f"answer from address {telegram.address}, not {target}")
                if isinstance(address, str) and telegram.id != address:
                    raise BusError(f"answer from meter {telegram.id}, not {address}")
                return telegram

            telegram = self._attempts("REQ_UD2", once)
            if telegrams and _same_reading(telegram, telegrams[-1]):
                raise BusError(
                    f"telegram {len(telegrams) + 1} repeats telegram {len(telegrams)} "
                    "although the FCB was toggled: the meter ignores the FCB"
                )
            telegrams.append(telegram)
            if not telegram.more_records_follow:
                return merge_telegrams(telegrams)
            if len(telegrams) >= MAX_TELEGRAMS:
                raise BusError(
                    f"still 'more records follow' after {MAX_TELEGRAMS} telegrams: gave up"
                )
            fcb = not fcb

    def ping(self, address: int) -> bool:
        """Whether a meter at this primary address answers SND_NKE (one try: for --scan)."""
        frame = snd_nke(address)
        self._send(frame)
        try:
            self._answer(frame, want_frame=False)
        except PortError:
            raise
        except BusError:
            return False
        return True


def _same_reading(a: Telegram, b: Telegram) -> bool:
    return a.id == b.id and a.records == b.records


def _silence(timeout: float) -> str:
    return f"no answer within {timeout:g} s"


def _truncated(buf: bytearray, expected: int) -> str:
    return f"answer cut off after {len(buf)} of {expected} bytes"


def open_port(url: str, baudrate: int, wait: float = 10.0):
    """Open the serial port or pyserial URL exclusively, 8E1, with a short read slice.

    A port locked by another run is tried again until ``wait`` seconds have passed.
    Errors become a BusError with one line saying what to do.
    """
    import errno

    import serial  # pyserial

    deadline = time.monotonic() + wait
    while True:
        try:
            port = serial.serial_for_url(
                url,
                baudrate=baudrate,
                bytesize=serial.EIGHTBITS,
                parity=serial.PARITY_EVEN,
                stopbits=serial.STOPBITS_ONE,
                timeout=READ_SLICE,
                write_timeout=5,
                exclusive=True,
                do_not_open=True,
            )
            port.open()
            return port
        except ValueError as exc:
            raise BusError(f"port {url}: {_one_line(exc)}") from None
        except PORT_ERRORS as exc:
            code = getattr(exc, "errno", None)
            if code is None and len(exc.args) == 2 and isinstance(exc.args[0], int):
                code = exc.args[0]  # termios.error
            text = str(exc)
            if code in (errno.EAGAIN, errno.EBUSY) or "exclusively lock" in text:
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                holders = port_holders(url)
                who = f" (open in {holders})" if holders else ""
                raise BusError(f"port {url} is busy: another program has locked it{who}") from None
            if code == errno.ENOENT:
                raise BusError(
                    f"port {url} does not exist: is the M-Bus adapter plugged in "
                    "(see 10-usbports.rules for /dev/ttymeterBus)?"
                ) from None
            if code == errno.EACCES:
                raise BusError(
                    f"permission denied on {url}: add the user to the dialout group "
                    "or install 10-usbports.rules"
                ) from None
            if isinstance(exc, _TermiosError):
                raise BusError(f"port {url} cannot be configured: {_reason(exc)}") from None
            raise BusError(f"port {url}: {_reason(exc)}") from None


def port_holders(device: str) -> str:
    """The other processes that have ``device`` open, e.g. 'screen (pid 812)', or ''.

    Linux only (/proc/PID/fd), and only the processes this user may look into.
    """
    try:
        node = os.stat(device)
    except (OSError, ValueError):  # a URL, or no such device
        return ""
    found = []
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return ""
    for pid in pids:
        if int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (node.st_dev, node.st_ino):
                try:
                    with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
                        name = f.read().strip()
                except OSError:
                    name = "?"
                found.append(f"{name} (pid {pid})")
                break
    return ", ".join(found)


def _one_line(text) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------
# 4. Metrics: telegrams to Prometheus exposition text (and to JSON)
# ---------------------------------------------------------------------------

NAMESPACE = "kamstrup"

# Kamstrup info code (manufacturer register FF 22): bit -> flag name.  Bits 0-11 are
# common to the 303/403/603 (corpus/kamstrup/README.md); bits 12-31 exist in the
# 32-bit code of the 403/603 (MULTICAL 603 technical description, "information code
# types on serial communication", as also listed by wmbusmeters' kamheat driver).
INFO_FLAGS = (
    (0, "supply_voltage_interrupted"),
    (1, "low_battery"),
    (2, "external_alarm"),
    (3, "t1_above_range"),
    (4, "t2_above_range"),
    (5, "t1_below_range"),
    (6, "t2_below_range"),
    (7, "invalid_temperature_difference"),
    (8, "v1_air"),
    (9, "v1_wrong_flow_direction"),
    (11, "v1_flow_above_qs"),
    (12, "in_a1_leakage"),
    (13, "in_b1_leakage"),
    (14, "in_a1_a2_external_alarm"),
    (15, "in_b1_b2_external_alarm"),
    (16, "v1_communication_error"),
    (17, "v1_wrong_pulse_figure"),
    (18, "in_a2_leakage"),
    (19, "in_b2_leakage"),
    (20, "t3_above_range"),
    (21, "t3_below_range"),
    (22, "v2_communication_error"),
    (23, "v2_wrong_pulse_figure"),
    (24, "v2_air"),
    (25, "v2_wrong_flow_direction"),
    (27, "v2_flow_above_qs"),
    (28, "burst_water_loss"),
    (29, "burst_water_penetration"),
    (30, "leakage_water_loss"),
    (31, "leakage_water_penetration"),
)

# Kamstrup manufacturer registers after VIF 0xFF: VIFE -> (base name, counter?).
KAMSTRUP_REGISTERS = {
    b"\x07": ("e8_cubic_meters_celsius", True),
    b"\x08": ("e9_cubic_meters_celsius", True),
    b"\x22": ("info_code", False),
}

# Kamstrup manufacturer VIFEs after a standard VIF that keep the quantity's name:
# 86 FF 02 is cooling energy E3 (named above), A5 FF 21 the 403's operating time.
KAMSTRUP_QUALIFIERS = frozenset((("energy", b"\x02"), ("operating_time", b"\x21")))

# quantity -> (base name, counter?, extra labels)
QUANTITY_NAMES = {
    "energy": ("energy_joules", True, ()),
    "volume": ("volume_cubic_meters", True, ()),
    "mass": ("mass_kilograms", True, ()),
    "on_time": ("on_time_seconds", True, ()),
    "operating_time": ("operating_time_seconds", True, ()),
    "power": ("power_watts", False, ()),
    "volume_flow": ("volume_flow_cubic_meters_per_second", False, ()),
    "mass_flow": ("mass_flow_kilograms_per_second", False, ()),
    "flow_temperature": ("temperature_celsius", False, (("sensor", "flow"),)),
    "return_temperature": ("temperature_celsius", False, (("sensor", "return"),)),
    "external_temperature": ("temperature_celsius", False, (("sensor", "external"),)),
    "temperature_difference": ("temperature_difference_kelvin", False, ()),
    "pressure": ("pressure_pascals", False, ()),
    "reset_counter": ("resets", True, ()),
    "cumulation_counter": ("cumulations", True, ()),
    "meter_stop_count": ("meter_stops", True, ()),
    "date": ("date_timestamp_seconds", False, ()),
    "datetime": ("clock_timestamp_seconds", False, ()),
}

UNIT_SUFFIXES = {
    "J": "joules",
    "m3": "cubic_meters",
    "kg": "kilograms",
    "s": "seconds",
    "W": "watts",
    "m3/s": "cubic_meters_per_second",
    "kg/s": "kilograms_per_second",
    "degC": "celsius",
    "K": "kelvin",
    "Pa": "pascals",
    "V": "volts",
    "A": "amperes",
    "percent": "percent",
}

FUNCTION_PREFIXES = {"instantaneous": "", "maximum": "max_", "minimum": "min_", "error": "error_"}

# HELP texts of the families whose meaning is known; others get a generic one.
HELP = {
    "up": "1 if the meter at this address was read in this run, 0 if not.",
    "read_duration_seconds": "Time spent reading the meter at this address in this run.",
    "last_success_timestamp_seconds": "Unix time of the last successful read of this address.",
    "meter_info": "Identity of the meter that answered at this address.",
    "energy_joules_total": "Heat energy E1 (register 1), current value.",
    "cooling_energy_joules_total": "Cooling energy E3 (negative contributions), current value.",
    "volume_cubic_meters_total": "Volume V1, current value.",
    "on_time_seconds_total": "Hour counter: time the meter has been on.",
    "operating_time_seconds_total": "Operating time of the meter.",
    "error_on_time_seconds_total": "Hours in error: time the meter has spent in an error state.",
    "temperature_celsius": "Temperature: sensor flow is t1, return is t2.",
    "temperature_difference_kelvin": "Temperature difference t1 - t2.",
    "power_watts": "Current heat power.",
    "max_power_watts": "Maximum heat power of the current period.",
    "volume_flow_cubic_meters_per_second": "Current volume flow.",
    "max_volume_flow_cubic_meters_per_second": "Maximum volume flow of the current period.",
    "info_code": "Kamstrup info code (bit field; 0 means no error).",
    "info_flag": "1 if this Kamstrup info code condition is present now, else 0.",
    "e8_cubic_meters_celsius_total": "Kamstrup E8: volume times flow temperature t1.",
    "e9_cubic_meters_celsius_total": "Kamstrup E9: volume times return temperature t2.",
    "error_flags": "Error flags of the meter (bit field, FD 17).",
    "clock_timestamp_seconds": "The meter's clock, its local time read as this host's time zone.",
    "register_date_timestamp_seconds": "Stored date (e.g. the target date), local midnight.",
    "manufacturer_register": "A manufacturer-specific register, raw value.",
}

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

# Records that identify a meter or its parts rather than measure anything: labels on
# kamstrup_meter_info, never sample values.  Secrets are not exported at all.
IDENTIFIERS = (
    "fabrication_number", "enhanced_identification", "bus_address", "parameter_set_id",
    "model_version", "hardware_version", "firmware_version", "software_version",
    "customer_location", "customer", "special_supplier_information",
)  # fmt: skip
SECRETS = frozenset(
    ("access_code_user", "access_code_operator", "access_code_system_operator",
     "access_code_developer", "password")
)  # fmt: skip

RESERVED_LABELS = frozenset(
    ("meter", "address", "sensor", "flag", "storage", "tariff", "subunit", "register",
     "manufacturer", "version", "medium", "vife", "record", "unit", *IDENTIFIERS)
)  # fmt: skip


def _metric_part(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]+", "_", text).strip("_").lower()


def _local_timestamp(text: str) -> float | None:
    """Seconds since the epoch of a meter's local date or date-time, in this host's zone."""
    import datetime as dt

    try:
        if "T" in text:
            value = dt.datetime.fromisoformat(text)
        else:
            value = dt.datetime.fromisoformat(text + "T00:00")
    except ValueError:
        return None
    return float(time.mktime(value.timetuple()))


_NOT_SAMPLES = frozenset(IDENTIFIERS) | SECRETS


def record_series(telegram: Telegram, record: Record):
    """(family base name, counter?, labels, value) for one record, or None if not a number."""
    value = record.value
    if record.quantity in _NOT_SAMPLES:
        return None
    manufacturer = telegram.manufacturer
    counter = False
    labels: tuple = ()
    named = {"manufacturer_specific"}  # modifiers the name below already says
    quantity = record.quantity
    if quantity in ("date", "datetime"):
        if not isinstance(value, str):
            return None
        value = _local_timestamp(value)
        if value is None:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if quantity == "manufacturer_specific":
        known = KAMSTRUP_REGISTERS.get(record.manufacturer_vife) if manufacturer == "KAM" else None
        if known:
            base, counter = known
        else:
            base = "manufacturer_register"
            labels = (("register", record.manufacturer_vife.hex() or "none"),)
    elif quantity in QUANTITY_NAMES:
        base, counter, labels = QUANTITY_NAMES[quantity]
        if quantity == "energy" and (
            "negative_accumulation" in record.modifiers
            or (manufacturer == "KAM" and record.manufacturer_vife == b"\x02")
        ):
            base = "cooling_energy_joules"  # E3: 86 3C, or Kamstrup's 86 FF 02
            named.add("negative_accumulation")
    else:
        suffix = UNIT_SUFFIXES.get(record.unit, _metric_part(record.unit))
        base = _metric_part(quantity)
        if suffix and not base.endswith(suffix):
            base = f"{base}_{suffix}"
        if record.text_unit:
            labels = (("unit", record.text_unit),)
    extra = [m for m in record.modifiers if m not in named and not m.startswith("correction_")]
    mvife = record.manufacturer_vife
    if mvife and quantity != "manufacturer_specific":
        if not (manufacturer == "KAM" and (quantity, mvife) in KAMSTRUP_QUALIFIERS):
            extra.append("manufacturer_" + mvife.hex())
    position = (
        ("storage", str(record.storage)),
        ("tariff", str(record.tariff)),
        ("subunit", str(record.subunit)),
    )
    if extra:  # qualified in a way we have no name for (limits, per-unit, ...): kept apart
        base = "register_" + FUNCTION_PREFIXES[record.function] + _metric_part(quantity)
        qualifiers = (("vife", ",".join(extra)), ("unit", record.text_unit or record.unit))
        return base, False, position + qualifiers, value
    if record.function in ("maximum", "minimum"):
        counter = False
    base = FUNCTION_PREFIXES[record.function] + base
    if (record.storage, record.tariff, record.subunit) != (0, 0, 0):
        return "register_" + base, False, position + labels, value
    return base, counter, labels, value


class Family(_Plain):
    __slots__ = ("name", "type", "help", "samples")

    def __init__(self, name: str, type: str, help: str):
        self.name = name
        self.type = type
        self.help = help
        self.samples: list = []  # (labels tuple, value)


class Exposition:
    """Samples grouped by family, each family once, in a stable order."""

    def __init__(self, const_labels: Sequence = ()):
        self.const = tuple(const_labels)
        self.families: dict = {}
        self._seen: set = set()

    def add(self, base: str, labels: Sequence, value, counter: bool = False) -> bool:
        name = f"{NAMESPACE}_{base}" + ("_total" if counter else "")
        key_base = base + ("_total" if counter else "")
        family = self.families.get(name)
        if family is None:
            help_text = HELP.get(key_base) or HELP.get(base) or _generic_help(base)
            family = Family(name, "counter" if counter else "gauge", help_text)
            self.families[name] = family
        labels = tuple(labels) + self.const
        key = (name, labels)
        if key in self._seen:
            return False
        self._seen.add(key)
        family.samples.append((labels, value))
        return True

    def render(self) -> str:
        lines = []
        for name in sorted(self.families):
            family = self.families[name]
            lines.append(f"# HELP {name} {_escape_help(family.help)}")
            lines.append(f"# TYPE {name} {family.type}")
            for labels, value in family.samples:
                lines.append(f"{name}{_render_labels(labels)} {_render_value(value)}")
        return "\n".join(lines) + "\n" if lines else ""


def _generic_help(base: str) -> str:
    if base.startswith("register_"):
        inner = base[len("register_") :]
        known = HELP.get(inner + "_total") or HELP.get(inner)
        what = (
            known.rstrip(".").replace(", current value", "") if known else inner.replace("_", " ")
        )
        return f"{what} (a register other than the current value: see its labels)."
    return f"M-Bus record: {base.replace('_', ' ')} (see README, generic records)."


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _render_labels(labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels) + "}"


def _render_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def meter_label(telegram: Telegram, address) -> str:
    """The meter label: its 8-digit identification number, or the address if it has none."""
    return telegram.id or str(address)


def identity(telegram: Telegram, address) -> tuple:
    """What makes a meter the same meter: ids are unique only per manufacturer (and can be
    reprogrammed), so id, manufacturer, version and medium together."""
    return (meter_label(telegram, address), telegram.manufacturer, telegram.version,
            telegram.medium_name)  # fmt: skip


def identifier_labels(telegram: Telegram) -> tuple:
    """(name, value) of the meter's identifier records (fabrication number, firmware
    version, ...), for kamstrup_meter_info; a register other than the current one is
    named by its position (``firmware_version_subunit_1``)."""
    out = {}
    for record in telegram.records:
        if record.quantity not in IDENTIFIERS or record.value is None:
            continue
        name = record.quantity + "".join(
            f"_{what}_{n}"
            for what, n in (("storage", record.storage), ("tariff", record.tariff),
                            ("subunit", record.subunit))
            if n
        )  # fmt: skip
        if record.function != "instantaneous":
            name += "_" + record.function
        value = record.value
        if isinstance(value, float) and value == int(value):
            value = int(value)
        out.setdefault(name, str(value))
    return tuple(out.items())


def add_telegram(exp: Exposition, telegram: Telegram, meter: tuple) -> None:
    """Every numeric record of a meter's reading, plus its info flags; ``meter`` are the
    labels that tell this meter from the others (its id, and its address if need be)."""
    for index, record in enumerate(telegram.records):
        series = record_series(telegram, record)
        if series is None:
            continue
        base, counter, labels, value = series
        if not exp.add(base, meter + labels, value, counter):
            exp.add(base, meter + labels + (("record", str(index)),), value, counter)
        # flags from a bit field only: an info code sent as a real32 is exported as is
        if base == "info_code" and record.current and isinstance(value, int):
            bits = 8 * (_DATA_LENGTHS[record.dib[0] & 0x0F] or 2)  # 16 on a 303, 32 on a 403
            for bit, flag in INFO_FLAGS:
                if bit < bits:
                    exp.add("info_flag", meter + (("flag", flag),), (value >> bit) & 1)


class Reading(_Plain):
    """What one configured address gave in one run."""

    __slots__ = ("address", "telegram", "error", "duration", "port")

    def __init__(self, address, telegram: Telegram | None = None, error: str | None = None,
                 duration: float = 0.0, port: bool = False):  # fmt: skip
        self.address = address  # int or secondary address string
        self.telegram = telegram
        self.error = error
        self.duration = duration
        self.port = port  # the error is the port's (it could not be opened), not the meter's


def readings_from_frames(frames: Sequence[bytes]) -> list:
    """Frames as if they had come from the bus: "more records follow" joins the next."""
    readings = []
    pending: list = []
    for frame in frames:
        try:
            telegram = decode_telegram(frame)
        except ApplicationError as exc:
            address = frame[5] if len(frame) > 5 else 0
            readings.append(Reading(address=address, error=str(exc)))
            continue
        if pending and (telegram.address, telegram.id) != (pending[0].address, pending[0].id):
            readings.append(Reading(pending[0].address, merge_telegrams(pending)))
            pending = []
        pending.append(telegram)
        if not telegram.more_records_follow or len(pending) >= MAX_TELEGRAMS:
            readings.append(Reading(pending[0].address, merge_telegrams(pending)))
            pending = []
    if pending:
        readings.append(Reading(pending[0].address, merge_telegrams(pending)))
    return readings


def exposition(readings: Sequence[Reading], const_labels=(), last_success=None) -> str:
    """The whole .prom text for a run. ``last_success`` maps address label -> unix time."""
    exp = Exposition(const_labels)
    last_success = dict(last_success or {})
    now = time.time()
    for reading in readings:
        address = (("address", str(reading.address)),)
        up = reading.telegram is not None
        exp.add("up", address, 1 if up else 0)
        exp.add("read_duration_seconds", address, round(reading.duration, 6))
        if up:
            last_success[str(reading.address)] = now
            t = reading.telegram
            exp.add(
                "meter_info",
                address
                + (
                    ("meter", meter_label(t, reading.address)),
                    ("manufacturer", t.manufacturer or ""),
                    ("version", "" if t.version is None else str(t.version)),
                    ("medium", t.medium_name),
                )
                + identifier_labels(t),
                1,
            )
        when = last_success.get(str(reading.address))
        if when is not None:
            exp.add("last_success_timestamp_seconds", address, round(when, 3))
    meters = first_of_each_meter(readings)
    ids = [meter_label(r.telegram, r.address) for r in meters]
    for reading, meter in zip(meters, ids):
        labels: tuple = (("meter", meter),)
        if ids.count(meter) > 1:  # two meters with one id: told apart by their address
            labels += (("address", str(reading.address)),)
        add_telegram(exp, reading.telegram, labels)
    return exp.render()


def first_of_each_meter(readings: Sequence[Reading]) -> list:
    """The successful readings, one per meter: a meter reached at two addresses (254 and
    its own, say) is exported once, so its series are not doubled."""
    seen = set()
    out = []
    for reading in readings:
        if reading.telegram is None:
            continue
        key = identity(reading.telegram, reading.address)
        if key not in seen:
            seen.add(key)
            out.append(reading)
    return out


_LAST_SUCCESS = re.compile(
    r'^kamstrup_last_success_timestamp_seconds\{((?:[a-zA-Z_]\w*="(?:[^"\\]|\\.)*",?)*)\}'
    r"\s+(\S+)\s*$",
    re.M,
)
_LABEL_PAIR = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')


def _unescape_label(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), text)


def previous_last_success(path: str) -> dict:
    """The last-success times kept in the previous file, so they survive failed runs."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return {}
    out = {}
    for labels, value in _LAST_SUCCESS.findall(text):
        pairs = dict(_LABEL_PAIR.findall(labels))
        if "address" not in pairs:
            continue
        try:
            out[_unescape_label(pairs["address"])] = float(value)
        except ValueError:
            pass
    return out


def render_json(readings: Sequence[Reading]) -> str:
    """The --format json document: {"meters": [...]}, one line."""
    import json

    meters = []
    for reading in readings:
        if reading.telegram is not None:
            meters.append(telegram_json(reading.telegram))
        else:
            meters.append(json.dumps({"address": reading.address, "error": reading.error}))
    return '{"meters": [' + ", ".join(meters) + "]}\n"


_RECORD_JSON: dict = {}  # (DIB, VIB) -> (JSON text before the value, text after it)


def telegram_json(telegram: Telegram) -> str:
    """``json.dumps(telegram.to_json())``, made faster for the records.

    A meter sends the same record shapes (storage, tariff, unit, ...) every time, so the
    JSON text around each value is made once per shape; only the value is new.
    """
    import json

    text = json.dumps(telegram.header_json())[:-1]
    parts = []
    for record in telegram.records:
        # DIB and VIB fix every field but the value (the fixed structure has neither)
        shape = (record.dib, record.vib, record.storage, record.quantity, record.unit)
        template = _RECORD_JSON.get(shape)
        if template is None:
            fields = record.to_json()
            fields["value"] = None
            before, after = json.dumps(fields).split('"value": null', 1)
            template = (before + '"value": ', after)
            if len(_RECORD_JSON) < 4096:
                _RECORD_JSON[shape] = template
        value = record.value
        if type(value) is float and value - value == 0:  # finite: repr is its JSON
            parts.append(template[0] + repr(value) + template[1])
        else:
            parts.append(template[0] + _json_value(value, json) + template[1])
    return text + ', "records": [' + ", ".join(parts) + "]}"


def _json_value(value, json) -> str:
    kind = type(value)
    if kind is float:
        return repr(value) if math.isfinite(value) else "null"
    if kind is int:
        return str(value)
    if value is None:
        return "null"
    return json.dumps(value)


# ---------------------------------------------------------------------------
# 5. Output: the atomic write
# ---------------------------------------------------------------------------


class OutputError(Exception):
    """The .prom file could not be written; the previous one is untouched."""


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new, never half.

    A temporary file in the same directory (its name does not end in .prom, so
    node_exporter ignores it), mode 0644, flushed and fsynced, renamed over the
    target, then the directory fsynced.  Any failure removes the temporary file.
    A link is followed (its target is replaced, not the link); anything but a regular
    file (a device such as /dev/null, a directory) is refused, never replaced.
    """
    import stat

    path = os.path.realpath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror}") from None
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(f"{path} is not a regular file (use --output - for stdout)")
    _remove_stale_temporaries(path)
    directory = os.path.dirname(path)
    base = os.path.basename(path)
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.tmp")
    data = text.encode("utf-8")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise OutputError(f"cannot write into {directory}: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o644)  # whatever the umask
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path}: {exc.strerror}") from None
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # the file is in place; a directory that cannot be fsynced is not an error


def _remove_stale_temporaries(path: str) -> None:
    """Temporary files a killed run left behind (its pid is gone)."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}."
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid = name[len(prefix) : -len(".tmp")]
        if not pid.isdigit():
            continue
        # our own pid cannot be a live writer yet (pids are reused after a reboot)
        if int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# ---------------------------------------------------------------------------
# 6. Command line
# ---------------------------------------------------------------------------

import click  # noqa: E402  (kept here: the layers above do not need it)

PROG = "kamstrup_textfile"
DEFAULT_OUTPUT = "/var/lib/prometheus/node-exporter/kamstrup.prom"


class AddressType(click.ParamType):
    """A primary address 0-250 or 254, or an 8-digit secondary address."""

    name = "address"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            text = str(value)
        else:
            text = str(value).strip()
        if re.fullmatch(r"\d{8}", text):
            return text
        if re.fullmatch(r"\d{1,3}", text):
            number = int(text)
            if number <= 250 or number == ADDRESS_ANY:
                return number
        self.fail(
            f"{value!r} is not a primary address (0-250, or 254 for the only meter on the bus) "
            "nor an 8-digit secondary address",
            param,
            ctx,
        )


class LabelType(click.ParamType):
    name = "name=value"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        name, sep, text = str(value).partition("=")
        if not sep:
            self.fail(f"{value!r} is not NAME=VALUE", param, ctx)
        if not _LABEL_NAME.match(name) or name.startswith("__"):
            self.fail(f"{name!r} is not a valid Prometheus label name", param, ctx)
        if name in RESERVED_LABELS:
            self.fail(f"label {name!r} is set by the tool itself", param, ctx)
        try:  # the environment's bytes arrive as surrogates when they are not UTF-8
            text.encode("utf-8")
        except UnicodeEncodeError:
            self.fail(
                f"the value of label {name!r} is not UTF-8 (an EnvironmentFile in Latin-1?)",
                param,
                ctx,
            )
        return (name, text)


def _emit(text: str, output: str) -> None:
    if output == "-":
        _stdout(text)
        return
    write_atomic(output, text)


def _stdout(text: str) -> None:
    """Write to stdout; a full disk or a closed pipe is an OutputError, said once."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as exc:
        try:  # what is still buffered must not fail again when Python exits
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        raise OutputError(f"cannot write to standard output: {_reason(exc)}") from None


def _fail(message: str) -> None:
    click.echo(f"{PROG}: {message}", err=True)


def read_meters(url: str, addresses, *, baudrate, timeout, retries, log) -> list:
    """Read every address in turn, one Reading each.

    A port that fails (an adapter unplugged or reset) fails the meter being read; it
    is opened anew for the next one, and when that fails too, the meters left get that
    error.  A meter that stays silent while another program has the port open is told so.
    """
    readings = []
    bus = None
    port_error = None
    for address in addresses:
        start = time.monotonic()
        if bus is None and port_error is None:
            try:
                port = open_port(url, baudrate)
            except BusError as exc:
                port_error = str(exc)
            else:
                bus = Bus(port, baudrate=baudrate, timeout=timeout, retries=retries, log=log)
        if port_error is not None:
            readings.append(Reading(address, error=port_error, port=True))
            continue
        try:
            telegram = bus.read(address)
            readings.append(Reading(address, telegram, duration=time.monotonic() - start))
        except BusError as exc:
            error = str(exc)
            if isinstance(exc, PortError):
                _close(bus.port)
                bus = None
            readings.append(Reading(address, error=error, duration=time.monotonic() - start))
    if bus is not None:
        _close(bus.port)
    if any(r.error and not r.port for r in readings):
        holders = port_holders(url)
        if holders:
            for reading in readings:
                if reading.error and not reading.port:
                    reading.error += f"; {url} is also open in {holders}, which may eat answers"
    return readings


def _close(port) -> None:
    try:
        port.close()
    except PORT_ERRORS:
        pass  # a port that went away cannot be closed any better


@click.command(context_settings={"auto_envvar_prefix": "KAMSTRUP", "max_content_width": 100})
@click.option(
    "--port",
    default="/dev/ttymeterBus",
    show_default=True,
    help="Serial device or pyserial URL (socket://host:port, rfc2217://...).",
)
@click.option("--baudrate", type=click.IntRange(300, 38400), default=2400, show_default=True)
@click.option(
    "--address",
    "addresses",
    envvar="KAMSTRUP_ADDRESS",
    type=AddressType(),
    multiple=True,
    help="Primary address 0-250, 254 (the only meter on the bus; default) or an "
    "8-digit secondary address. Repeatable.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.05, 60),
    default=1.0,
    show_default=True,
    help="Seconds a meter may take to start its answer (never less than 330 bit times + 50 ms).",
)
@click.option("--retries", type=click.IntRange(0, 10), default=2, show_default=True)
@click.option(
    "--output",
    default=None,
    help=f"The .prom file to write atomically, or - for stdout.  [default: {DEFAULT_OUTPUT}; "
    "with --decode: -]",
)
@click.option(
    "--format",
    "fmt",
    envvar="KAMSTRUP_FORMAT",
    type=click.Choice(["prom", "json"]),
    default="prom",
    show_default=True,
)
@click.option(
    "--label",
    "labels",
    envvar="KAMSTRUP_LABEL",
    type=LabelType(),
    multiple=True,
    help="NAME=VALUE: a constant label on every series. Repeatable.",
)
@click.option("--once", is_flag=True, help="Read every meter once, write the file, exit.")
@click.option(
    "--decode",
    "decode_file",
    type=click.File("r"),
    default=None,
    help="Decode hex frames from FILE (- for stdin) instead of reading the bus.",
)
@click.option("--scan", is_flag=True, help="Probe primary addresses 0-250 and list the meters.")
@click.option("-v", "--verbose", is_flag=True, help="Every frame sent and received, on stderr.")
@click.version_option(__version__, prog_name=PROG)
def cli(port, baudrate, addresses, timeout, retries, output, fmt, labels, once, decode_file,
        scan, verbose):  # fmt: skip
    """Read Kamstrup MULTICAL heat meters over M-Bus into a node_exporter textfile.

    Every option can also be set as KAMSTRUP_<OPTION> in the environment
    (KAMSTRUP_PORT, KAMSTRUP_ADDRESS="48 133", KAMSTRUP_LABEL="location=cellar").
    Exit status: 0 all meters read, 1 a meter or the output failed, 2 usage error.
    """
    modes = [name for name, on in (("--once", once), ("--decode", decode_file), ("--scan", scan))
             if on]  # fmt: skip
    if len(modes) != 1:
        what = "nothing to do" if not modes else f"{' and '.join(modes)} exclude each other"
        raise click.UsageError(f"{what}: give one of --once, --decode FILE or --scan")
    names = [name for name, _ in labels]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise click.BadParameter(f"label {twice[0]!r} is given twice", param_hint="--label")
    log = (lambda line: click.echo(line, err=True)) if verbose else None
    if output is None:  # a decoded capture never replaces the live file unless asked to
        output = "-" if decode_file is not None else DEFAULT_OUTPUT
    addresses = list(dict.fromkeys(addresses)) or [ADDRESS_ANY]

    if decode_file is not None:
        try:
            readings = readings_from_frames(split_frames(parse_hex(decode_file.read())))
        except FrameError as exc:
            _fail(f"{getattr(decode_file, 'name', '-')}: {exc}")
            sys.exit(1)
        except OSError as exc:
            _fail(f"cannot read {getattr(decode_file, 'name', '-')}: {exc.strerror or exc}")
            sys.exit(1)
        except UnicodeDecodeError:
            _fail(f"{getattr(decode_file, 'name', '-')}: not hex text")
            sys.exit(1)
        _report(readings)
    elif scan:
        sys.exit(_scan(port, baudrate, timeout, retries, log))
    else:
        readings = read_meters(port, addresses, baudrate=baudrate, timeout=timeout,
                               retries=retries, log=log)  # fmt: skip
        _report(readings)

    if fmt == "json":
        text = render_json(readings)
    else:
        previous = previous_last_success(output) if output != "-" else {}
        text = exposition(readings, labels, previous)
    try:
        _emit(text, output)
    except OutputError as exc:
        _fail(str(exc))
        sys.exit(1)
    sys.exit(1 if any(r.error for r in readings) else 0)


def _report(readings: Sequence[Reading]) -> None:
    """One line on stderr for each failure (meters that failed alike share it), and one
    for each meter that was read twice."""
    failed: dict = {}
    for reading in readings:
        if reading.error:
            failed.setdefault((reading.error, reading.port), []).append(str(reading.address))
    for (error, port), addresses in failed.items():
        if port and len(addresses) == len(readings):  # the port, before any meter was read
            _fail(error)
        elif port:
            _fail(f"{error} (not read: address {', '.join(addresses)})")
        else:
            _fail(f"address {', '.join(addresses)}: {error}")
    kept = {id(reading) for reading in first_of_each_meter(readings)}
    for reading in readings:
        if reading.telegram is not None and id(reading) not in kept:
            meter = meter_label(reading.telegram, reading.address)
            _fail(f"address {reading.address}: meter {meter} was read at another "
                  "address too; its readings are written once")  # fmt: skip


def _scan(port, baudrate, timeout, retries, log) -> int:
    try:
        serial_port = open_port(port, baudrate)
    except BusError as exc:
        _fail(str(exc))
        return 1
    found = []
    try:
        bus = Bus(serial_port, baudrate=baudrate, timeout=timeout, retries=retries, log=log)
        with click.progressbar(range(251), label="Scanning", file=sys.stderr) as addresses:
            for address in addresses:
                if not bus.ping(address):
                    continue
                try:
                    found.append(bus.read(address))
                except PortError:
                    raise
                except BusError as exc:
                    _fail(f"address {address} answered SND_NKE but not REQ_UD2: {exc}")
    except PortError as exc:
        _fail(str(exc))
        return 1
    finally:
        _close(serial_port)
    try:
        _stdout(
            "".join(
                f"address {t.address:3d}  id {t.id}  manufacturer {t.manufacturer}  "
                f"version {t.version}  medium {t.medium_name}\n"
                for t in found
            )
        )
    except OutputError as exc:
        _fail(str(exc))
        return 1
    if not found:
        _fail("no meter answered on addresses 0-250")
        return 1
    return 0


def main() -> None:
    import signal

    def terminate(signum, frame):
        raise SystemExit(128 + signum)  # unwinds: temporary files are removed

    signal.signal(signal.SIGTERM, terminate)
    cli(prog_name=PROG)  # click turns Ctrl-C into "Aborted!" and exit status 1


if __name__ == "__main__":
    main()
