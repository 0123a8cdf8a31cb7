#!/usr/bin/env python3
"""Read Kamstrup MULTICAL heat meters into a node_exporter textfile: the collector.

``kamstrup_textfile.py --once`` opens the serial port (pyserial), reads every
configured meter once with the protocol its port speaks (M-Bus on the wired port:
kamstrup_mbus.py; KMP on the optical eye: kamstrup_kmp.py), writes one ``.prom``
file atomically into node_exporter's textfile directory and exits.  A systemd timer
runs it.

Needs Python 3.9+, pyserial and click, nothing else; the modules can be copied to
/usr/local/bin (or beside each other anywhere) and run with Debian's python3-serial
and python3-click.

This module knows a protocol only as "read this meter: a telegram of records in SI
units, or why not", and reads top to bottom in the order the data flows:
1. metrics (a meter's records -> Prometheus samples, the exposition text, JSON),
2. output (the atomic write), 3. the click command line (settings, reads, reports).
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from typing import Sequence

import kamstrup_kmp as kmp
from kamstrup_mbus import (
    _DATA_LENGTHS,
    ADDRESS_ANY,
    FAILING,
    MIXED_RATES,
    PRIMARY_ADDRESSES,
    UNFINISHED,
    ApplicationError,
    Bus,
    FrameError,
    MeterError,
    Record,
    Telegram,
    _Plain,
    chain,
    decode_telegram,
    merge_telegrams,
    parse_hex,
    rates_in_use,
    scan_primary,
    scan_secondary,
    split_frames,
)  # fmt: skip
from kamstrup_port import (
    KMP_LINE,
    PORT_ERRORS,
    BusError,
    PortError,
    _one_line,
    _reason,
    open_port,
    port_holders,
)  # fmt: skip

__version__ = "0.2.0"

# ---------------------------------------------------------------------------
# 1. Metrics: telegrams to Prometheus exposition text (and to JSON)
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


KMP_ADDRESS = "kmp"  # the address label of a meter read through its optical eye
HEAT = 0x04  # EN 13757-3's medium code for heat (outlet)


def telegram_from_kmp(reading: kmp.KmpReading) -> Telegram:
    """A KMP reading as the telegram the meter's M-Bus module would send: the same serial
    number (the meter label), the same quantities in the same SI units, the info code
    as Kamstrup's FF 22 register; so the same series through either port.  What KMP
    does not say (the M-Bus version and medium byte) is left out or heat."""
    records = [
        Record(0, 0, 0, "instantaneous", register.quantity, register.unit, register.value)
        for register in reading.registers.values()
        if register.quantity not in (None, "info_code", "serial_number")
    ]
    if reading.info_code is not None:  # 16 flags as the 303 sends them, 32 when set higher
        width = b"\x04" if reading.info_code > 0xFFFF else b"\x02"
        records.append(Record(0, 0, 0, "instantaneous", "manufacturer_specific", "",
                              reading.info_code, dib=width, vib=b"\xff\x22",
                              manufacturer_vife=b"\x22"))  # fmt: skip
    return Telegram(KMP_ADDRESS, None, id=reading.serial, manufacturer="KAM", medium=HEAT,
                    records=records)  # fmt: skip


def readings_from_kmp_frames(frames: Sequence[bytes]) -> list:
    """KMP answers (a --capture of reads through the eye) as readings: a register that
    comes again starts the next read."""
    readings: list = []
    registers: dict = {}
    requests = 0

    def done() -> None:
        try:
            reading = kmp.reading_from(registers, requests)
        except kmp.KmpFrameError as exc:
            readings.append(Reading(KMP_ADDRESS, error=str(exc)))
        else:
            readings.append(Reading(KMP_ADDRESS, telegram_from_kmp(reading)))

    for frame in frames:
        try:
            these = kmp.parse_registers(kmp.parse_frame(frame))
        except kmp.KmpFrameError as exc:
            raise FrameError(f"KMP answer {frame.hex(' ').upper()[:60]}: {exc}") from None
        if registers and set(these) & set(registers):
            done()
            registers, requests = {}, 0
        registers.update(these)
        requests += 1
    if registers:
        done()
    return readings


def split_kmp_frames(data: bytes) -> list:
    """KMP answers one after another: 40 ... 0D (stuffing keeps 0D out of a frame)."""
    frames = []
    pos = 0
    while pos < len(data):
        if data[pos] != kmp.START_ANSWER:
            raise FrameError(f"no KMP answer at byte {pos}: 0x{data[pos]:02X} is not 0x40")
        end = data.find(bytes((kmp.STOP,)), pos)
        if end < 0:
            raise FrameError(f"KMP answer at byte {pos} has no stop byte 0D")
        frames.append(data[pos : end + 1])
        pos = end + 1
    return frames


def readings_from_capture(data: bytes) -> list:
    """A capture's answers, M-Bus (68 ...) or KMP (40 ...), as readings."""
    if data[:1] == bytes((kmp.START_ANSWER,)):
        return readings_from_kmp_frames(split_kmp_frames(data))
    return readings_from_frames(split_frames(data))


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

RELEASED = "2026-12-06"  # debian/changelog's newest entry: a host clock before it is wrong
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
# 2. Output: the atomic write
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
# 3. Command line
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
    "KAMSTRUP_PROTOCOL": "protocol",
}
ACTIONS = {  # names a person may try; actions come from the command line only
    "KAMSTRUP_ONCE": "--once", "KAMSTRUP_SCAN": "--scan",
    "KAMSTRUP_SCAN_SECONDARY": "--scan-secondary", "KAMSTRUP_DECODE": "--decode",
    "KAMSTRUP_VERSION": "--version", "KAMSTRUP_HELP": "--help", "KAMSTRUP_VERBOSE": "-v",
    "KAMSTRUP_SETUP": "--setup", "KAMSTRUP_YES": "--yes",
}  # fmt: skip


class SettingsError(ValueError):
    """A settings file that systemd would refuse whole."""


def read_settings(path: str, warnings: list | None = None) -> dict:
    """NAME -> value of a settings file, as systemd's EnvironmentFile= passes them.

    Its parser, not a shell's: quotes count only where a value starts (after ``=`` or a
    closing quote), a ``# comment`` after a value is part of it, blanks after an
    unquoted value and the CR of a CR LF line go, a backslash-newline continues a line,
    lines starting with # or ; are comments, a key that is not a variable name (``export
    X``) is ignored.  The last of a name wins.  Raises OSError if the file cannot be
    read, and SettingsError where systemd cannot load the file either (the service then
    runs without it): a NUL byte, a name or value that is not UTF-8.  A comment that ends in a
    backslash ends at its line's end, as systemd 257 (Debian 13) reads it; 252 (Debian
    12) read the next line as part of it: its line number goes into ``warnings``."""
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
    line_number, previous = 1, ""
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
        elif state == "comment":  # systemd 257 ends it at the line's end, whatever
            if c in newline:  # comes before (252 joined the next line after a backslash)
                if previous == "\\" and warnings is not None:
                    warnings.append(line_number)
                state = "pre_key"
        if c == "\n":
            line_number += 1
        previous = c
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
    the file alone; [warnings]; {parameter: where an empty NAME= set it back}).

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
            joined: list = []
            sources.append((read_settings(path, joined), f"in {_utf8(path)}"))
            for line in joined:
                warnings.append(f"line {line} of {_utf8(path)} is a comment ending in a "
                                "backslash: systemd 252 (Debian 12) reads the next line as "
                                "part of it, 257 does not; end it without one")  # fmt: skip
        except FileNotFoundError:
            if explicit:
                raise click.UsageError(f"settings file {_utf8(path)} does not exist") from None
        except OSError as exc:
            raise click.UsageError(
                f"cannot read settings file {_utf8(path)}: {exc.strerror or exc}"
            ) from None
        except SettingsError as exc:
            raise click.UsageError(
                f"settings file {_utf8(path)}: {exc}: systemd cannot load it either "
                "(kamstrup.service's EnvironmentFile=- then leaves it out)"
            ) from None
    from_file = sources[0][0] if sources else {}
    sources.append(({k: v for k, v in environ.items() if k.startswith("KAMSTRUP_")},
                    "in the environment"))  # fmt: skip
    in_file: dict = {}
    cleared: dict = {}  # parameter -> where a NAME= (empty) set it back to its default
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
                else:  # NAME= (empty): the default again, said to come from NAME
                    found.pop(SETTINGS[name], None)
                    cleared[SETTINGS[name]] = f"{name}= (empty) {where}"
                continue
            if name == CONFIG_VARIABLE:
                if where != "in the environment":
                    warnings.append(f"{name} {where} has no effect there: it names the file")
                continue
            if not name.upper().startswith("KAMSTRUP_") or name in seen_unknown:
                continue
            seen_unknown.add(name)
            if name in ACTIONS:
                warnings.append(f"{name} {where} is ignored: {ACTIONS[name]} is given on "
                                "the command line only")  # fmt: skip
                continue
            near = difflib.get_close_matches(name.upper(), list(SETTINGS), n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]}?)" if near else ""
            warnings.append(f"{name} {where} is not a setting of {PROG}{hint}: ignored")
    return found, in_file, warnings, cleared


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
    "port": "/dev/ttymeterBus", "baudrate": None, "addresses": (), "timeout": None,
    "retries": 2, "output": None, "bus": None, "labels": (), "fmt": "prom",
    "capture_file": None, "protocol": "mbus",
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
    for param, option in (
        ("port", "--port"),
        ("protocol", "--protocol"),
        ("addresses", "--address"),
        ("bus", "--bus"),
        ("labels", "--label"),
    ):
        mine, theirs = value[param], conf[param]
        if param == "port" and "://" not in mine + theirs and same_file(mine, theirs):
            continue  # /dev/ttyUSB0 for the link /dev/ttymeterBus is the same bus
        if param == "addresses" and value["protocol"] != conf["protocol"]:
            continue  # the eye has no addresses: the protocol is what differs
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
            f"{'are' if ' and ' in differ else 'is'} not the configuration's: it would forget "
            "meters (use another file or -)"
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
# signal.SIGHUP on Linux: a closed SSH session stops a hand run, and the previous file
# stays as it was (no fault of the meters' to write down)
_SIGHUP = 1


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


KMP_RATES = (1200, 2400)  # the eye talks 1200 baud; some meters and heads 2400 ("auto")
IR_HEAD = "the infrared head"


def read_kmp(url: str, *, baudrate, timeout, retries, log, on_answer=None) -> list:
    """The meter on the optical eye, through KMP: one Reading (address "kmp"), at the
    first of the rates it answers at with ``baudrate`` "auto"."""
    rates = list(KMP_RATES) if baudrate == "auto" else [baudrate]
    start = time.monotonic()
    try:
        port = open_port(url, rates[0], line=KMP_LINE, adapter=IR_HEAD)
    except BusError as exc:
        return [Reading(KMP_ADDRESS, error=str(exc), port=True)]
    error = ""
    tried: list = []  # with "auto", what each rate gave, all in the one line
    try:
        for rate in rates:
            try:
                if rate != port.baudrate:
                    port.baudrate = rate
                answer = (
                    None if on_answer is None else (lambda f, r=rate: on_answer(KMP_ADDRESS, f, r))
                )
                reading = kmp.read_meter(port, baudrate=rate, timeout=timeout, retries=retries,
                                         log=log, on_answer=answer)  # fmt: skip
            except kmp.KmpError as exc:
                tried.append(f"{rate} baud: {exc}")
                error = "; ".join(tried) if len(rates) > 1 else str(exc)
                if str(exc).startswith("port failed") or "no answer" not in str(exc):
                    break  # the head is gone, or a meter answered: another rate will not help
                continue
            except PORT_ERRORS as exc:
                error = f"port failed: {_reason(exc)}"
                break
            if log and len(rates) > 1:
                log(f"KMP: answered at {rate} baud")
            telegram = telegram_from_kmp(reading)
            return [Reading(KMP_ADDRESS, telegram, duration=time.monotonic() - start)]
    except Stopped as exc:
        error = f"not read: stopped by {exc.name}"
    finally:
        _close(port)
    return [Reading(KMP_ADDRESS, error=error, duration=time.monotonic() - start)]


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
    "--protocol",
    type=click.Choice(["mbus", "kmp"]),
    default=None,
    help=_setting("KAMSTRUP_PROTOCOL",
                  "mbus: the wired M-Bus port (a USB M-Bus master); kmp: the optical eye "
                  "(an infrared head), Kamstrup's KMP at 1200 baud, one meter.  [default: mbus]"),
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
@click.option(
    "--setup",
    is_flag=True,
    help="The first hour (as root): find the adapter and every meter on it, show their "
    "readings, write the udev rule and the settings file, start the service once.",
)
@click.option("--yes", is_flag=True, help="With --setup: the default answer to every question.")
@click.option("-v", "--verbose", is_flag=True, help="Every frame sent and received, on stderr.")
@click.version_option(__version__)
def cli(port, baudrate, addresses, timeout, retries, output, bus, fmt, labels, capture_file,
        protocol, config, once, decode_file, scan, scan_secondary, setup, yes,
        verbose):  # fmt: skip
    """Read Kamstrup MULTICAL heat meters over M-Bus or their optical eye (KMP) into a
    node_exporter textfile.

    Give one of --once (read the meters, write the file: what the timer runs),
    --scan or --scan-secondary (find the meters on a bus), --setup (from a plugged-in
    adapter to every meter in Prometheus), or --decode FILE.

    Settings come from /etc/default/kamstrup (the file kamstrup.service reads), then
    the environment, then the command line, each overriding the one before: a hand run
    is the timer's run.  The names in [brackets] are the only ones read.  A run whose
    meters (--port, --protocol, --address, --bus, --label) are not the configuration's
    leaves the configuration's output alone and writes to stdout, unless --output names
    another file.

    Exit status: 0 all meters read, 1 a meter or the output failed, 2 usage error.
    """
    ctx = click.get_current_context()
    found, in_file, warnings, cleared = settings(config, os.environ)
    modes = [
        option
        for option, on in (("--once", once), ("--decode", decode_file), ("--scan", scan),
                           ("--scan-secondary", scan_secondary), ("--setup", setup))
        if on
    ]  # fmt: skip
    if len(modes) != 1:
        what = "nothing to do" if not modes else f"{' and '.join(modes)} exclude each other"
        actions = [text for text in warnings if " is given on the command line only" in text]
        why = f" ({'; '.join(actions)})" if actions else ""  # KAMSTRUP_ONCE=1 alone
        raise click.UsageError(
            f"{what}: give one of --once, --scan, --scan-secondary, --setup or --decode FILE{why}"
        )
    if yes and not setup:
        raise click.UsageError("--yes answers --setup's questions: use it with --setup")
    for text in warnings:
        _fail(f"warning: {text}")
    given = {"port": port, "baudrate": baudrate, "addresses": addresses, "timeout": timeout,
             "retries": retries, "output": output, "bus": bus, "labels": labels,
             "fmt": fmt, "capture_file": capture_file, "protocol": protocol}  # fmt: skip
    given = {k: v for k, v in given.items() if v not in (None, ())}
    configured = {param: _setting_value(ctx, param, s) for param, s in found.items()}
    if decode_file is not None:
        configured.pop("output", None)  # KAMSTRUP_OUTPUT is the live file's: --output only
    where = {**cleared, **{param: s.where for param, s in found.items()}}
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
        if values["baudrate"] is None:  # each protocol's own rate
            values["baudrate"] = KMP_RATES[0] if values["protocol"] == "kmp" else 2400
        if values["protocol"] == "kmp":
            values["addresses"] = (KMP_ADDRESS,)  # the one meter the eye is held on
        if values["bus"] is None:
            values["bus"] = _default_bus(values["output"] if values["output"] != "-"
                                         else conf["output"])  # fmt: skip
    port, baudrate, timeout, retries, output, bus, fmt, labels, capture_file, protocol = (
        value[k] for k in ("port", "baudrate", "timeout", "retries", "output", "bus", "fmt",
                           "labels", "capture_file", "protocol")
    )  # fmt: skip
    if protocol == "kmp" and "addresses" in given:
        raise click.UsageError("--address does not apply to --protocol kmp: the optical eye "
                               "reads the one meter it is held on")  # fmt: skip
    if protocol == "kmp" and "addresses" in found:
        _fail(f"warning: {where['addresses']} does not apply to KMP (the optical eye reads "
              "the one meter it is held on): ignored")  # fmt: skip
    if protocol == "kmp" and scan_secondary:
        raise click.UsageError("--scan-secondary is M-Bus's search: use --scan with "
                               "--protocol kmp")  # fmt: skip
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
    if once and fmt == "prom" and output != "-" and not output.endswith(".prom"):
        said = where["output"] if "output" in where and "output" not in given else "--output"
        _fail(f"warning: {said}: {_utf8(output)} does not end in .prom: node_exporter's "
              "textfile collector reads only *.prom files")  # fmt: skip
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
            readings = readings_from_capture(parse_hex(_capture_text(data)))
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
    elif setup:
        import kamstrup_setup

        sys.exit(kamstrup_setup.setup(port=given.get("port"), baudrate=given.get("baudrate"),
                                      protocol=given.get("protocol"), timeout=timeout,
                                      retries=retries, config=config, output=conf["output"],
                                      yes=yes, log=log))  # fmt: skip
    elif scan and protocol == "kmp":
        sys.exit(_scan_kmp(port, baudrate, timeout or kmp.ANSWER_TIMEOUT, retries, log))
    elif scan or scan_secondary:
        sys.exit(_scan(port, baudrate, timeout or 0.0, retries, log, secondary=scan_secondary))
    else:
        _STOPPING.update(signum=None, raise_=True)
        capture = _Capture(capture_file, port) if capture_file else None
        try:
            if protocol == "kmp":
                readings = read_kmp(
                    port,
                    baudrate=baudrate,
                    retries=retries,
                    log=log,
                    timeout=timeout or kmp.ANSWER_TIMEOUT,
                    on_answer=capture,
                )
            else:
                readings = read_meters(
                    port,
                    addresses,
                    baudrate=baudrate,
                    retries=retries,
                    timeout=timeout or 1.0,
                    log=log,
                    on_answer=capture,
                    on_refused=capture and capture.refused,
                )
        finally:
            if capture is not None:
                capture.close()
        if _STOPPING["signum"] != _SIGHUP:
            _report(readings)
    _STOPPING["raise_"] = False  # from here on a signal waits for the output to be written
    if once and _STOPPING["signum"] == _SIGHUP:  # a closed terminal: the meters are fine
        unread = ", ".join(str(r.address) for r in readings if r.error and "stopped by" in r.error)
        where = f"{_utf8(output)} is left as it was"
        if output == "-":
            where = "standard output gets nothing"
        _fail(f"stopped by SIGHUP: {where} (not read: address {unread})")
        sys.exit(128 + _SIGHUP)

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


def _scan_kmp(url, baudrate, timeout, retries, log) -> int:
    """--scan --protocol kmp: whether a meter answers KMP on the eye, its type and serial
    number, at which rate (1200, then 2400 with auto), and the KAMSTRUP_* lines.  Two
    requests at each rate tried: the battery pays for each."""
    rates = list(KMP_RATES) if baudrate == "auto" else [baudrate]
    tried = []
    for rate in rates:
        try:
            port = open_port(url, rate, line=KMP_LINE, adapter=IR_HEAD)
        except BusError as exc:
            _fail(str(exc))
            return 1
        try:
            meter = kmp.KmpMeter(port, baudrate=rate, timeout=timeout, retries=retries, log=log)
            kind, revision = meter.get_type()
            serial = meter.get_serial()
        except kmp.KmpError as exc:
            tried.append(f"{rate} baud: {exc}")
            if "no answer" in str(exc) and not str(exc).startswith("port failed"):
                continue
            break
        except Stopped as exc:
            _fail(f"stopped by {exc.name}; {UNFINISHED}")
            return 128 + exc.signum
        finally:
            _close(port)
        lines = (f"optical eye  serial {serial:08d}  type 0x{kind:04X}  revision "
                 f"{revision or '-'}  baudrate {rate}\n"
                 f"KAMSTRUP_PROTOCOL=kmp\nKAMSTRUP_BAUDRATE={rate}\n")  # fmt: skip
        try:
            _stdout(lines)
        except OutputError as exc:
            _fail(str(exc))
            return 1
        return 0
    _fail(f"no KMP meter answered on {url}: {'; '.join(tried)} (is the head on the eye, "
          "its magnet holding, the meter's display awake?)")  # fmt: skip
    return 1


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
    # click 7 (Debian 11) refuses to run where Python's encoding is ASCII (LC_ALL=C with
    # PYTHONUTF8=0) with a traceback; every byte we read and write is UTF-8 whatever
    # the locale, so its check has nothing to protect here (click 8 dropped it)
    if hasattr(click.core, "_verify_python3_env"):
        click.core._verify_python3_env = lambda: None
    cli()  # named as invoked


if __name__ == "__main__":
    main()
