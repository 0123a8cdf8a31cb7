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
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

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


@dataclass(frozen=True)
class LongFrame:
    c: int
    a: int
    ci: int
    data: bytes


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


@dataclass
class Record:
    """One data record, its value already in SI base units."""

    storage: int
    tariff: int
    subunit: int
    function: str
    quantity: str
    unit: str
    value: Any
    dib: bytes = b""  # DIF and DIFEs as sent
    vib: bytes = b""  # VIF and VIFEs as sent
    modifiers: tuple = ()  # combinable VIFEs, by name
    manufacturer_vife: bytes = b""  # the bytes after a manufacturer-specific VIF(E)
    text_unit: str = ""  # the unit of a plain-text VIF (0x7C/0xFC)

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


@dataclass
class Telegram:
    """A decoded RSP_UD: the meter's header and its data records."""

    address: int
    ci: int
    id: str | None = None
    manufacturer: str | None = None
    version: int | None = None
    medium: int | None = None
    access_number: int | None = None
    status: int | None = None
    signature: int | None = None
    records: list = field(default_factory=list)
    more_records_follow: bool = False
    fixed_medium: str | None = None  # CI 0x73 has its own 4-bit medium table

    @property
    def medium_name(self) -> str:
        if self.fixed_medium is not None:
            return self.fixed_medium
        if self.medium is None:
            return "unknown"
        return MEDIUMS.get(self.medium, f"reserved 0x{self.medium:02X}")

    def to_json(self) -> dict:
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
            "records": [r.to_json() for r in self.records],
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
    **_scaled("energy", "J", 0x0C, 4, 5, num=41868),  # 10^(n-1) MCal (IT calorie)
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
    if not 1 <= month <= 12 or not 1 <= day <= _days_in_month(year, month):
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
    """The shortest decimal (as a Fraction) that a 32-bit real stands for."""
    from fractions import Fraction

    (value,) = struct.unpack("<f", data)
    if not math.isfinite(value):
        return None
    for digits in range(6, 10):
        text = f"{value:.{digits}g}"
        if struct.pack("<f", float(text)) == data:
            return Fraction(text)
    return Fraction(value)


def _scale(raw, num: int, den: int, offset=None):
    """raw * num / den as the float nearest the exact result."""
    if isinstance(raw, int) and offset is None:
        if den == 1:
            return float(raw * num)
        return (raw * num) / den
    from fractions import Fraction

    exact = Fraction(raw) * num / den
    if offset is not None:
        exact += offset
    return float(exact)


def _fahrenheit_to_celsius(value: float) -> float:
    from fractions import Fraction

    return float((Fraction(str(value)) - 32) * 5 / 9)


@dataclass
class _Vib:
    quantity: str
    unit: str
    kind: str
    num: int
    den: int
    modifiers: tuple = ()
    manufacturer_vife: bytes = b""
    text_unit: str = ""
    offset: Any = None
    raw_len: int = 0


def _read_vib(payload: bytes, pos: int, end: int) -> tuple:
    """The VIF and its VIFEs at ``pos``; returns (_Vib, new position)."""
    start = pos
    if pos >= end:
        raise FrameError(f"record ends before its VIF at byte {pos}")
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
    vib = _Vib(quantity, unit, kind, num, den, text_unit=text_unit, raw_len=pos - start)
    vib.manufacturer_vife = manufacturer
    if rest:
        _apply_vifes(vib, rest)
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


def _read_data(payload: bytes, pos: int, end: int, coding: int, vib: _Vib) -> tuple:
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
    kind = vib.kind
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
    if vib.quantity in ("manufacturer_specific", "unknown"):  # raw, unscaled
        return int.from_bytes(data, "little", signed=True), pos
    return _number(int.from_bytes(data, "little", signed=True), vib), pos


def _number(raw, vib: _Vib):
    if raw is None:
        return None
    if vib.kind == "id":
        return raw if isinstance(raw, int) else float(raw)
    value = _scale(raw, vib.num, vib.den, vib.offset)
    if vib.unit == "degF":
        vib.unit = "degC"
        return _fahrenheit_to_celsius(value)
    return value


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
                    0, 0, 0, "instantaneous", "manufacturer_data", "",
                    data.hex(" ").upper(), dib=bytes((dif,)),
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
        while extension:
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
        dib = payload[dib_start:pos]
        vib_start = pos
        vib, pos = _read_vib(payload, pos, end)
        if vib.quantity == "manufacturer_specific" and vib.manufacturer_vife in bit_fields:
            vib.kind = "bits"
        vib_bytes = payload[vib_start : vib_start + vib.raw_len]
        value, pos = _read_data(payload, pos, end, dif & 0x0F, vib)
        records.append(
            Record(
                storage, tariff, subunit, FUNCTIONS[(dif >> 4) & 0x03],
                vib.quantity, vib.unit, value, dib, vib_bytes,
                vib.modifiers, vib.manufacturer_vife, vib.text_unit,
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
    merged = Telegram(**{**first.__dict__, "records": []})
    for telegram in telegrams:
        merged.records.extend(telegram.records)
    merged.more_records_follow = telegrams[-1].more_records_follow
    return merged
