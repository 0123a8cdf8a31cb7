#!/usr/bin/env python3
"""M-Bus (EN 13757-2 and -3) for Kamstrup MULTICAL meters: frames, records, the bus.

What kamstrup_textfile.py reads a meter's wired M-Bus port with, readable on its own:
1. frames (bytes <-> link layer frames), 2. records (a RSP_UD's header and data records,
values in SI base units), 3. the bus (SND_NKE, REQ_UD2, secondary selection, deadlines,
retries, echo and noise, and the scans), on any object with pyserial's read/write.
The port itself is opened by kamstrup_port.py; the collector (metrics, output, command
line) is kamstrup_textfile.py.  Needs only the standard library.
"""

from __future__ import annotations

import math
import re
import struct
import time
from typing import Any, Sequence

from kamstrup_port import PORT_ERRORS, BusError, PortError, _reason

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

    An F digit is a wildcard (EN 13757-3's search); manufacturer, version and medium are
    wildcards too (FF FF, FF, FF).
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
    """Hex digits in any case, separated or not by white space (the libmbus .hex layout);
    lines whose first character other than a blank is # are comments (--capture)."""
    lines = []
    comments = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            comments = True
            continue
        bad = re.search(r"[^0-9A-Fa-f\s]", line)
        if bad:
            raise FrameError(f"line {number}: {bad.group()!r} is not a hex digit")
        lines.append(line)
    digits = "".join("".join(lines).split())
    if not digits and comments:
        raise FrameError(
            "no frame, only comment lines (a capture keeps refused answers as comments)"
        )
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
        "dib", "vib", "modifiers", "manufacturer_vife", "text_unit", "utc_offset",
    )  # fmt: skip

    def __init__(
        self, storage, tariff, subunit, function, quantity, unit, value,
        dib=b"", vib=b"", modifiers=(), manufacturer_vife=b"", text_unit="", utc_offset=None,
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
        self.utc_offset = utc_offset  # "+02:00": a local date-time the SU bit placed

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
        if self.utc_offset:
            out["utc_offset"] = self.utc_offset
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
    **_single(0x19, "security_key", kind="id"),  # EN 13757-3:2018
    **_single(0x1A, "digital_output", kind="bits"),
    **_single(0x1B, "digital_input", kind="bits"),
    **_single(0x1C, "baud_rate", "Bd"),
    **_single(0x1D, "response_delay_time", "bit_times"),
    **_single(0x1E, "retry"),
    **_single(0x1F, "remote_control", kind="bits"),
    **_single(0x20, "first_storage_number"),
    **_single(0x21, "last_storage_number"),
    **_single(0x22, "storage_block_size"),
    **_single(0x23, "tariff_subunit_descriptor", kind="id"),  # 2018
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
    **_single(0x3B, "wireless_mbus_container", kind="id"),  # 2018
    **_durations("nominal_transmission_period", 0x3C),  # 2018
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
    # 0x77-0x7C reserved; 0x7D: the code is in the next VIFE (FD_FD_VIFES)
}

# VIF 0xFD, VIFE 0xFD: the second level of the main extension table (2018).
FD_FD_VIFES: dict = {
    **_single(0x00, "currently_selected_application", kind="id"),
    **_single(0x02, "remaining_battery_life_months", "month"),
    **_single(0x03, "remaining_battery_life_years", "year"),
}

_FT3 = 28316846592  # 1 ft3 = 0.028316846592 m3 (num, with den 10^12)
_USGAL = 3785411784  # 1 US gallon = 0.003785411784 m3 (den 10^12)

# VIF 0xFB: the first extension table (large units, electricity, non-SI units), to
# EN 13757-3:2018 (its Table 14).  Apparent and reactive energy stay in VAh and varh:
# the meter's own unit family, never mistaken for (active) energy in J.  The 2018
# edition dropped US gallons and degrees Fahrenheit (0x22-0x26, 0x58-0x67, 0x70-0x73)
# without giving the codes another meaning: older meters still send them, so they keep
# their earlier meaning here.  Codes not listed are reserved.
FB_VIFES: dict = {
    **_scaled("energy", "J", 0x00, 2, -1, num=3600 * 10**6),  # 10^(n-1) MWh
    **_scaled("reactive_energy", "varh", 0x02, 2, 3),  # 10^n kvarh
    **_scaled("apparent_energy", "VAh", 0x04, 2, 3),  # 10^n kVAh (2018)
    **_scaled("energy", "J", 0x08, 2, 8),  # 10^(n-1) GJ
    **_scaled("energy", "J", 0x0C, 4, 1, num=41868),  # 10^(n-1) MCal; 1 MCal = 4186800 J
    **_scaled("volume", "m3", 0x10, 2, 2),
    **_scaled("reactive_power", "var", 0x14, 4, 0),  # 10^(nn-3) kvar (2018)
    **_scaled("mass", "kg", 0x18, 2, 5),  # 10^(n+2) t
    **_scaled("relative_humidity", "percent", 0x1A, 2, -1),
    **{0x20: ("volume", "m3", "number", _FT3, 10**12)},  # ft3 (2018)
    **{0x21: ("volume", "m3", "number", _FT3, 10**13)},  # 0.1 ft3
    **_scaled("volume", "m3", 0x22, 2, -13, num=_USGAL),  # 10^(n-1) US gallons
    **{0x24: ("volume_flow", "m3/s", "number", _USGAL, 60 * 10**15)},  # 0.001 gal/min
    **{0x25: ("volume_flow", "m3/s", "number", _USGAL, 60 * 10**12)},  # gal/min
    **{0x26: ("volume_flow", "m3/s", "number", _USGAL, 3600 * 10**12)},  # gal/h
    **_scaled("power", "W", 0x28, 2, 5),  # 10^(n-1) MW
    **_scaled("phase_voltage_voltage", "deg", 0x2A, 1, -1),  # 0.1 degree (2018)
    **_scaled("phase_voltage_current", "deg", 0x2B, 1, -1),  # 0.1 degree (2018)
    **_scaled("frequency", "Hz", 0x2C, 4, -3),  # 10^(nn-3) Hz (2018)
    **_scaled("power", "W", 0x30, 2, 8, den=3600),  # 10^(n-1) GJ/h
    **_scaled("apparent_power", "VA", 0x34, 4, 0),  # 10^(nn-3) kVA (2018)
    # Heat cost allocator rating factors (EN 834), fixed point with 12 fraction bits
    # (2018).  Kq (0x69) is kept raw: public decoders disagree on its scale.
    **{0x68: ("resulting_rating_factor", "", "number", 1, 4096)},
    **_single(0x69, "thermal_output_rating_factor"),
    **{0x6A: ("thermal_coupling_rating_factor", "", "number", 1, 4096)},
    **{0x6B: ("thermal_coupling_rating_factor_room", "", "number", 1, 4096)},
    **{0x6C: ("thermal_coupling_rating_factor_heater", "", "number", 1, 4096)},
    **{0x6D: ("low_temperature_rating_factor", "", "number", 1, 4096)},
    **{0x6E: ("display_output_scaling_factor", "", "number", 1, 4096)},
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


def _utc_offset(text: str, summer: bool) -> str | None:
    """The UTC offset ("+02:00") of a type F local time, in this host's time zone, when
    its SU (summer time) bit decides it; None when it does not.

    SU set: the zone's summer-time offset at that local time, if the zone has one then.
    SU clear: the standard-time offset, but only in the autumn's repeated hour, where
    the local time alone names two instants.  Elsewhere a clear bit says nothing: meters
    that ignore summer time send it clear all year.
    The zone's rules are asked for the meter's own date, never through time.daylight,
    time.timezone or time.altzone: CPython sets those from the host's current year (a
    board that boots in 1970 before NTP would have no summer time in Europe).
    """
    import datetime as dt

    fields = (int(text[0:4]), int(text[5:7]), int(text[8:10]), int(text[11:13]),
              int(text[14:16]))  # fmt: skip
    # The local time read as UTC ("wall"); the offsets the zone has within a day of it
    # (a change of offset is a step, so the ones in force then are among those seen a
    # day either side); each offset that gives this local time back names an instant.
    wall = (dt.date(*fields[:3]).toordinal() - 719163) * 86400 + fields[3] * 3600 + fields[4] * 60
    try:
        seen = {time.localtime(wall + step).tm_gmtoff for step in (-86400, 0, 86400)}
        found = [time.localtime(wall - gmtoff) for gmtoff in seen]
    except (OverflowError, ValueError, OSError):
        return None
    offsets = {local.tm_isdst > 0: local.tm_gmtoff for local in found if local[:5] == fields}
    if summer:
        offset = offsets.get(True)
    elif len(offsets) == 2:
        offset = offsets[False]
    else:
        return None
    if offset is None:
        return None
    sign = "-" if offset < 0 else "+"
    return f"{sign}{abs(offset) // 3600:02d}:{abs(offset) % 3600 // 60:02d}"


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


def _read_vib(payload: bytes, pos: int, end: int, msb: bool = False) -> tuple:
    """The VIF and its VIFEs at ``pos``; returns (_Vib, new position).

    A meter sends the same few VIBs in every answer: each is parsed once.  ``msb``: a
    plain-text unit comes first character first (CI 0x76), not last first.
    """
    if pos >= end:
        raise FrameError(f"record ends before its VIF at byte {pos}")
    vif = payload[pos]
    vib = _VIF_CACHE.get(vif)  # the common case: one byte, seen before
    if vib is not None:
        return vib, pos + 1
    if vif & 0x7F == 0x7C:  # plain text: the unit is part of the VIB, not cached
        vib, stop = _parse_vib(payload, pos, end, msb)
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


def _parse_vib(payload: bytes, pos: int, end: int, msb: bool = False) -> tuple:
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
        text = payload[pos + 1 : pos + 1 + length]
        text_unit = (text if msb else text[::-1]).decode("latin-1")
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
        table = FB_VIFES if code == 0x7B else FD_VIFES
        if vifes and code == 0x7D and vifes[0] & 0x7F == 0x7D:  # FD FD: the second level
            table, vifes = FD_FD_VIFES, vifes[1:]
        if vifes:
            spec = table.get(vifes[0] & 0x7F) or ("reserved", "", "number", 1, 1)
            rest = vifes[1:]
        else:  # an extension VIF(E) without its code: nothing says what it is
            spec = ("unknown", "", "number", 1, 1)
    else:
        spec = PRIMARY_VIFS[code]
    quantity, unit, kind, num, den = spec
    vib = _Vib(quantity, unit, kind, num, den, text_unit=text_unit)
    vib.manufacturer_vife = manufacturer
    if rest:
        _apply_vifes(vib, rest)
    if quantity in _RAW_QUANTITIES:  # no unit, so no VIFE can scale it: the raw value
        vib.unit, vib.num, vib.den, vib.offset = "", 1, 1, None
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


def _read_data(
    payload: bytes, pos: int, end: int, coding: int, vib: _Vib, kind: str, msb: bool = False
) -> tuple:
    """The data field at ``pos`` by the DIF's coding; returns (value, new position).

    ``msb``: the field comes most significant byte first (CI 0x76); it is turned round
    and read as the least-significant-first field of a CI 0x72 answer.
    """
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
        if msb:
            data = data[::-1]
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
    if msb:
        data = data[::-1]
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


# Quantities whose scale nothing tells (a reserved code means nothing yet, Kq's scale is
# disputed): the raw value, unscaled, whatever VIFEs follow.
_RAW_QUANTITIES = frozenset(
    ("manufacturer_specific", "unknown", "reserved", "thermal_output_rating_factor")
)


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


def decode_records(
    payload: bytes, start: int = 0, manufacturer: str | None = None, msb: bool = False
) -> tuple:
    """The data records of a variable data structure; returns (records, more_follow).

    ``msb``: multi-byte fields come most significant byte first (CI 0x76).
    """
    bit_fields = BIT_FIELD_REGISTERS.get(manufacturer or "", frozenset())
    records = []
    pos = start
    end = len(payload)
    more = False
    order = "big" if msb else "little"
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
        vib, pos = _read_vib(payload, pos, end, msb)
        coding = dif & 0x0F
        utc_offset = None
        if vib.scaled and coding in _FIXED_NUMBER_CODINGS:  # most records: a scaled number
            stop = pos + _DATA_LENGTHS[coding]
            if stop > end:
                raise FrameError(f"record data runs past the frame at byte {pos}")
            if coding < 8:
                raw = int.from_bytes(payload[pos:stop], order, signed=True)
            else:
                raw = _decode_bcd(payload[pos:stop][::-1] if msb else payload[pos:stop])
            if raw is None:
                value = None
            else:
                value = float(raw * vib.num) if vib.den == 1 else raw * vib.num / vib.den
            pos = stop
        else:
            kind = vib.kind
            if vib.manufacturer_vife in bit_fields and vib.quantity == "manufacturer_specific":
                kind = "bits"
            start_of_data = pos
            value, pos = _read_data(payload, pos, end, coding, vib, kind, msb)
            if kind == "datetime" and coding == 0x04 and value is not None:
                hour_byte = payload[start_of_data + (2 if msb else 1)]  # type F: SU is bit 7
                utc_offset = _utc_offset(value, bool(hour_byte & 0x80))
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
                utc_offset,
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


def _decode_fixed(telegram: Telegram, data: bytes, msb: bool = False) -> None:
    """CI 0x73: identification, access number, status, medium and units, two counters.

    ``msb``: CI 0x77, the same with the identification and counters most significant
    byte first.
    """
    if len(data) != 16:
        raise FrameError(f"fixed data structure of {len(data)} bytes, expected 16")
    telegram.id = _bcd_id(data[3::-1] if msb else data[0:4])
    telegram.access_number = data[4]
    telegram.status = data[5]
    type1, type2 = data[6], data[7]
    medium = ((type1 & 0xC0) >> 6) | ((type2 & 0xC0) >> 4)
    telegram.fixed_medium = FIXED_MEDIUMS[medium]
    binary = telegram.status & 0x80
    units = []
    for type_byte, counter in ((type1, data[8:12]), (type2, data[12:16])):
        if msb:
            counter = counter[::-1]
        code = type_byte & 0x3F
        storage = 0
        if code == 0x3E:  # the same unit as counter 1, a historic value
            code, storage = type1 & 0x3F, 1
        quantity, unit, num, den = _FIXED_UNITS.get(code, ("reserved", "", 1, 1))
        raw = int.from_bytes(counter, "little") if binary else _decode_bcd(counter)
        value = None if raw is None else _scale(raw, num, den)
        units.append(Record(storage, 0, 0, "instantaneous", quantity, unit, value))
    telegram.records = units


def _header_lsb_first(data: bytes) -> bytes:
    """A CI 0x76 payload with its header's identification number, manufacturer and
    signature turned round, as a CI 0x72 answer sends them (the records follow as sent)."""
    return data[3::-1] + data[5:3:-1] + data[6:10] + data[11:9:-1] + data[12:]


def decode_telegram(buf: bytes) -> Telegram:
    """A whole RSP_UD frame to a Telegram; FrameError (or ApplicationError) otherwise."""
    frame = parse_long_frame(bytes(buf))
    telegram = Telegram(address=frame.a, ci=frame.ci)
    data = frame.data
    if frame.ci == 0x70:
        code = data[0] if data else 0
        reason = APPLICATION_ERRORS.get(code, f"application error 0x{code:02X}")
        raise ApplicationError(f"meter reports an application error: {reason}")
    msb = frame.ci in (0x76, 0x77)  # EN 1434-3 "mode 2": multi-byte fields MSB first
    if frame.ci == 0x72 or frame.ci == 0x76:
        if len(data) < 12:
            raise FrameError(f"header of {len(data)} bytes, expected 12")
        if msb:
            data = _header_lsb_first(data)
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
    elif frame.ci == 0x73 or frame.ci == 0x77:
        _decode_fixed(telegram, data, msb)
        return telegram
    else:
        raise FrameError(f"CI field 0x{frame.ci:02X} is not a data answer")
    telegram.records, telegram.more_records_follow = decode_records(
        data, start, telegram.manufacturer, msb
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
# 3. Bus: requests and answers on a port (opened by kamstrup_port)
# ---------------------------------------------------------------------------


class MeterError(BusError):
    """The meter answered, but wrongly (an application error, a telegram that repeats,
    an answer from another address): it is there, and it is no collision."""


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
        if not (math.isfinite(timeout) and math.isfinite(pause)):  # NaN would never pass
            raise ValueError(f"timeout {timeout!r} and pause {pause!r} must be numbers")
        self.port = port
        self.baudrate = baudrate
        self.asked = timeout  # what the user asked for; the standard's limit may be more
        # Never less than the standard lets a slave take: an answer that came after we
        # gave up would pass for the answer to the next request (another address's E5).
        self.timeout = max(timeout, slowest_answer(baudrate))
        self.retries = retries
        self.pause = pause
        self.log = log
        self.clock = time.monotonic
        self._deadline = 0.0  # the answer to the last request must have begun by then
        self._hard_limit = 0.0  # and must be over by then
        self._begun = False
        self.last_byte = 0.0  # when the last byte came
        self.sent_at = 0.0  # when the last request had left
        self.heard = 0  # bytes received so far: more after a failure means garbled, not silent
        self.received = bytearray()  # what came since read() began (a scan: since the start)
        self.accepted = 0  # bytes of the frames read_data took
        self.on_answer = None  # called with (address, frame, baudrate) for every answer accepted
        self.on_refused = None  # (address, bytes, baudrate, why) for each REQ_UD2 answer refused
        try:  # a real port's fd: the last wait before a deadline is a select(), to the ms
            self._fd = port.fileno()
        except Exception:  # no fd (a socket:// port, a test double): wait_readable, or not
            self._fd = None
        self._wait = getattr(port, "wait_readable", None)

    def set_baudrate(self, baudrate: int) -> None:
        """Talk at another rate from now on (only a change reconfigures the port: a pty
        refuses a configuration that changes nothing it keeps)."""
        if baudrate != self.baudrate:
            self._io("setting the baud rate", setattr, self.port, "baudrate", baudrate)
            self.baudrate = baudrate
            self.timeout = max(self.asked, slowest_answer(baudrate))

    # -- raw I/O ---------------------------------------------------------

    def _io(self, doing: str, call, *args):
        try:
            return call(*args)
        except Exception as exc:  # the port is foreign code: whatever it raises, one line
            reason = _reason(exc)
            if not isinstance(exc, PORT_ERRORS):
                reason = f"{type(exc).__name__}: {reason}"
            if "multiple access" in reason:  # pyserial's own guess: keep it, no second one
                pass
            elif any(sign in reason for sign in _HANGUP_SIGNS):
                reason += " (is the M-Bus adapter still plugged in?)"
            raise PortError(f"port failed while {doing}: {reason}") from None

    def _send(self, frame: bytes, timeout: float | None = None) -> None:
        reset = getattr(self.port, "reset_input_buffer", None)
        if reset is not None:  # a late answer to an earlier request must not pass for this one
            self._io("discarding old input", reset)
        if self.log:
            self.log(f"> {frame.hex(' ').upper()}")
        written = self.clock()
        self._io("writing", self.port.write, frame)
        flush = getattr(self.port, "flush", None)
        if flush is not None:
            self._io("writing", flush)
        # The slave's time starts once the request has left; its answer's first byte is
        # in once its own 11 bits are.  flush() (tcdrain) waits for the wire on a UART,
        # not on a pty or most USB adapters: the later of the two, never both.
        self.sent_at = max(self.clock(), written + wire_seconds(len(frame), self.baudrate))
        window = self.timeout if timeout is None else timeout
        self._deadline = self.sent_at + wire_seconds(1, self.baudrate) + window
        # however the bytes come, no answer lasts longer than the longest frame (twice,
        # for adapters in bursts): a line that babbles cannot hold a read past this
        self._hard_limit = (
            self._deadline + 2 * wire_seconds(LONGEST_ANSWER + len(frame), self.baudrate) + STALL
        )
        self._begun = False  # a byte has come since the request

    def _fill(self, buf: bytearray, n: int) -> bool:
        """Read until ``buf`` holds ``n`` bytes; False when they do not come in time."""
        while len(buf) < n:
            limit = self._deadline
            if self._begun:  # the answer has begun: the rest gets its time from the last byte
                rest = wire_seconds(n - len(buf), self.baudrate)
                limit = min(max(limit, self.last_byte + STALL + 2 * rest), self._hard_limit)
            if self.clock() >= limit:
                return False
            chunk = self._read(n - len(buf), limit)
            if chunk is None:  # nothing came by the limit
                return False
            if chunk:
                buf += chunk
                self.heard += len(chunk)
                self.received += chunk
                self.last_byte = self.clock()
                self._begun = True
        return True

    def _answer(self, request: bytes, want_frame: bool) -> bytes:
        """The slave's answer to ``request``: the byte E5, or a whole long frame.

        Skips line noise before the start byte and an echo of the request.
        """
        buf = bytearray()
        skipped = 0
        try:
            while True:
                if not self._fill(buf, 1):
                    if skipped:
                        raise BusError(f"garbled answer: {skipped} bytes and no frame "
                                       "(several meters at once, or noise)")  # fmt: skip
                    raise BusError(_silence(self.timeout))
                first = buf[0]
                if first == request[0]:  # perhaps our own request, echoed by the adapter
                    if self._fill(buf, len(request)) and buf[: len(request)] == request:
                        self._trace("echo", buf[: len(request)])
                        self.heard -= len(request)
                        del self.received[-len(request) :]
                        del buf[: len(request)]
                        self._begun = False  # our own bytes: the answer has not begun
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
                skipped += 1
                del buf[0]
        except BusError:
            if buf:
                self._trace("<", buf)
            raise

    def _read(self, n: int, limit: float):
        """At most ``n`` bytes, back by ``limit``, or None once nothing came by then.

        A pyserial read blocks a whole READ_SLICE when nothing comes, so the last wait
        before a deadline is a select() on the fd (or the port's own wait_readable), not
        a read that would overshoot it."""
        remaining = limit - self.clock()
        if remaining < READ_SLICE:
            if self._fd is not None:
                import select

                try:
                    ready = remaining > 0 and select.select([self._fd], [], [], remaining)[0]
                except (OSError, ValueError) as exc:
                    raise PortError(f"port failed while reading: {_reason(exc)}") from None
                if not ready:
                    return None
            elif self._wait is not None:
                if remaining <= 0 or not self._io("reading", self._wait, remaining):
                    return None
        return self._io("reading", self.port.read, n)

    def quiet(self, keep: bool = False) -> bytes:
        """Wait until the line has been quiet for ``pause`` (and a few bytes' time);
        returns the bytes that came meanwhile (the rest of a cut-off answer, a late one),
        which are dropped.  A line that never stops is given up on after the longest
        answer's time."""
        quiet = max(self.pause, wire_seconds(4, self.baudrate))
        start = last = self.clock()
        give_up = start + quiet + 2 * wire_seconds(LONGEST_ANSWER, self.baudrate) + STALL
        dropped = bytearray()
        while True:
            now = self.clock()
            if now - last >= quiet or now >= give_up:
                break
            chunk = self._read(LONGEST_ANSWER, min(last + quiet, give_up))
            if chunk is None:  # quiet long enough (or given up on)
                break
            if chunk:
                dropped += chunk
                last = self.clock()
        if dropped:
            self._trace("late", dropped)
        return bytes(dropped)

    def _until(self, until: float):
        """The chunks that come until ``until`` (traced as late), each as it comes."""
        while self.clock() < until:
            chunk = self._read(LONGEST_ANSWER, until)
            if chunk is None:
                break
            if chunk:
                self._trace("late", chunk)
                yield chunk

    def listen(self, until: float, want: int | None = None) -> float | None:
        """Read until ``until``; when the first byte (the first ``want`` byte) came, or
        None (what came is dropped)."""
        first = None
        for chunk in self._until(until):
            if first is None and (want is None or want in chunk):
                first = self.clock()
        return first

    def gather(self, until: float) -> bytes:
        """What comes until ``until``, then until the line is quiet (see quiet)."""
        return b"".join(self._until(until)) + self.quiet(keep=True)

    def take_pending(self) -> bytes:
        """The bytes that have come since the last answer was taken, without waiting."""
        waiting = self.pending()
        if not waiting:
            return b""
        chunk = self._io("reading", self.port.read, waiting)
        if chunk:
            self._trace("late", chunk)
        return chunk

    def pending(self) -> int:
        """Bytes that have come since the last answer was taken (a late answer)."""
        waiting = getattr(self.port, "in_waiting", None)
        if waiting is None:
            return 0
        return self._io("reading", getattr, self.port, "in_waiting")

    def _trace(self, what: str, data) -> None:
        if self.log:
            self.log(f"{what} {bytes(data).hex(' ').upper()}")

    # -- requests ----------------------------------------------------------

    def _attempts(self, what: str, action):
        """Run ``action`` until it succeeds, at most 1 + retries times, on a quiet line."""
        reason = ""
        for attempt in range(1 + self.retries):
            if attempt:
                self.quiet()
            try:
                return action()
            except PortError:  # the port itself: asking again will not help
                raise
            except ApplicationError as exc:  # the meter answered: asking again will not help
                raise MeterError(str(exc)) from None
            except (BusError, FrameError) as exc:
                reason = str(exc)
                kind = MeterError if isinstance(exc, MeterError) else BusError
                if self.log:
                    self.log(f"! {what}: {reason}")
        tries = 1 + self.retries
        raise kind(f"{what}: {reason} (after {tries} {'try' if tries == 1 else 'tries'})")

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

        A meter read by secondary address is deselected afterwards (SND_NKE to 253), so
        that none stays selected.  At 254, answers that collide (several meters answer
        at once) are a failed read that says so, never one meter's reading.
        """
        if isinstance(address, str):
            self.received.clear()
            self._deselect()
            self._ack(select_secondary(address), f"selecting secondary address {address}")
            try:
                return self.read_data(ADDRESS_SECONDARY, secondary=address)
            finally:
                self._deselect()
        self.received.clear()
        if address != ADDRESS_ANY:
            self._ack(snd_nke(address), "SND_NKE")
            return self.read_data(address)
        try:
            self._ack(snd_nke(address), "SND_NKE")
            return self.read_data(address)
        except BusError as exc:  # bytes that make no answer: answers that collide
            silent = "no answer" in str(exc) and not self.received.strip(b"\xe5")
            if isinstance(exc, (PortError, MeterError)) or silent:
                raise
            raise BusError(f"{SEVERAL_AT_254} ({exc})") from None

    def read_data(self, target: int, secondary: str | None = None) -> Telegram:
        """REQ_UD2 to ``target`` until the meter has said all (SND_NKE or a selection first).

        "More records follow" is followed with the FCB toggled, a retry keeps the FCB (so
        the meter sends the same telegram again); a meter that answers a toggled FCB
        with the telegram it sent before, or that never stops, is a failed read.
        """
        telegrams: list = []
        fcb = True  # after SND_NKE the first REQ_UD2 carries FCB=1
        while True:
            request = req_ud2(target, fcb)

            def once(request=request):
                start = len(self.received)
                self._send(request)
                try:
                    frame = self._answer(request, want_frame=True)
                    telegram = decode_telegram(frame)
                    if target not in (ADDRESS_ANY, ADDRESS_SECONDARY) and (
                        telegram.address != target
                    ):
                        raise MeterError(f"answer from address {telegram.address}, not {target}")
                    if secondary is not None and telegram.id != secondary:
                        raise MeterError(f"answer from meter {telegram.id}, not {secondary}")
                except (BusError, FrameError) as exc:
                    refused = bytes(self.received[start:])
                    if self.on_refused is not None and refused and not isinstance(exc, PortError):
                        self.on_refused(secondary or target, refused, self.baudrate, str(exc))
                    raise
                self.accepted += len(frame)
                if self.on_answer is not None:
                    self.on_answer(secondary or target, frame, self.baudrate)
                return telegram

            if chain(telegrams, self._attempts("REQ_UD2", once)):
                return merge_telegrams(telegrams)
            fcb = not fcb

    # -- probes, for the scans -----------------------------------------------

    def _probe(self, frame: bytes, window: float | None) -> str:
        """One request, one try: "ack" (a clean E5), "garbled" (bytes, but no E5: several
        answered out of step) or "silent"."""
        heard = self.heard
        self._send(frame, timeout=window)
        try:
            self._answer(frame, want_frame=False)
        except PortError:
            raise
        except BusError:
            return "garbled" if self.heard > heard else "silent"
        return "ack"

    def probe(self, address: int, window: float | None = None) -> str:
        """SND_NKE to a primary address, one try (see _probe)."""
        return self._probe(snd_nke(address), window)

    def select(self, mask: str) -> str:
        """Select by secondary address ``mask`` (8 digits, F for any) with any manufacturer,
        version and medium; one try (see _probe)."""
        return self._probe(select_secondary(mask), None)

    def ping(self, address: int) -> bool:
        """Whether a meter at this primary address answers SND_NKE (one try)."""
        return self.probe(address) == "ack"


SEVERAL_AT_254 = "several meters answered at 254: give each its --address, see --scan"


class Found(_Plain):
    """A meter a scan found: its reading, and the rate it answered at."""

    __slots__ = ("telegram", "baudrate")

    def __init__(self, telegram: Telegram, baudrate: int):
        self.telegram = telegram
        self.baudrate = baudrate


PRIMARY_ADDRESSES = range(251)
LATE_WINDOW = 1.0  # seconds a re-probe waits for a meter that answered after the window

LOST = (
    "a meter answered after the window and could not be found again within 1 s: it "
    "answers later still, try a longer --timeout (2)"
)
COLLISION = (
    "several meters answered at once (a collision), or one meter answers garbled: give "
    "them addresses of their own, or find them with --scan-secondary"
)
WRONG = "answered SND_NKE, but not REQ_UD2"  # a meter there that cannot be read
WRONG_SELECTED = "answered, but wrongly"
SHARED_ID = "several meters share it"
MIXED_RATES = "--once reads one rate per address: give them addresses of their own"
ASKED_AGAIN = "answered only when asked again (late once?): if a meter is missing, scan again"
UNFINISHED = "the scan did not finish: the meters above may not be all, so no KAMSTRUP_* lines"
# what a scan says that fails it (advice on a late meter that was found does not)
FAILING = (COLLISION, WRONG, WRONG_SELECTED, SHARED_ID, LOST, MIXED_RATES)


def wake(bus: Bus) -> bool:
    """SND_NKE to 254, tried again while nobody answers: a battery meter may miss the
    first request after a long idle (libmbus #84); whether something answered.  When it
    took more than one try, the answers of late meters to the tries before are let come
    and go first (LATE_WINDOW), so that none lands in a scan's first windows."""
    late = False  # a late answer came while we waited: somebody is there too
    for attempt in range(1 + bus.retries):
        if attempt:
            late = bool(bus.quiet()) or late
        if bus.probe(ADDRESS_ANY) != "silent":
            if attempt:
                bus.listen(bus.sent_at + LATE_WINDOW)
            else:
                bus.quiet()
            return True
    return bus.listen(bus.sent_at + LATE_WINDOW) is not None or late


def scan_primary(bus: Bus, addresses=PRIMARY_ADDRESSES, progress=None, note=None,
                 found=None) -> list:  # fmt: skip
    """Probe each primary address with SND_NKE (one try, the standard's window) and
    confirm each answer on a quiet line with a REQ_UD2 whose answer carries the address.

    An E5 that comes after its probe's window (waiting before the next probe, drained
    before a REQ_UD2, or an E5 whose REQ_UD2 stays unanswered) is never credited to a
    later address: every address probed within LATE_WINDOW before it is probed again
    with that window, and a late meter that is not found that way is said lost.  A
    collision (garbage where a frame should be) is reported through ``note``, never as a
    meter.  ``found`` (address -> Found) may be given, to keep what was found when the
    scan is stopped or the port fails.
    """
    note = note or (lambda text: None)
    found = {} if found is None else found
    probed: list = []  # (address, when its probe was sent), in order
    state = {"searched": set(), "late": set(), "lost": False}
    wake(bus)
    # a late meter's answer to the wake-up may still come: nobody to look for then
    state["settled"] = bus.sent_at + LATE_WINDOW
    for done, address in enumerate(addresses, 1):
        if ACK in bus.take_pending():  # came after the previous probe's window
            _find_late(bus, probed, found, note, bus.clock(), state)
        result = bus.probe(address)
        probed.append((address, bus.sent_at))
        if result != "silent":
            came = bus.last_byte  # when it came: a late answer's probe was before
            outcome, detail, late = _confirm(bus, address)
            _record(bus, found, note, address, outcome, detail)
            if outcome == "collision":
                pass  # E5s that came with it are the colliding meters'
            elif (outcome == "silent" and result == "ack") or ACK in late:  # a late E5
                _find_late(bus, probed[:-1], found, note, came, state, also=address)
            elif outcome == "found" and (late or result == "garbled"):
                # garbage before a clean frame: a late E5 may have met an answer on the
                # line (and be 00s now); look, but a meter not found is no news then
                _find_late(bus, probed[:-1], found, note, came, state, sure=False)
        if progress:
            progress(done, len(found))
    if probed:  # a late answer to the last probes comes after them
        came = bus.listen(probed[-1][1] + LATE_WINDOW, want=ACK)
        if came is not None:
            _find_late(bus, probed, found, note, came, state)
    return [found[address] for address in sorted(found)]


def _record(bus: Bus, found: dict, note, address: int, outcome: str, detail) -> None:
    """Keep a meter _confirm found; say a collision, or a meter that answers wrongly."""
    if outcome == "found":
        found[address] = Found(detail, bus.baudrate)
    elif outcome == "collision":
        note(f"address {address}: {COLLISION}")
    elif outcome == "failed":
        note(f"address {address} {WRONG}: {detail}")


def _confirm(bus: Bus, address: int) -> tuple:
    """After an E5 (or garbage) at ``address``: ("found", its reading), ("collision",
    None), ("failed", why: the meter answered, wrongly) or ("silent", None); and the
    bytes that came after the E5 before the line was quiet."""
    late = bus.quiet(keep=True)  # the rest of what answered must be over first
    start, accepted = len(bus.received), bus.accepted
    # a late meter's answer must not meet our next try on the line: wait for it as long
    # as for a late E5 (this costs nothing when the meter answers in time)
    saved, bus.timeout = bus.timeout, max(bus.timeout, LATE_WINDOW)
    try:
        telegram = bus.read_data(address)
        # bytes before the frame (an E5 that came late, somebody else's) count as late
        before = bytes(bus.received[start : len(bus.received) - (bus.accepted - accepted)])
        # a second meter at this address may answer later than the first, after its
        # frame: the window, a quiet line, and if somebody else talks, what a late meter
        # may still send
        after = bus.gather(bus.sent_at + saved + wire_seconds(1, bus.baudrate))
        if after:
            after += bus.gather(bus.sent_at + LATE_WINDOW)
        if after.strip(b"\xe5"):
            return "collision", None, late + before
        return "found", telegram, late + before + after
    except PortError:
        raise
    except MeterError as exc:
        return "failed", str(exc), late
    except BusError:
        got = bytes(bus.received[start:])
        late += bus.quiet(keep=True)  # the rest of colliding answers is no late answer
        if got.strip(b"\xe5"):  # more than late E5s: answers that collide
            return "collision", None, late
        return "silent", None, late + got
    finally:
        bus.timeout = saved


def _find_late(bus, probed, found, note, came: float, state: dict, also=None,
               sure=True) -> None:  # fmt: skip
    """Something answered at ``came``, after its probe's window: probe again, nearest
    first, every address probed within LATE_WINDOW before, with that window.  Not
    ``sure`` that it was an answer (garbage), a meter not found is not said lost."""
    bus.quiet()
    # ``came`` is when the read that brought it returned: up to a read slice later
    recent = [a for a, sent in reversed(probed)
              if came - LATE_WINDOW - READ_SLICE <= sent <= came]  # fmt: skip
    candidates = ([also] if also is not None else []) + recent
    for address in candidates:
        if address in found or address in state["searched"]:
            continue
        state["searched"].add(address)
        if bus.probe(address, window=LATE_WINDOW) != "ack":
            continue
        delay = bus.last_byte - bus.sent_at
        outcome, detail, _ = _confirm(bus, address)
        _record(bus, found, note, address, outcome, detail)
        if outcome == "silent":
            continue
        # silent at its own probe, there now (found, colliding or answering wrongly):
        # it sent the late byte
        state["late"].add(address)
        if outcome != "found":
            continue
        if delay > bus.timeout:  # late indeed (not in time)
            enough = math.ceil(delay * 10 + 1) / 10  # the delay and 0.1 s to spare
            note(f"address {address} answered {delay:.2f} s after the request, after the "
                 f"{bus.timeout:.3g} s window: try --timeout {enough:g}")  # fmt: skip
        elif address != also:  # late once (a busy line, a loaded gateway), or it missed
            # its probe and the late byte was a lost meter's: no failure, no silence
            note(f"address {address} {ASKED_AGAIN}")
    explained = state["late"].intersection(candidates)  # a late meter found sent it
    if sure and not explained and came > state["settled"] and not state["lost"]:
        state["lost"] = True
        note(LOST)


def scan_secondary(bus: Bus, progress=None, note=None, found=None) -> tuple:
    """Every meter by identification number: EN 13757-3's wildcard search.

    Select with the digits fixed so far and F for the rest (manufacturer, version and
    medium FF): silence, none there; an E5 whose REQ_UD2 to 253 brings one clean frame
    and nothing else, one meter; garbage (or an E5 whose REQ_UD2 brings garbage), a
    collision: fix the next digit and go deeper.  A meter that answers the first
    selection after the window makes the window longer for the whole search.  Deselects
    at the end.  Returns (found, number of selections).
    """
    note = note or (lambda text: None)
    found = [] if found is None else found
    probes = [0]

    def probe(mask: str):
        """None (nobody), a Telegram (one meter), "collision" (several) or a MeterError."""
        probes[0] += 1
        result = bus.select(mask)
        selected_at = bus.sent_at
        if result == "silent":
            return None
        if result == "ack":  # one meter, or several in step: the REQ_UD2 to 253 tells
            retries, bus.retries = bus.retries, 0
            try:
                for _ in range(1 + retries):  # silence is asked again, garbage is not
                    start, accepted = len(bus.received), bus.accepted
                    try:
                        telegram = bus.read_data(ADDRESS_SECONDARY)
                    except PortError:
                        raise
                    except MeterError as exc:
                        return exc
                    except BusError:
                        if len(bus.received) > start:
                            break  # garbage: several answered
                        continue
                    extra = len(bus.received) - start - (bus.accepted - accepted)
                    # a meter that answers the selection or the REQ_UD2 later than the
                    # first is heard after its frame: wait out both windows
                    until = max(selected_at, bus.sent_at) + bus.timeout
                    extra += len(bus.gather(until + wire_seconds(1, bus.baudrate)))
                    ids = zip(mask, telegram.id or "")
                    if extra <= 0 and all(m in ("F", d) for m, d in ids):
                        return telegram
                    break  # more than one clean frame, or a meter the mask does not match
                else:
                    return None
            finally:
                bus.retries = retries
        bus.quiet()
        return "collision"

    def record(mask: str, outcome) -> None:
        if isinstance(outcome, Telegram):
            found.append(Found(outcome, bus.baudrate))
        elif isinstance(outcome, MeterError):
            note(f"the meter selected by {mask} {WRONG_SELECTED}: {outcome}")

    def search(prefix: str) -> None:
        for digit in "0123456789":
            mask = (prefix + digit).ljust(8, "F")
            outcome = probe(mask)
            record(mask, outcome)
            if outcome == "collision":
                if len(prefix) == 7:
                    note(f"the answers for the id {mask} collide: {SHARED_ID} "
                         "(tell them apart by primary address, --scan), or the meter "
                         "answers garbled")  # fmt: skip
                else:
                    search(prefix + digit)
            if progress:
                progress(probes[0], len(found))

    try:
        for _ in range(1 + bus.retries):  # everybody, until something answers (a
            # sleepy meter misses the first request), listening for late answers as well
            answered = bus.select("FFFFFFFF") != "silent"
            sent = bus.sent_at
            came = bus.listen(sent + LATE_WINDOW, want=ACK)
            if came is not None:  # an E5 after the window: a longer window for the search
                delay = came - sent
                bus.timeout = max(bus.timeout, math.ceil(delay * 10 + 1) / 10)
                note(f"a meter answered the selection {delay:.2f} s after the request, after "
                     f"the window: searching with --timeout {bus.timeout:g}")  # fmt: skip
            if answered or came is not None:
                break
        outcome = probe("FFFFFFFF")
        record("FFFFFFFF", outcome)
        if outcome == "collision":
            search("")
    finally:
        bus._deselect()
    return found, probes[0]


def rates_in_use(bus: Bus, rates) -> list:
    """The rates at which something answers SND_NKE to 254 (cleanly, garbled, or late:
    each rate is listened to for LATE_WINDOW, so a late answer is not taken for the next
    rate's), asked again while nothing answers (a sleepy meter)."""
    using = []
    for rate in rates:
        bus.set_baudrate(rate)
        answered = wake(bus)
        # always to the end of the window: a late answer must not be the next rate's
        late = bus.listen(bus.sent_at + LATE_WINDOW) is not None
        if answered or late:
            using.append(rate)
    return using


def _same_reading(a: Telegram, b: Telegram) -> bool:
    return a.id == b.id and a.records == b.records


def chain(telegrams: list, telegram: Telegram) -> bool:
    """Add the answer to the next REQ_UD2 (FCB toggled) to a read's ``telegrams``;
    whether the meter has said all.  A meter that answers with the telegram it sent
    before, or that never stops, is a MeterError (the live read and its --decode alike)."""
    if telegrams and _same_reading(telegram, telegrams[-1]):
        n = len(telegrams)
        if telegram.access_number == telegrams[-1].access_number:
            raise MeterError(f"telegram {n + 1} repeats telegram {n} although the FCB "
                             "was toggled: the meter ignores the FCB")  # fmt: skip
        raise MeterError(
            f"telegram {n + 1} repeats the records of telegram {n} and says more "
            "records follow again: the meter would never stop"
        )
    telegrams.append(telegram)
    if not telegram.more_records_follow:
        return True
    if len(telegrams) >= MAX_TELEGRAMS:
        raise MeterError(f"still 'more records follow' after {MAX_TELEGRAMS} telegrams: gave up")
    return False


def _silence(timeout: float) -> str:
    return f"no answer within {timeout:g} s"


def _truncated(buf: bytearray, expected: int) -> str:
    return f"answer cut off after {len(buf)} of {expected} bytes"
