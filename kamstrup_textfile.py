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
# 3. Bus: the only code that touches a port
# ---------------------------------------------------------------------------


class BusError(Exception):
    """A meter could not be read: no answer, a corrupt answer, a port problem."""


class PortError(BusError):
    """The port itself failed (an adapter unplugged, a hang-up): not retried."""


class MeterError(BusError):
    """The meter answered, but wrongly (an application error, a telegram that repeats,
    an answer from another address): it is there, and it is no collision."""


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


# Runs on one serial port take turns through pyserial's exclusive flock on the device.
# A network gateway (socket://, rfc2217://) has no device to lock: two runs on one would
# both talk to the one bus behind it and read each other's answers.  So a run on a
# gateway holds a lock named after the gateway's host and port while its port is open:
# an abstract AF_UNIX socket name, bound, never listened on.  Not a lock file, because
#  - no directory is writable and shared by the hardened service and a hand run: the
#    service has ProtectSystem=strict (/run and /var/lock read-only) and PrivateTmp=yes
#    (its /tmp is its own), and a file made by one user may be unwritable to another;
#  - the kernel lets the name go when the process dies, however it dies: nothing stale
#    to clean up, no pid in a file to be reused;
#  - abstract names live in the network namespace, and the service talks to a gateway
#    only with PrivateNetwork=no (see kamstrup.service), i.e. in the host's namespace,
#    where hand runs are; RestrictAddressFamilies= keeps AF_UNIX.
# The price: any local user can bind the name and so keep the runs waiting (as any
# user who may open a serial port can flock it).  socket:// and rfc2217:// on one host
# and port are one gateway port, so one lock; host names are compared as written
# (lower case, without a final dot; addresses in their canonical form), not resolved.
GATEWAY_SCHEMES = ("socket", "rfc2217")
_LOCK_PREFIX = "\0kamstrup-textfile/gateway/"


def gateway_lock_name(url: str) -> str | None:
    """The abstract socket name that stands for the gateway ``url`` reaches, or None for
    what is not a network gateway (a device, loop://)."""
    import hashlib
    import ipaddress
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # not a port number: pyserial says so when it opens
        return None
    if parts.scheme.lower() not in GATEWAY_SCHEMES or not parts.hostname or port is None:
        return None
    host = parts.hostname.rstrip(".")  # urlsplit gives it in lower case
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        mapped = getattr(address, "ipv4_mapped", None)
        host = str(mapped or address)
    key = f"{host}:{port}"
    name = _LOCK_PREFIX + key
    if len(name.encode()) > 107:  # sun_path's limit; a long host name is hashed
        name = _LOCK_PREFIX + hashlib.sha256(key.encode()).hexdigest()
    return name


def _lock_gateway(url: str, deadline: float):
    """The bound socket that holds the gateway's lock, None for no gateway (or a system
    without AF_UNIX, where the read goes on unlocked); a BusError when another process
    still holds it at ``deadline``."""
    import errno
    import socket

    name = gateway_lock_name(url)
    if name is None:
        return None
    while True:
        try:
            lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            return None  # cannot lock here (no AF_UNIX): read as before
        try:
            lock.bind(name)
            return lock
        except OSError as exc:
            lock.close()
            if exc.errno != errno.EADDRINUSE:
                return None
        if time.monotonic() >= deadline:
            gateway = name[len(_LOCK_PREFIX) :]
            holders = port_holders(url)
            who = f" (in {holders})" if holders else ""
            raise BusError(
                f"port {url} is busy: another run is reading the meters through "
                f"gateway {gateway}{who}"
            )
        time.sleep(0.2)


def open_port(url: str, baudrate: int, wait: float = 10.0):
    """Open the serial port or pyserial URL exclusively, 8E1, with a short read slice.

    A port locked by another run (a gateway: see gateway_lock_name) is tried again
    until ``wait`` seconds have passed.  Errors become a BusError with one line saying
    what to do.
    """
    deadline = time.monotonic() + wait
    lock = _lock_gateway(url, deadline)
    try:
        port = _open_serial(url, baudrate, deadline)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    if lock is not None:  # the lock lives as long as the port is open
        close = port.close

        def close_and_unlock():
            try:
                close()
            finally:
                lock.close()

        port.close = close_and_unlock
    return port


def _open_serial(url: str, baudrate: int, deadline: float):
    import errno

    import serial  # pyserial

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
            if code == errno.EPERM:  # no file permission says this: the device cgroup does
                raise BusError(
                    f"port {url}: Operation not permitted: the service may open only "
                    "/dev/ttymeterBus (DeviceAllow=; see kamstrup.service for other ports)"
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
    """The other processes that have ``device`` open (or hold a gateway's lock), by
    their command lines, e.g. 'screen /dev/ttyUSB0 2400 (pid 812)', or ''.

    Linux only (/proc/PID/fd, read with readlink: a stat would follow each link into
    whatever file system it points at, a hung NFS mount too), and only the processes
    this user may look into (not from the hardened unit: ProtectProc=invisible).  Named
    by /proc/PID/cmdline, not /proc/PID/comm: comm is cut at 15 characters
    (kamstrup-textfi) and says python3 for every script.  Never this process, known by
    /proc/self (os.getpid() is another number when /proc is another pid namespace's).
    """
    targets = _lock_sockets(device) if "://" in device else {os.path.realpath(device)}
    if not targets:
        return ""
    identity = None  # a name can be another file's: /dev/pts/0 of a container's devpts
    if "://" not in device:
        try:
            own = os.stat(device)
        except OSError:
            return ""  # gone (an adapter unplugged): another file may have its name now
        identity = (own.st_dev, own.st_ino)
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
        me = os.readlink("/proc/self")
    except OSError:
        return ""
    found = []
    for pid in pids:
        if pid in (me, str(os.getpid())):
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") not in targets:
                    continue
                if identity is not None:  # the name matches: a device, safe to stat
                    same = os.stat(f"/proc/{pid}/fd/{fd}")
                    if (same.st_dev, same.st_ino) != identity:
                        continue
            except OSError:
                continue
            found.append(f"{_process_name(pid)} (pid {pid})")
            break
    return ", ".join(found)


def _lock_sockets(url: str) -> set:
    """The sockets (as /proc/PID/fd shows them) bound to the lock of the gateway ``url``."""
    name = gateway_lock_name(url)
    if name is None:
        return set()
    shown = "@" + name[1:]  # /proc/net/unix shows an abstract name's NUL as @
    found = set()
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
            next(f, None)  # the header
            for line in f:
                fields = line.split()
                if len(fields) == 8 and fields[7] == shown:
                    found.add(f"socket:[{fields[6]}]")
    except OSError:
        pass
    return found


def _process_name(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        argv = []
    if argv and not argv[-1]:
        argv.pop()  # the NUL after the last argument
    name = command_name([arg.decode("utf-8", "replace") for arg in argv])
    if name:
        return name
    try:  # a kernel thread, or a process that wiped its arguments
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


# Options of python that take a value (python -X dev script.py: the script is script.py).
_PYTHON_VALUE_OPTIONS = ("-X", "-W", "--check-hash-based-pycs")


def command_name(argv: Sequence[str], limit: int = 60) -> str:
    """A process's name for a person: the program's base name and its arguments, cut to
    about ``limit`` characters; for a Python script the script's name (or -m module),
    not the interpreter's."""
    args = list(argv)
    if args and re.fullmatch(r"python[0-9.]*", os.path.basename(args[0])):
        rest = args[1:]
        while rest and rest[0].startswith("-") and rest[0] not in ("-", "-m", "-c"):
            option = rest.pop(0)
            if option in _PYTHON_VALUE_OPTIONS and rest:
                rest.pop(0)
        if rest and rest[0] == "-m" and len(rest) > 1:
            args = rest[1:]  # the module's name stands for the program
        elif rest and rest[0] not in ("-", "-c"):
            args = rest
    if not args:
        return ""
    words = [_one_line(os.path.basename(args[0]))] + [_one_line(arg) for arg in args[1:]]
    words = [word for word in words if word]
    text = ""
    for word in words:
        if text and len(text) + 1 + len(word) > limit:
            return text + " ..."
        text = f"{text} {word}" if text else word
    return text


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
    "reactive_energy": ("reactive_energy_var_hours", True, ()),
    "apparent_energy": ("apparent_energy_volt_ampere_hours", True, ()),
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
    "var": "vars",
    "VA": "volt_amperes",
    "Hz": "hertz",
    "deg": "degrees",
}

FUNCTION_PREFIXES = {"instantaneous": "", "maximum": "max_", "minimum": "min_", "error": "error_"}

# HELP texts of the families whose meaning is known; others get a generic one.
HELP = {
    "up": "1 if the meter at this address was read in this run, 0 if not.",
    "read_duration_seconds": "Time spent reading the meter at this address in this run.",
    "last_success_timestamp_seconds": "Unix time of the last successful read of this address.",
    "meter_info": "Identity of the meter that answered at this address.",
    "host_clock_valid": "1 if the host's clock is plausible (after the release, near the "
    "meters' clocks), 0 if not: then no last-success time is taken from it.",
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
    "clock_timestamp_seconds": "The meter's clock, its local time read as this host's time zone "
    "(its summer-time bit decides the autumn's repeated hour).",
    "register_date_timestamp_seconds": "Stored date (e.g. the target date), local midnight.",
    "manufacturer_register": "A manufacturer-specific register, raw value.",
    "reserved_register": "A record whose VIF code EN 13757-3 still reserves, raw value.",
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
     "access_code_developer", "password", "security_key")
)  # fmt: skip

# le and quantile belong to histograms and summaries; Prometheus sets job and instance.
PROMETHEUS_LABELS = frozenset(("le", "quantile", "job", "instance"))

RESERVED_LABELS = frozenset(
    ("meter", "address", "bus", "sensor", "flag", "storage", "tariff", "subunit", "register",
     "manufacturer", "version", "medium", "vife", "vib", "record", "unit", *IDENTIFIERS)
)  # fmt: skip


def _metric_part(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]+", "_", text).strip("_").lower()


def _local_timestamp(text: str, utc_offset: str | None = None) -> float | None:
    """Seconds since the epoch of a meter's local date or date-time, in this host's zone
    (at ``utc_offset`` when the meter's SU bit placed it)."""
    import datetime as dt

    try:
        if utc_offset:
            return dt.datetime.fromisoformat(text + utc_offset).timestamp()
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
        value = _local_timestamp(value, record.utc_offset)
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
    elif quantity == "reserved":  # a code with no meaning yet: the raw value, by its VIB
        base = "reserved_register"
        labels = (("vib", record.vib.hex()),)
        named.update(record.modifiers)  # the VIB label already says them
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
    reprogrammed), so id, manufacturer, version and medium together (as the labels of
    kamstrup_meter_info say them)."""
    version = "" if telegram.version is None else str(telegram.version)
    return (meter_label(telegram, address), telegram.manufacturer or "", version,
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
        try:
            done = chain(pending, telegram)
        except MeterError as exc:  # as the live read failed
            readings.append(Reading(telegram.address, error=str(exc)))
            pending = []
            continue
        if done:
            readings.append(Reading(pending[0].address, merge_telegrams(pending)))
            pending = []
    if pending:
        readings.append(Reading(pending[0].address, merge_telegrams(pending)))
    return readings


# --- The host's clock ------------------------------------------------------------------
#
# kamstrup_last_success_timestamp_seconds is the host's clock.  A clock that is wrong (a
# board without a real-time clock boots in 1970 and reads the meters before NTP; a clock
# set hours ahead) must not leave a time that looks true and is carried forward run after
# run.  What the tool can know:
# - Before this release's date the clock is wrong for sure: the package did not exist.
# - "In the future" needs a second clock.  The meters' own clocks (a type F date-time
#   record, which MULTICAL 302/603 send) are one, read in this run: a host clock more than
#   CLOCK_MARGIN from every meter's is wrong (one meter whose clock was never set does
#   not outvote the host when another meter agrees with it).  The margin is wide: a meter
#   that ignores summer time is an hour off all summer, and meter clocks drift minutes a
#   year; two hours off is caught.  A meter set to UTC, far from Greenwich, is taken as
#   right: the line names the meter's time, so the person sees which clock to set.
# - The previous file is the other: its last-success times were written by earlier runs,
#   so one later than now means the clock was ahead then, or is behind now (a board that
#   boots with the time it saved at shutdown).  Without a meter's clock the tool cannot
#   tell which: now is not trusted, and the times ahead of it are dropped (kept, a clock
#   ahead then would make every later run look wrong until the real time passed them).
#   With a meter's clock that agrees with now, the clock was ahead then: now is valid.
# The dates a meter sends are converted with the host's zone rules for their own date
# (_utc_offset, _local_timestamp): they never read the host's current time.

RELEASED = "2026-11-25"  # debian/changelog's newest entry: a host clock before it is wrong
CLOCK_MARGIN = 5400.0  # seconds the host's clock may be off every meter's clock
KEPT_MARGIN = 300.0  # seconds a kept last-success time may be ahead of now (NTP slewing)
_ADVICE = "set it (NTP: systemd-timesyncd or chrony; a real-time clock on a board without one)"


class HostClock(_Plain):
    """The host's clock at a run: ``reason`` it is wrong (None: plausible), and the best
    guess of the present that kept times are judged by (None: nothing to judge by)."""

    __slots__ = ("now", "reason", "present")

    def __init__(self, now: float, reason: str | None = None, present: float | None = None):
        self.now = now
        self.reason = reason
        self.present = present


def _utc_text(when: float) -> str:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    except (OverflowError, ValueError, OSError):
        return repr(when)


def meter_clocks(readings: Sequence[Reading]) -> list:
    """Each meter's own clock as it answered in this run (seconds since the epoch): its
    current date-time record (type F or I: a date and a time)."""
    clocks = []
    for reading in readings:
        if reading.telegram is None:
            continue
        for record in reading.telegram.records:
            if (record.quantity == "datetime" and record.storage == 0
                    and record.function == "instantaneous"
                    and isinstance(record.value, str) and "T" in record.value):  # fmt: skip
                when = _local_timestamp(record.value, record.utc_offset)
                if when is not None:
                    clocks.append(when)
                    break
    return clocks


def host_clock(now: float, readings: Sequence[Reading] = (), previous=None) -> HostClock:
    """Whether ``now`` is plausible (see above); ``readings``: a live read's, whose meters'
    clocks are a second clock (a decoded capture's are as old as the capture)."""
    import statistics

    released = _released()
    clocks = meter_clocks(readings)
    meters = statistics.median(clocks) if clocks else None
    said = f"the host's clock says {_utc_text(now)}"
    if now < released:
        reason = f"{said}, before this release ({RELEASED})"
        return HostClock(now, f"{reason}: no time from it is kept; {_ADVICE}", meters)
    if meters is not None and all(abs(now - when) > CLOCK_MARGIN for when in clocks):
        off = now - meters
        side = "ahead of" if off > 0 else "behind"
        reason = f"{said}, {abs(off) / 3600:.1f} h {side} the meter's ({_utc_text(meters)})"
        return HostClock(now, f"{reason}: no time from it is kept; {_ADVICE}", meters)
    kept = previous.last_success.values() if previous is not None else ()
    later = [when for when in kept if when > now + KEPT_MARGIN]
    if later and not clocks:
        reason = (f"{said}, before a last-success time the previous run wrote "
                  f"({_utc_text(max(later))}): it is behind now, or was ahead then")  # fmt: skip
        return HostClock(now, f"{reason}: no time from it is kept; {_ADVICE}", now)
    return HostClock(now, None, now)


def clock_check(now: float, readings: Sequence[Reading] = (), previous=None) -> str | None:
    """Why the host's clock is wrong, in one line, or None (see host_clock)."""
    return host_clock(now, readings, previous).reason


def _released() -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(RELEASED).replace(tzinfo=dt.timezone.utc).timestamp()


def kept_last_success(previous, clock: HostClock) -> dict:
    """The previous file's last-success times that a right clock could have written: not
    before the release, not ahead of the present (when there is one to judge by)."""
    released = _released()
    return {
        address: when
        for address, when in previous.last_success.items()
        if when >= released and (clock.present is None or when <= clock.present + KEPT_MARGIN)
    }


def exposition(readings: Sequence[Reading], const_labels=(), previous=None,
               bus: str = "kamstrup", clock: HostClock | None = None) -> str:  # fmt: skip
    """The whole .prom text for a run; ``previous``: what the previous file said;
    ``clock``: host_clock() of this run (by default of now, with these readings).

    Series of an address carry ``bus`` (two configurations writing into one textfile
    directory never write the same series), and kamstrup_up the meter's serial number
    when it is known, from this read or the previous file's (alerts follow a meter
    whose address changes)."""
    previous = previous or Previous()
    if clock is None:
        clock = host_clock(time.time(), readings, previous)
    exp = Exposition(const_labels)
    last_success = kept_last_success(previous, clock)
    now = clock.now if clock.reason is None else None  # no time from a wrong clock
    exp.add("host_clock_valid", (("bus", bus),), 1 if clock.reason is None else 0)
    for reading in readings:
        address = (("address", str(reading.address)), ("bus", bus))
        up = reading.telegram is not None
        if up:
            known = meter_label(reading.telegram, reading.address)
        else:
            known = previous.meters.get(str(reading.address))
        exp.add("up", address + ((("meter", known),) if known else ()), 1 if up else 0)
        exp.add("read_duration_seconds", address, round(reading.duration, 6))
        if up and now is not None:
            last_success[str(reading.address)] = now
        if up:
            t = reading.telegram
            meter, manufacturer, version, medium = identity(t, reading.address)
            exp.add(
                "meter_info",
                address
                + (
                    ("meter", meter),
                    ("manufacturer", manufacturer),
                    ("version", version),
                    ("medium", medium),
                )
                + identifier_labels(t),
                1,
            )
        when = last_success.get(str(reading.address))
        if when is not None:
            exp.add("last_success_timestamp_seconds", address, round(when, 3))
    meters = first_of_each_meter(readings)
    shared = shared_ids(readings, previous)
    for reading in meters:
        meter = meter_label(reading.telegram, reading.address)
        labels: tuple = (("meter", meter),)
        if meter in shared:  # two meters with one id: told apart by their address
            labels += (("address", str(reading.address)),)
        add_telegram(exp, reading.telegram, labels)
    return exp.render()


def shared_ids(readings: Sequence[Reading], previous) -> set:
    """The ids that two different meters of this bus have: those of this run, those the
    previous file saw at an address not read now, and those it already told apart.  So
    a meter's series keep their labels, and never get the other one's values, whichever
    of the two answers in a run."""
    seen: dict = {}  # address -> identity
    for reading in readings:
        key = str(reading.address)
        if reading.telegram is not None:
            seen[key] = identity(reading.telegram, reading.address)
        elif key in previous.identities:
            seen[key] = previous.identities[key]
    by_id: dict = {}
    for meter, *rest in seen.values():
        by_id.setdefault(meter, set()).add(tuple(rest))
    return {meter for meter, kinds in by_id.items() if len(kinds) > 1} | previous.told_apart


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


_SAMPLE_LABELS = re.compile(
    r'^kamstrup_(\w+)\{((?:[a-zA-Z_]\w*="(?:[^"\\]|\\.)*",?)*)\}\s+(\S+)\s*$', re.M
)
_LABEL_PAIR = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')


def _unescape_label(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), text)


_PREVIOUS_LIMIT = 16 << 20  # bytes of the previous file read


class Previous(_Plain):
    """What the previous file said, carried over to this run: each address's last good
    read (survives failed runs), the identity of the meter that answered at it, and the
    ids of meters already told apart by their address."""

    __slots__ = ("last_success", "identities", "told_apart", "meters", "buses")

    def __init__(self, last_success=None, identities=None, told_apart=None, meters=None,
                 buses=None):  # fmt: skip
        self.last_success = last_success or {}
        self.identities = identities or {}
        self.told_apart = told_apart or set()
        self.meters = meters or {}  # address -> the serial number kamstrup_up carried
        self.buses = buses or set()  # the bus labels the file carries


_PER_ADDRESS = frozenset(("up", "read_duration_seconds", "last_success_timestamp_seconds",
                          "meter_info"))  # fmt: skip


def read_previous(path: str) -> Previous:
    """The previous file's Previous.  Only a regular file is read (a fifo would block,
    /dev/zero never end), and only as much as a .prom file of ours can be."""
    import stat

    previous = Previous()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return previous
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return previous
        with os.fdopen(fd, "rb", closefd=False) as f:
            text = f.read(_PREVIOUS_LIMIT).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return previous
    finally:
        os.close(fd)
    for family, labels, value in _SAMPLE_LABELS.findall(text):
        pairs = {k: _unescape_label(v) for k, v in _LABEL_PAIR.findall(labels)}
        address = pairs.get("address")
        if "bus" in pairs and family in _PER_ADDRESS:
            previous.buses.add(pairs["bus"])
        if family == "up" and address is not None and pairs.get("meter"):
            previous.meters[address] = pairs["meter"]
        if family == "last_success_timestamp_seconds" and address is not None:
            try:
                previous.last_success[address] = float(value)
            except ValueError:
                pass
        elif family == "meter_info" and address is not None and "meter" in pairs:
            previous.identities[address] = tuple(
                pairs.get(k, "") for k in ("meter", "manufacturer", "version", "medium")
            )
            previous.meters[address] = pairs["meter"]
        elif family not in _PER_ADDRESS and "meter" in pairs and address is not None:
            previous.told_apart.add(pairs["meter"])
    return previous


def previous_last_success(path: str) -> dict:
    """The last-success times kept in the previous file, so they survive failed runs."""
    return read_previous(path).last_success


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
        shape = (record.dib, record.vib, record.storage, record.quantity, record.unit,
                 record.utc_offset)  # fmt: skip
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


def check_output(path: str) -> str:
    """The real path ``path`` leads to, if a file can be written there: found before a
    meter is read (its battery pays for every read), and again by write_atomic."""
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
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise OutputError(f"cannot write into {directory}: No such directory")
    if not os.access(directory, os.W_OK):
        raise OutputError(f"cannot write into {directory}: Permission denied or read-only")
    return path


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new, never half.

    A temporary file in the same directory (its name does not end in .prom, so
    node_exporter ignores it), mode 0644, flushed and fsynced, renamed over the
    target, then the directory fsynced.  Any failure removes the temporary file.
    A link is followed (its target is replaced, not the link); anything but a regular
    file (a device such as /dev/null, a directory) is refused, never replaced.
    The temporary is flock'ed from just after its creation until it has been renamed:
    that, not the pid in its name, tells another run's sweep it is being written.
    """
    path = check_output(path)
    _remove_stale_temporaries(path)
    directory = os.path.dirname(path)
    base = os.path.basename(path)
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.tmp")
    data = text.encode("utf-8")
    fd = _create_locked(tmp, directory)
    try:
        try:
            os.fchmod(fd, 0o644)  # whatever the umask
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
            os.replace(tmp, path)
        finally:
            os.close(fd)  # lets the lock go, once the temporary is no more
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


def _create_locked(tmp: str, directory: str) -> int:
    """Create ``tmp`` and flock it.  Between the two another run's sweep may find it
    unlocked and remove it: then it is created again (the sweep removes only files it
    has locked itself, so once ours is locked and still linked, it stays)."""
    import fcntl

    why = "its temporary file keeps vanishing"
    for _ in range(10):
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # a sweep is removing it just now, or it cannot be removed
            why = f"{os.path.basename(tmp)} is in the way"
            time.sleep(0.01)
            continue
        except OSError as exc:
            raise OutputError(f"cannot write into {directory}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a sweep looks at it
            if os.fstat(fd).st_nlink:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # swept away before we had it locked: make it anew
        why = "its temporary file keeps vanishing"
    raise OutputError(f"cannot write into {directory}: {why}")


def others_carrying(path: str, readings: Sequence[Reading], bus: str) -> list:
    """[(file, what)] for each other .prom file beside ``path`` that carries a meter this
    run read, or this run's bus: a renamed KAMSTRUP_OUTPUT leaves the old file behind,
    and two configurations may read one meter."""
    meters = {meter_label(r.telegram, r.address) for r in readings if r.telegram is not None}
    directory = os.path.dirname(os.path.realpath(path))
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    out = []
    for name in names:
        other = os.path.join(directory, name)
        if not name.endswith(".prom") or same_file(other, path):
            continue
        previous = read_previous(other)
        shared = sorted(meters & set(previous.meters.values()))
        if shared:
            out.append((other, "meter " + ", ".join(shared)))
        elif bus in previous.buses:
            out.append((other, f"bus {bus!r}"))
    return out


def same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _remove_stale_temporaries(path: str) -> None:
    """Temporary files a killed run left behind: those no live writer holds locked.

    Their names carry the writer's pid, but pids are reused (a dead run's pid may now
    be any process's, ours too): only the lock tells.  A candidate is removed while we
    hold its lock, and only if its name still leads to the file we locked.
    """
    import fcntl
    import stat

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
        if not (pid.isascii() and pid.isdigit()) or int(pid) == 0:
            continue  # not a name we give
        candidate = os.path.join(directory, name)
        try:
            fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # gone already, a link, or not ours to open
        try:
            found = os.fstat(fd)
            if not stat.S_ISREG(found.st_mode):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            now = os.lstat(candidate)
            if (now.st_dev, now.st_ino) == (found.st_dev, found.st_ino):
                os.unlink(candidate)
        except OSError:
            pass  # locked: a live writer's (or renamed or removed meanwhile)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------
# 6. Command line
# ---------------------------------------------------------------------------

import click  # noqa: E402  (kept here: the layers above do not need it)

DECODE_LIMIT = 64 << 20  # characters of --decode input: a capture, not an endless device
PROG = "kamstrup-textfile"  # the name when click cannot tell how we were invoked
DEFAULT_OUTPUT = "/var/lib/prometheus/node-exporter/kamstrup.prom"


class AddressType(click.ParamType):
    """A primary address 0-250 or 254, or an 8-digit secondary address."""

    name = "address"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            text = str(value)
        else:
            text = str(value).strip()
        if re.fullmatch(r"[0-9]{8}", text):
            return text
        if re.fullmatch(r"[0-9]{1,3}", text):
            number = int(text)
            if number <= 250 or number == ADDRESS_ANY:
                return number
        self.fail(
            f"{value!r} is not a primary address (0-250, or 254 for the only meter on the bus) "
            "nor an 8-digit secondary address",
            param,
            ctx,
        )


class SecondsType(click.FloatRange):
    """A number of seconds in a range; NaN, which every range check lets through, is not."""

    name = "seconds"

    def convert(self, value, param, ctx):
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return seconds


AUTO_RATES = (2400, 9600, 300)  # --baudrate auto tries these, in this order


BAUD_RATES = (300, 600, 1200, 2400, 4800, 9600, 19200, 38400)  # EN 13757-2's


class BaudrateType(click.ParamType):
    """One of M-Bus's baud rates, or "auto" (try 2400, 9600 and 300); another number is
    a typo (2040, 9500) that would only end in "no answer"."""

    name = "rate|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "auto":
            return value
        text = str(value).strip().lower()
        if text == "auto":
            return "auto"
        if text.isdigit() and int(text) in BAUD_RATES:
            return int(text)
        rates = ", ".join(map(str, BAUD_RATES))
        self.fail(f"{value!r} is not an M-Bus baud rate ({rates}), nor auto", param, ctx)


class LabelType(click.ParamType):
    name = "name=value"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        name, sep, text = _utf8(str(value)).partition("=")  # UTF-8 whatever the locale
        if not sep:
            self.fail(f"{value!r} is not NAME=VALUE", param, ctx)
        if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
            self.fail(f"{name!r} is not a valid Prometheus label name", param, ctx)
        if name in RESERVED_LABELS or name.startswith(tuple(f"{i}_" for i in IDENTIFIERS)):
            self.fail(f"label {name!r} is set by the tool itself", param, ctx)
        if name in PROMETHEUS_LABELS:
            self.fail(f"label {name!r} has a meaning of its own in Prometheus", param, ctx)
        try:  # the environment's bytes arrive as surrogates when they are not UTF-8
            text.encode("utf-8")
        except UnicodeEncodeError:
            self.fail(
                f"the value of label {name!r} is not UTF-8 (an EnvironmentFile in Latin-1?)",
                param,
                ctx,
            )
        return (name, text)


# Settings: the file kamstrup.service reads, then the environment, then the command line.
# A hand run (`kamstrup-textfile --once`) is so the timer's run.  Only the names below
# are read: the environment is an interface, not a side door (click's automatic
# KAMSTRUP_<PARAMETER> names took KAMSTRUP_VERSION=1.2 for --version and KAMSTRUP_LABELS
# for --label).

SETTINGS_FILE = "/etc/default/kamstrup"
CONFIG_VARIABLE = "KAMSTRUP_CONFIG"  # the settings file, from the environment only
SETTINGS = {  # name -> the option it sets (a parameter of cli())
    "KAMSTRUP_PORT": "port",
    "KAMSTRUP_BAUDRATE": "baudrate",
    "KAMSTRUP_ADDRESS": "addresses",
    "KAMSTRUP_TIMEOUT": "timeout",
    "KAMSTRUP_RETRIES": "retries",
    "KAMSTRUP_OUTPUT": "output",
    "KAMSTRUP_BUS": "bus",
    "KAMSTRUP_LABEL": "labels",
    "KAMSTRUP_FORMAT": "fmt",
    "KAMSTRUP_CAPTURE": "capture_file",
}
ACTIONS = {  # names a person may try; actions come from the command line only
    "KAMSTRUP_ONCE": "--once", "KAMSTRUP_SCAN": "--scan",
    "KAMSTRUP_SCAN_SECONDARY": "--scan-secondary", "KAMSTRUP_DECODE": "--decode",
    "KAMSTRUP_VERSION": "--version", "KAMSTRUP_HELP": "--help", "KAMSTRUP_VERBOSE": "-v",
}  # fmt: skip


class SettingsError(ValueError):
    """A settings file that systemd would refuse whole."""


def read_settings(path: str) -> dict:
    """NAME -> value of a settings file, as systemd's EnvironmentFile= passes them.

    Its parser, not a shell's: quotes count only where a value starts (after ``=`` or a
    closing quote), a ``# comment`` after a value is part of it, blanks after an
    unquoted value and the CR of a CR LF line go, a backslash-newline continues a line,
    lines starting with # or ; are comments, a key that is not a variable name (``export
    X``) is ignored.  The last of a name wins.  Raises OSError if the file cannot be
    read, and SettingsError where systemd refuses the whole file (the service then does
    not start): a NUL byte, a name or value that is not UTF-8."""
    with open(path, "rb") as f:
        data = f.read(1 << 20)
    if b"\0" in data:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise SettingsError(f"line {line} holds a NUL byte")
    text = data.decode("utf-8", "surrogateescape")
    out: dict = {}
    key: list = []
    value: list = []
    state = "pre_key"
    key_blank = value_blank = None  # where trailing blanks of the key / value begin
    newline, blank = "\n\r", " \t\n\r"

    def push() -> None:
        name = "".join(key[:key_blank] if key_blank is not None else key)
        text = "".join(value)
        if _has_surrogates(name + text):
            raise SettingsError(f"{_utf8(name)!r} is not UTF-8")
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            out[name] = text

    for c in text:
        if state == "pre_key":
            if c in "#;":
                state = "comment"
            elif c not in blank:
                state, key, value, key_blank = "key", [c], [], None
        elif state == "key":
            if c in newline:
                state = "pre_key"
            elif c == "=":
                state, value_blank = "pre_value", None
            else:
                if c not in blank:
                    key_blank = None
                elif key_blank is None:
                    key_blank = len(key)
                key.append(c)
        elif state == "pre_value":
            if c in newline:
                push()
                state = "pre_key"
            elif c == "'":
                state = "single"
            elif c == '"':
                state = "double"
            elif c == "\\":
                state = "value_escape"
            elif c not in blank:
                state = "value"
                value.append(c)
        elif state == "value":
            if c in newline:
                if value_blank is not None:
                    del value[value_blank:]
                push()
                state = "pre_key"
            elif c == "\\":
                state, value_blank = "value_escape", None
            else:
                if c not in blank:
                    value_blank = None
                elif value_blank is None:
                    value_blank = len(value)
                value.append(c)
        elif state == "value_escape":
            state = "value"
            if c not in newline:  # a backslash-newline is eaten whole
                value.append(c)
        elif state == "single":
            if c == "'":
                state = "pre_value"
            else:
                value.append(c)
        elif state == "double":
            if c == '"':
                state = "pre_value"
            elif c == "\\":
                state = "double_escape"
            else:
                value.append(c)
        elif state == "double_escape":
            state = "double"
            if c in '"\\`$':
                value.append(c)
            elif c != "\n":
                value += ["\\", c]
        elif state == "comment":
            if c == "\\":
                state = "comment_escape"
            elif c in newline:
                state = "pre_key"
        else:  # comment_escape
            state = "comment"
    if state == "value" and value_blank is not None:  # the end of the file ends a line
        del value[value_blank:]
    if state in ("pre_value", "value", "value_escape", "single", "double", "double_escape"):
        push()  # a quote left open at the end of the file: what it holds
    return out


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in text)


def _utf8(text: str) -> str:
    """A command-line argument or environment value as the UTF-8 text its bytes are,
    whatever the locale (LC_ALL=C with PYTHONUTF8=0 hands them over as surrogates);
    bytes that are not UTF-8 stay surrogates, which the checks below refuse."""
    if not _has_surrogates(text):
        return text
    try:
        return os.fsencode(text).decode("utf-8", "surrogateescape")
    except UnicodeError:
        return text


class Setting(_Plain):
    """One setting's value as text and where it came from ("KAMSTRUP_PORT in
    /etc/default/kamstrup", "KAMSTRUP_PORT in the environment")."""

    __slots__ = ("name", "text", "where")

    def __init__(self, name: str, text: str, where: str):
        self.name, self.text, self.where = name, text, where


def settings(config: str | None, environ) -> tuple:
    """({parameter: Setting} from the settings file, then the environment; the same from
    the file alone; [warnings]).

    ``config``: the settings file (None: $KAMSTRUP_CONFIG, else /etc/default/kamstrup; a
    default file that does not exist is no settings).  Values are stripped of
    surrounding blanks (a trailing space made a file node_exporter never reads); a
    name we do not know is a warning that names the nearest one we do."""
    import difflib

    explicit = config is not None or CONFIG_VARIABLE in environ
    path = config if config is not None else environ.get(CONFIG_VARIABLE, SETTINGS_FILE)
    path = path.strip()
    found: dict = {}
    warnings: list = []
    seen_unknown: set = set()
    sources = []
    if path:
        try:
            sources.append((read_settings(path), f"in {_utf8(path)}"))
        except FileNotFoundError:
            if explicit:
                raise click.UsageError(f"settings file {_utf8(path)} does not exist") from None
        except OSError as exc:
            raise click.UsageError(
                f"cannot read settings file {_utf8(path)}: {exc.strerror or exc}"
            ) from None
        except SettingsError as exc:
            raise click.UsageError(
                f"settings file {_utf8(path)}: {exc}: systemd refuses the whole file "
                "(kamstrup.service does not start)"
            ) from None
    from_file = sources[0][0] if sources else {}
    sources.append(({k: v for k, v in environ.items() if k.startswith("KAMSTRUP_")},
                    "in the environment"))  # fmt: skip
    in_file: dict = {}
    for values, where in sources:
        if where == "in the environment":
            in_file = dict(found)
        for name, text in values.items():
            if name in SETTINGS:
                text = _utf8(text).strip()
                if where == "in the environment" and from_file.get(name, "").strip() == text:
                    continue  # systemd passed the file's own line on: keep saying the file
                if text:
                    found[SETTINGS[name]] = Setting(name, text, f"{name} {where}")
                else:
                    found.pop(SETTINGS[name], None)  # NAME= (empty): the default again
                continue
            if name == CONFIG_VARIABLE:
                if where != "in the environment":
                    warnings.append(f"{name} {where} has no effect there: it names the file")
                continue
            if not name.startswith("KAMSTRUP_") or name in seen_unknown:
                continue
            seen_unknown.add(name)
            if name in ACTIONS:
                warnings.append(f"{name} {where} is ignored: {ACTIONS[name]} is given on "
                                "the command line only")  # fmt: skip
                continue
            near = difflib.get_close_matches(name, list(SETTINGS), n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]}?)" if near else ""
            warnings.append(f"{name} {where} is not a setting of {PROG}{hint}: ignored")
    return found, in_file, warnings


def _setting_value(ctx, param: str, setting: Setting):
    """A setting's text as its option's type reads it, or one line naming the setting."""
    (option,) = [p for p in ctx.command.params if p.name == param]
    words = _split_labels(setting) if param == "labels" else setting.text.split()
    if any(word.startswith("#") for word in words):
        raise click.UsageError(
            f"{setting.where} ends in a comment ({setting.text!r}): systemd keeps a # "
            "after a value as part of it; put comments on lines of their own"
        )
    try:
        if param in ("addresses", "labels"):
            return tuple(option.type.convert(word, option, ctx) for word in words)
        return option.type.convert(setting.text, option, ctx)
    except click.BadParameter as exc:
        hint = ""
        if param == "labels" and "is not NAME=VALUE" in exc.message:
            hint = (" (a label value with blanks is quoted, and the whole value too: "
                    f"{setting.name}='location=\"boiler room\"')")  # fmt: skip
        raise click.UsageError(f"{setting.where}: {exc.message}{hint}") from None


def _split_labels(setting: Setting) -> list:
    """KAMSTRUP_LABEL's words, shell-style: 'location="boiler room" building=north'."""
    import shlex

    try:
        return shlex.split(setting.text)
    except ValueError as exc:  # No closing quotation
        raise click.UsageError(f"{setting.where}: {exc} in {setting.text!r}") from None


DEFAULTS = {  # what a setting is when neither the command line nor a setting gives it
    "port": "/dev/ttymeterBus", "baudrate": 2400, "addresses": (), "timeout": None,
    "retries": 2, "output": None, "bus": None, "labels": (), "fmt": "prom",
    "capture_file": None,
}  # fmt: skip


def _default_bus(output: str) -> str:
    """The output file's name without .prom: unique in one textfile directory, and the
    same when the port is renamed or a meter gets another address."""
    name = _utf8(os.path.basename(output))
    return name[: -len(".prom")] if name.endswith(".prom") and name != ".prom" else name


def _differ(value: dict, conf: dict, given: dict, where: dict) -> str:
    """What of this run's meters is not the configuration's ("" when nothing is): the
    port, the addresses (in any order), the bus, the labels; named as they were given."""
    out = []
    for param, option in (("port", "--port"), ("addresses", "--address"), ("bus", "--bus"),
                          ("labels", "--label")):  # fmt: skip
        mine, theirs = value[param], conf[param]
        if param == "port" and "://" not in mine + theirs and same_file(mine, theirs):
            continue  # /dev/ttyUSB0 for the link /dev/ttymeterBus is the same bus
        if param == "addresses":
            mine, theirs = set(mine or (ADDRESS_ANY,)), set(theirs or (ADDRESS_ANY,))
        elif param == "labels":
            mine, theirs = sorted(mine), sorted(theirs)
        if mine != theirs:
            out.append(option if param in given else where.get(param, option))
    return " and ".join(out)


def _live_file_guard(value: dict, conf: dict, given: dict, where: dict, conf_where: dict
                     ) -> str:  # fmt: skip
    """The output of a --once that would write the live file (the configuration's): that
    file, unless this run reads other meters than the configuration names (a hand run
    with --address 48 would make it forget the other meters and their last-success
    times): then stdout, or a usage error when --output named the live file itself."""
    output = value["output"]
    differ = _differ(value, conf, given, where)
    if not differ:
        return output
    if "output" in given:
        raise click.UsageError(
            f"--output {_utf8(output)} is the live file, and this run's {differ} "
            f"is not the configuration's: it would forget meters (use another file or -)"
        )
    _fail(
        f"{differ} {'is' if ' and ' not in differ else 'are'} not the configuration's "
        f"({_described(conf, conf_where)}): {_utf8(output)} is left as it is; the readings go to "
        "standard output (--output FILE writes them to a file)"
    )
    return "-"


def _described(conf: dict, where: dict) -> str:
    """The configuration's meters in a few words, and where they were set."""
    addresses = " ".join(str(a) for a in conf["addresses"]) or str(ADDRESS_ANY)
    source = where.get("addresses") or where.get("port") or "the defaults"
    return f"port {_utf8(conf['port'])}, address {addresses}; {source}"


def _emit(text: str, output: str) -> None:
    if output == "-":
        _stdout(text)
        return
    write_atomic(output, text)


def _stdout(text: str) -> None:
    """Write to stdout as UTF-8 whatever the locale says; a full disk, a closed pipe or a
    closed stdout is an OutputError, said once."""
    if sys.stdout is None:
        raise OutputError("cannot write to standard output: it is closed")
    try:
        binary = getattr(sys.stdout, "buffer", None)
        if binary is None:
            sys.stdout.write(text)
        else:
            sys.stdout.flush()
            binary.write(text.encode("utf-8"))
        sys.stdout.flush()
    except OSError as exc:
        try:  # what is still buffered must not fail again when Python exits
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        raise OutputError(f"cannot write to standard output: {_reason(exc)}") from None


def _prog() -> str:
    """The command's name as it was invoked (kamstrup-textfile, kamstrup_textfile.py)."""
    ctx = click.get_current_context(silent=True)
    return (ctx.find_root().info_name if ctx else None) or PROG


def _say(text: str, nl: bool = True) -> None:
    """A line on stderr (a diagnostic, a frame of -v, progress); a stderr that cannot
    be written (a full disk, a closed pipe) must not cost the reading: it is let go."""
    line = text + ("\n" if nl else "")
    try:
        data = line.encode("utf-8", "surrogateescape")  # a name's bytes as they came
    except UnicodeEncodeError:
        data = line.encode("utf-8", "backslashreplace")
    try:
        binary = getattr(sys.stderr, "buffer", None)
        if binary is None:  # a test's stream, or a stderr without bytes
            click.echo(text, err=True, nl=nl)
            return
        sys.stderr.flush()
        binary.write(data)  # UTF-8 whatever the locale: the journal's encoding
        binary.flush()
    except (OSError, ValueError, AttributeError):
        pass


def _fail(message: str) -> None:
    """One line on stderr, whatever the message holds (a port or file name with a line
    break in it)."""
    _say(f"{_prog()}: {_one_line(message)}")


def checked_clock(readings, previous, live: bool) -> HostClock:
    """The host's clock for this run's file, said in one line when it is wrong; the
    meters' clocks count only in a live read (a capture's are as old as the capture)."""
    clock = host_clock(time.time(), readings if live else (), previous)
    if clock.reason is not None:
        _fail(clock.reason)
    return clock


class Stopped(BaseException):
    """SIGTERM (systemd's timeout, a shutdown), Ctrl-C or SIGHUP (a closed SSH session):
    the read stops where it is."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        import signal

        return signal.Signals(self.signum).name


_STOPPING = {"signum": None, "raise_": True}  # what the handler does; see main()


def _stop(signum, frame) -> None:
    """The first SIGTERM, SIGINT or SIGHUP stops the read (unwinding: no temporary is left, the
    meters not read are written as such); once the output is being written, a signal
    waits for the write to end, and the exit status is 128 + the signal's number."""
    if _STOPPING["signum"] is None:
        _STOPPING["signum"] = signum
    if _STOPPING["raise_"]:
        _STOPPING["raise_"] = False  # a second signal waits for the write to end
        raise Stopped(signum)


def read_meters(url: str, addresses, *, baudrate, timeout, retries, log, on_answer=None,
                on_refused=None) -> list:  # fmt: skip
    """Read every address in turn, one Reading each (``on_answer``, ``on_refused``: see
    Bus.on_answer and Bus.on_refused).

    A port that fails (an adapter unplugged or reset) fails the meter being read; it
    is opened anew for the next one, and when that fails too, the meters left get that
    error.  A meter that stays silent while another program has the port open is told so.
    With ``baudrate`` "auto" each meter is read at the first rate it answers at, trying
    first the rate the bus last answered at (the first auto rate while none has): a
    meter that answered at no rate leaves the bus at the last rate tried (300), where
    the meters after it would all be read slowly, and after a long wait at that.
    Stopped by a signal, the meters not read yet get that as their error.
    """
    rates = list(AUTO_RATES) if baudrate == "auto" else [baudrate]
    readings: list = []
    bus = None
    port_error = None
    answered = rates[0]  # the rate the bus last answered at
    try:
        for address in addresses:
            start = time.monotonic()
            if bus is None and port_error is None:
                try:
                    port = open_port(url, answered)
                except BusError as exc:
                    port_error = str(exc)
                else:
                    bus = Bus(port, baudrate=answered, timeout=timeout, retries=retries, log=log)
                    bus.on_answer = on_answer
                    bus.on_refused = on_refused
            if port_error is not None:
                readings.append(Reading(address, error=port_error, port=True))
                continue
            try:
                telegram = _read_at_some_rate(bus, address, rates, log, first=answered)
                answered = bus.baudrate
                readings.append(Reading(address, telegram, duration=time.monotonic() - start))
            except BusError as exc:
                if isinstance(exc, PortError):
                    _close(bus.port)
                    bus = None
                error = str(exc)
                readings.append(Reading(address, error=error, duration=time.monotonic() - start))
    except Stopped as exc:
        readings += [
            Reading(address, error=f"not read: stopped by {exc.name}")
            for address in addresses[len(readings) :]
        ]
    finally:
        if bus is not None:
            _close(bus.port)
    if any(r.error and not r.port and "stopped by" not in r.error for r in readings):
        holders = port_holders(url)
        if holders:
            for reading in readings:
                if reading.error and not reading.port:
                    reading.error += f"; {url} is also open in {holders}, which may eat answers"
    return readings


def _read_at_some_rate(bus: Bus, address, rates: list, log, first=None) -> Telegram:
    """Read at ``first`` (by default the bus's rate), then at the others while the meter
    stays silent."""
    first = bus.baudrate if first is None else first
    order = [first] + [rate for rate in rates if rate != first]
    for rate in order:
        bus.set_baudrate(rate)
        heard = bus.heard
        try:
            telegram = bus.read(address)
        except BusError as exc:
            if len(order) == 1 or bus.heard > heard or isinstance(exc, PortError):
                raise
            if rate == order[-1]:
                rates_text = ", ".join(str(r) for r in order)
                raise BusError(f"no answer at {rates_text} baud: {exc}") from None
            continue
        if log and len(rates) > 1:
            log(f"address {address}: answered at {rate} baud")
        return telegram
    raise AssertionError("unreachable")


def _close(port) -> None:
    try:
        port.close()
    except PORT_ERRORS:
        pass  # a port that went away cannot be closed any better


class _Command(click.Command):
    """click's command, with a usage error on one line ("PROG: Invalid value for ...
    (see PROG --help)") and output that cannot be written said once, not as a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **kw):
        name = prog_name or os.path.basename(sys.argv[0] if sys.argv and sys.argv[0] else PROG)
        try:
            status = super().main(args, name, complete_var, standalone_mode=False, **kw)
        except click.UsageError as exc:
            _say(f"{name}: {_one_line(exc.format_message())} (see {name} --help)")
            sys.exit(2)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            _say(f"{name}: aborted")
            sys.exit(1)
        except Stopped as exc:  # a scan or a decode: nothing to write for it
            _say(f"{name}: stopped by {exc.name}")
            sys.exit(128 + exc.signum)
        except OSError as exc:  # --help or --version into a full disk or a closed pipe
            try:
                _stdout("")
            except OutputError:
                pass
            _say(f"{name}: cannot write to standard output: {_reason(exc)}")
            sys.exit(1)
        sys.exit(status or 0)


def _setting(name: str, text: str) -> str:
    """An option's help with the setting that also gives it."""
    return f"{text} [{name}]"


@click.command(
    "kamstrup-textfile",
    cls=_Command,
    context_settings={"max_content_width": 100},
    epilog="""\b
Examples:
  kamstrup-textfile --once                                       # the timer's run, by hand
  kamstrup-textfile --port /dev/ttyUSB0 --baudrate auto --scan   # find the meters
  kamstrup-textfile --address 48 --once --output - -v            # one read, frames on stderr
  kamstrup-textfile --decode capture.hex --format json           # decode saved frames""",
)
@click.option(
    "--port",
    default=None,
    help=_setting("KAMSTRUP_PORT", "Serial device or pyserial URL (socket://host:port, "
                  "rfc2217://...).  [default: /dev/ttymeterBus]"),
)  # fmt: skip
@click.option(
    "--baudrate",
    type=BaudrateType(),
    default=None,
    help=_setting("KAMSTRUP_BAUDRATE",
                  "300, 600, 1200, 2400, 4800, 9600, 19200 or 38400, or auto: try 2400, 9600 "
                  "and 300 (with --once, each meter at the first rate it answers at; with the "
                  "scans, every rate where something answers).  [default: 2400]"),
)  # fmt: skip
@click.option(
    "--address",
    "addresses",
    type=AddressType(),
    multiple=True,
    help=_setting("KAMSTRUP_ADDRESS, space separated",
                  "Primary address 0-250, 254 (the only meter on the bus; default) or an "
                  "8-digit secondary address. Repeatable."),
)  # fmt: skip
@click.option(
    "--timeout",
    type=SecondsType(0.05, 60),
    default=None,
    help=_setting("KAMSTRUP_TIMEOUT",
                  "Seconds a meter may take to start its answer; never less than EN 13757-2's "
                  "330 bit times + 50 ms (187.5 ms at 2400 baud).  [default: 1 with --once; "
                  "that limit with --scan and --scan-secondary]"),
)  # fmt: skip
@click.option(
    "--retries",
    type=click.IntRange(0, 10),
    default=None,
    help=_setting("KAMSTRUP_RETRIES",
                  "Further tries of a request that got no answer or a garbled one, on a quiet "
                  "line.  [default: 2]"),
)  # fmt: skip
@click.option(
    "--output",
    default=None,
    help=_setting("KAMSTRUP_OUTPUT",
                  f"The .prom file to write atomically, or - for stdout.  [default: "
                  f"{DEFAULT_OUTPUT}; with --decode: -, and only --output gives another]"),
)  # fmt: skip
@click.option(
    "--bus",
    default=None,
    metavar="NAME",
    help=_setting("KAMSTRUP_BUS",
                  "The bus label on every per-address series, which tells two buses (two "
                  "configurations, one textfile directory) apart.  [default: the output "
                  "file's name without .prom]"),
)  # fmt: skip
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["prom", "json"]),
    default=None,
    help=_setting("KAMSTRUP_FORMAT",
                  "prom: node_exporter's text format; json: every record decoded (never into a "
                  ".prom file).  [default: prom]"),
)  # fmt: skip
@click.option(
    "--label",
    "labels",
    type=LabelType(),
    multiple=True,
    help=_setting("KAMSTRUP_LABEL, shell-style quoting: 'room=\"boiler room\" "
                  "building=north'", "NAME=VALUE: a constant label on every series. Repeatable."),
)  # fmt: skip
@click.option(
    "--capture",
    "capture_file",
    default=None,
    metavar="FILE",
    help=_setting("KAMSTRUP_CAPTURE",
                  "With --once: append every answer to FILE as hex, each after a # line saying "
                  "when, port, address and baud rate (answers refused, e.g. for a bad "
                  "checksum, as # lines with why); --decode FILE reads it back."),
)  # fmt: skip
@click.option(
    "--config",
    default=None,
    metavar="FILE",
    help=f"The settings file, read before the environment and the command line ('' for "
    f"none).  [default: ${CONFIG_VARIABLE}, else {SETTINGS_FILE}]",
)
@click.option("--once", is_flag=True, help="Read every meter once, write the file, exit.")
@click.option(
    "--decode",
    "decode_file",
    type=click.File("rb"),
    default=None,
    help="Decode hex frames from FILE (- for stdin) instead of reading the bus.",
)
@click.option(
    "--scan",
    is_flag=True,
    help="Probe primary addresses 0-250 and list the meters that answer, with the "
    "KAMSTRUP_* lines for /etc/default/kamstrup, on stdout (--address, --output, "
    "--format and --label do not apply).",
)
@click.option(
    "--scan-secondary",
    is_flag=True,
    help="Find every meter by identification number (EN 13757-3 wildcard search): also "
    "meters that share a primary address.",
)
@click.option("-v", "--verbose", is_flag=True, help="Every frame sent and received, on stderr.")
@click.version_option(__version__)
def cli(port, baudrate, addresses, timeout, retries, output, bus, fmt, labels, capture_file,
        config, once, decode_file, scan, scan_secondary, verbose):  # fmt: skip
    """Read Kamstrup MULTICAL heat meters over M-Bus into a node_exporter textfile.

    Give one of --once (read the meters, write the file: what the timer runs),
    --scan or --scan-secondary (find the meters on a bus), or --decode FILE.

    Settings come from /etc/default/kamstrup (the file kamstrup.service reads), then
    the environment, then the command line, each overriding the one before: a hand run
    is the timer's run.  The names in [brackets] are the only ones read.  A run whose
    meters (--port, --address, --bus, --label) are not the configuration's leaves the
    configuration's output alone and writes to stdout, unless --output names another
    file.

    Exit status: 0 all meters read, 1 a meter or the output failed, 2 usage error.
    """
    ctx = click.get_current_context()
    found, in_file, warnings = settings(config, os.environ)
    for text in warnings:  # first: KAMSTRUP_ONCE=1 alone says why it did nothing
        _fail(f"warning: {text}")
    modes = [
        option
        for option, on in (("--once", once), ("--decode", decode_file), ("--scan", scan),
                           ("--scan-secondary", scan_secondary))
        if on
    ]  # fmt: skip
    if len(modes) != 1:
        what = "nothing to do" if not modes else f"{' and '.join(modes)} exclude each other"
        raise click.UsageError(
            f"{what}: give one of --once, --scan, --scan-secondary or --decode FILE"
        )
    given = {"port": port, "baudrate": baudrate, "addresses": addresses, "timeout": timeout,
             "retries": retries, "output": output, "bus": bus, "labels": labels,
             "fmt": fmt, "capture_file": capture_file}  # fmt: skip
    given = {k: v for k, v in given.items() if v not in (None, ())}
    configured = {param: _setting_value(ctx, param, s) for param, s in found.items()}
    if decode_file is not None:
        configured.pop("output", None)  # KAMSTRUP_OUTPUT is the live file's: --output only
    where = {param: s.where for param, s in found.items()}
    value = {**DEFAULTS, **configured, **given}
    # What the timer's run uses: the settings file, and the unit's environment when
    # systemd started us ($INVOCATION_ID); a hand run's KAMSTRUP_ADDRESS=48 is a hand run's.
    service = "INVOCATION_ID" in os.environ
    if not service:
        configured_file = {p: _setting_value(ctx, p, s) for p, s in in_file.items()}
    conf = {**DEFAULTS, **(configured if service else configured_file)}
    for param in ("port", "output", "capture_file", "bus"):
        if param in given:
            value[param] = given[param].strip() if param == "bus" else given[param]
    if value["output"] is None:  # a decoded capture never replaces the live file unless asked
        value["output"] = "-" if decode_file is not None else DEFAULT_OUTPUT
    if conf["output"] is None:
        conf["output"] = DEFAULT_OUTPUT
    for values in (value, conf):
        if values["bus"] is None:
            values["bus"] = _default_bus(values["output"] if values["output"] != "-"
                                         else conf["output"])  # fmt: skip
    port, baudrate, timeout, retries, output, bus, fmt, labels, capture_file = (
        value[k] for k in ("port", "baudrate", "timeout", "retries", "output", "bus", "fmt",
                           "labels", "capture_file")
    )  # fmt: skip
    addresses = list(dict.fromkeys(value["addresses"])) or [ADDRESS_ANY]
    names = [name for name, _ in labels]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        hint = where.get("labels", "--label") if "labels" not in given else "--label"
        raise click.BadParameter(f"label {twice[0]!r} is given twice", param_hint=hint)
    if not output:
        raise click.BadParameter("an empty file name (- is stdout)", param_hint="--output")
    if not _utf8(bus) or _has_surrogates(_utf8(bus)):
        raise click.BadParameter(f"{bus!r}: a bus needs a name in UTF-8", param_hint="--bus")
    if fmt == "json" and output != "-" and output.endswith(".prom"):
        said = where["fmt"] if "fmt" in where and "fmt" not in given else "--format json"
        raise click.UsageError(
            f"{said} would write JSON into {_utf8(output)}, which node_exporter would reject "
            "(a scrape error for every textfile): use --output - or a file not ending in .prom"
        )
    if once and output != "-" and same_file(output, conf["output"]):
        conf_where = where if service else {p: s.where for p, s in in_file.items()}
        output = _live_file_guard(value, conf, given, where, conf_where)
    log = _say if verbose else None
    if once and output != "-":
        try:  # before the meters pay for a read
            check_output(output)
        except OutputError as exc:
            _fail(str(exc))
            sys.exit(1)
    if capture_file is not None and not once and "capture_file" not in given:
        capture_file = None  # KAMSTRUP_CAPTURE is the timer's: a scan or a decode has none
    if capture_file is not None:
        _check_capture(capture_file, once, output)
    capture = None

    if decode_file is not None:
        try:
            data = decode_file.read(DECODE_LIMIT + 1)
            if len(data) > DECODE_LIMIT:
                raise FrameError(
                    f"more than {DECODE_LIMIT >> 20} MiB: not a capture of M-Bus answers"
                )
            readings = readings_from_frames(split_frames(parse_hex(_capture_text(data))))
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
    elif scan or scan_secondary:
        sys.exit(_scan(port, baudrate, timeout or 0.0, retries, log, secondary=scan_secondary))
    else:
        _STOPPING.update(signum=None, raise_=True)
        capture = _Capture(capture_file, port) if capture_file else None
        try:
            readings = read_meters(port, addresses, baudrate=baudrate, timeout=timeout or 1.0,
                                   retries=retries, log=log, on_answer=capture,
                                   on_refused=capture and capture.refused)  # fmt: skip
        finally:
            if capture is not None:
                capture.close()
        _report(readings)
    _STOPPING["raise_"] = False  # from here on a signal waits for the output to be written

    clock = None
    if fmt == "json":
        text = render_json(readings)
    else:
        previous = read_previous(output) if output != "-" else None
        clock = checked_clock(readings, previous, live=decode_file is None)
        text = exposition(readings, labels, previous, bus=_utf8(bus), clock=clock)
    try:
        _emit(text, output)
    except OutputError as exc:
        _fail(str(exc))
        sys.exit(1)
    if output != "-" and fmt == "prom":
        for other, what in others_carrying(output, readings, _utf8(bus)):
            _fail(f"warning: {_utf8(other)} carries {what} too (an output renamed, or a second "
                  "configuration with the same meters?): node_exporter keeps one of the two "
                  "series; remove the file that is not written any more")  # fmt: skip
    if _STOPPING["signum"] is not None:  # the file says which meters were not read
        sys.exit(128 + _STOPPING["signum"])
    failed = any(r.error for r in readings) or (capture is not None and capture.failed)
    sys.exit(1 if failed or (clock is not None and clock.reason) else 0)


def _capture_text(data: bytes) -> str:
    """A capture's bytes as text, UTF-8 whatever the locale: a comment may say anything
    (a person's note, a port named /dev/zähler), the frames are hex."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        lines = data.splitlines(keepends=True)
        if all(line.lstrip().startswith(b"#") for line in lines if not line.isascii()):
            return data.decode("utf-8", "replace")
        raise


def _check_capture(path: str, once: bool, output: str) -> None:
    """--capture is for a live read, into a file of its own that node_exporter ignores."""
    if not once:
        raise click.UsageError("--capture records the answers of a live read: use it with --once")
    if path == "-":
        raise click.UsageError("--capture needs a file, not -")
    if path.endswith(".prom"):
        raise click.UsageError(f"--capture {path}: node_exporter would read a .prom file")
    if output != "-" and os.path.realpath(path) == os.path.realpath(output):
        raise click.UsageError(f"--capture {path} is the --output file")


class _Capture:
    """--capture FILE: each answer appended as hex after a comment line.  Writing is
    best effort: the first failure is one line on stderr, the read goes on without it."""

    def __init__(self, path: str, port: str):
        self.path = path
        self.port = port
        self.failed = False
        try:
            # ASCII whatever the port's name (/dev/zähler): a name that is not becomes
            # backslash escapes, never a UnicodeEncodeError in the middle of a read
            self.file = open(path, "a", encoding="ascii", errors="backslashreplace")
        except OSError as exc:
            self.file = None
            self._failure(exc)

    def __call__(self, address, frame: bytes, baudrate: int) -> None:
        if self.file is None:
            return
        self._write(f"{self._header(address, baudrate)}\n{frame.hex(' ').upper()}\n")

    def refused(self, address, data: bytes, baudrate: int, why: str) -> None:
        """An answer the bus refused (bad checksum, cut off, another address): kept for
        whoever reads the file, as comment lines that --decode skips."""
        if self.file is None:
            return
        header = self._header(address, baudrate, f" rejected: {why}")
        self._write(f"{header}\n# {data.hex(' ').upper()}\n")

    def _header(self, address, baudrate: int, tail: str = "") -> str:
        """The comment line, one line whatever the port's name or the reason hold (--decode
        splits lines as str.splitlines does: CR, FF, VT, FS, GS, RS too)."""
        text = f"{self._now()} port {self.port} address {address} baudrate {baudrate}{tail}"
        return "# " + " ".join(text.splitlines())

    @staticmethod
    def _now() -> str:
        import datetime as dt

        return dt.datetime.now().astimezone().isoformat(timespec="seconds")

    def _write(self, text: str) -> None:
        try:
            self.file.write(text)
            self.file.flush()  # each answer on disk as it comes: a killed run keeps them
        except OSError as exc:
            self._failure(exc)

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError as exc:
                self._failure(exc)

    def _failure(self, exc: OSError) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass  # the same failure again: reported once below
            self.file = None
        if not self.failed:
            self.failed = True
            _fail(f"capture {self.path}: {exc.strerror or exc}; the read goes on without it")


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


def _scan(url, baudrate, timeout, retries, log, secondary=False) -> int:
    """--scan and --scan-secondary: one line per meter on stdout, then the settings for
    /etc/default/kamstrup; collisions, late answers and progress on stderr.  Stopped by
    a signal or a failing port, it still lists the meters found so far."""
    rates = list(AUTO_RATES) if baudrate == "auto" else [baudrate]
    notes: list = []
    gateway = url.startswith("socket://")
    if len(rates) > 1 and gateway:
        rates = rates[:1]
        notes.append("a network gateway (socket://) talks to the meters at its own rate: "
                     "scanned once")  # fmt: skip
    try:
        port = open_port(url, rates[0])
    except BusError as exc:
        _fail(str(exc))
        return 1
    found: list = []  # Found, in the order found
    failure = None  # (message, exit status) that ended the scan early
    try:
        bus = Bus(port, baudrate=rates[0], timeout=timeout, retries=retries, log=log)
        if len(rates) > 1:
            rates = rates_in_use(bus, rates)
            if not rates:
                _fail(f"nothing answered at {', '.join(map(str, AUTO_RATES))} baud")
                return 1
        for rate in rates:  # each one in full: a meter may be at that rate only
            bus.set_baudrate(rate)
            what = f"{rate} baud" if baudrate == "auto" and not gateway else ""
            if secondary:
                with _Progress("selections", None, what) as progress:
                    _, probes = scan_secondary(bus, progress, notes.append, found=found)
                if log:
                    log(f"secondary search at {rate} baud: {probes} selections")
            else:
                by_address: dict = {}
                try:
                    with _Progress("addresses", len(PRIMARY_ADDRESSES), what) as progress:
                        scan_primary(bus, progress=progress, note=notes.append,
                                     found=by_address)  # fmt: skip
                finally:
                    found += [by_address[a] for a in sorted(by_address)]
    except PortError as exc:
        failure = (str(exc), 1)
    except Stopped as exc:
        failure = (f"stopped by {exc.name}", 128 + exc.signum)
    finally:
        _close(port)
    found = _one_each(found, notes)
    for text in notes:
        _fail(text)
    lines = [
        f"address {t.address}  id {t.id or '-'}  manufacturer {t.manufacturer or '-'}  "
        f"version {'-' if t.version is None else t.version}  medium {t.medium_name}  "
        f"baudrate {f.baudrate}\n"
        for f in found
        for t in (f.telegram,)
    ]
    if found and failure is None:  # an unfinished scan's settings would look final
        ids = [f.telegram.id for f in found]
        if secondary and None not in ids and len(set(ids)) == len(ids):
            addresses = " ".join(ids)
        else:
            addresses = " ".join(dict.fromkeys(str(f.telegram.address) for f in found))
        used = sorted({f.baudrate for f in found})
        lines.append(f'KAMSTRUP_ADDRESS="{addresses}"\n')
        lines.append(f"KAMSTRUP_BAUDRATE={used[0] if len(used) == 1 else 'auto'}\n")
    try:
        _stdout("".join(lines))
    except OutputError as exc:
        _fail(str(exc))
        return 1
    if failure is not None:
        _fail(f"{failure[0]}; {UNFINISHED}")
        return failure[1]
    failing = any(f in text for text in notes for f in FAILING)
    if not found:
        where = "by secondary address" if secondary else "on addresses 0-250"
        _fail(f"no meter {'could be read' if failing else 'answered'} {where}")
        return 1
    return 1 if failing else 0


def _one_each(found: list, notes: list) -> list:
    """One Found per meter, at the first rate it answered at (a meter that detects the
    rate answers at each, and is said so); an address that different meters use at
    different rates is said so too (--once reads one rate per address)."""
    rates: dict = {}  # meter -> where it was found, at each rate
    for f in found:
        key = (identity(f.telegram, f.telegram.address), f.telegram.address)
        rates.setdefault(key, []).append(f)
    out = [fs[0] for fs in rates.values()]
    for (_, address), fs in rates.items():
        if len(fs) > 1:
            said = [str(f.baudrate) for f in fs]
            said = ", ".join(said[:-1]) + " and " + said[-1]
            notes.append(f"address {address} answered at {said} baud (it detects the "
                         f"rate): listed at {fs[0].baudrate}")  # fmt: skip
    at: dict = {}  # address -> the rates of the meters listed there
    for f in out:
        at.setdefault(f.telegram.address, set()).add(f.baudrate)
    for address, used in at.items():
        if len(used) > 1:
            said = " and ".join(map(str, sorted(used)))
            notes.append(f"address {address} is used at {said} baud by different meters: "
                         f"{MIXED_RATES}")  # fmt: skip
    return out


class _Progress:
    """click's progress bar on a terminal (a count kept on one line where the total is
    not known: the secondary search); elsewhere (a journal, a pipe) a line every 10 s,
    e.g. "scanned 120 of 251 addresses, 1 meter found"."""

    EVERY = 10.0

    def __init__(self, unit: str, total, what: str):
        self.unit, self.total, self.what = unit, total, what
        self.bar = None
        self.counting = False  # the count on one line of a terminal
        self.done = 0
        self.next_line = time.monotonic() + self.EVERY

    def __enter__(self):
        if sys.stderr is not None and sys.stderr.isatty():
            label = f"Scanning {self.what}".strip()
            if self.total:
                self.bar = click.progressbar(length=self.total, label=label, file=sys.stderr)
                self.bar.__enter__()
            else:
                self.counting = True
        return self

    def __call__(self, done: int, found: int) -> None:
        meters = "meter" if found == 1 else "meters"
        if self.bar is not None:
            self.bar.update(done - self.done)
        elif self.counting:
            at = f" at {self.what}" if self.what else ""
            _say(f"\rSearching{at}: {done} {self.unit}, {found} {meters} found", nl=False)
        elif sys.stderr is not None and time.monotonic() >= self.next_line:
            self.next_line = time.monotonic() + self.EVERY
            at = f" at {self.what}" if self.what else ""
            if self.total:
                _say(f"scanned {done} of {self.total} {self.unit}{at}, {found} {meters} found")
            else:
                _say(f"{done} {self.unit}{at} so far, {found} {meters} found")
        self.done = done

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        elif self.counting and self.done:
            _say("")  # end the count's line
        return False


def main() -> None:
    import signal

    # SIGHUP too: a closed SSH session (or terminal) ends a hand run as systemd's stop does
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _stop)
    cli()  # named as invoked


if __name__ == "__main__":
    main()
