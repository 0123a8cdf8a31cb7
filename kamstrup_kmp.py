"""The Kamstrup Meter Protocol (KMP): read a MULTICAL through its optical eye.

Every MULTICAL 30x/40x/60x has an optical eye above its display; an infrared head on a
USB serial adapter talks KMP with it at 1200 baud, 8 data bits, no parity, 2 stop bits.
This module asks the meter for the registers the collector needs, in at most two
requests (each one wakes the meter and costs its battery), and gives their values in SI
base units under the same quantity names as the M-Bus decoder, so that one meter writes
the same metrics through either port.  It stands on its own (pyserial-like port in,
values out) and imports nothing of the M-Bus code.

Public sources (facts only; no code taken): gertvdijk/PyKMP (Apache-2.0) and the
Kamstrup document's examples in its tests; Poul-Henning Kamp's kamstrup.py; ESPHome's
kamstrup_kmp component; golles/ha-kamstrup_403 (Home Assistant).

The module reads top to bottom in the order the data flows:
1. frames (bytes <-> physical and data link layer), 2. application (commands, registers,
values in SI units), 3. port (the only code that touches a port: deadlines, retries, echo
and noise), 4. a simulated MULTICAL 303 for the tests and the simulator.
"""

from __future__ import annotations

import math
import time
from decimal import Decimal
from fractions import Fraction
from typing import Sequence

from kamstrup_port import _reason  # what the system said, on one line (termios.error too)

# ---------------------------------------------------------------------------
# 1. Frames (physical and data link layer)
# ---------------------------------------------------------------------------

START_REQUEST = 0x80  # master -> meter
START_ANSWER = 0x40  # meter -> master
STOP = 0x0D
ACK = 0x06  # alone, without start, CRC or stop: KMP's acknowledgement
ESCAPE = 0x1B
STUFFED = frozenset((ACK, STOP, ESCAPE, START_ANSWER, START_REQUEST))  # sent as 1B, b^FF

HEAT_METER = 0x3F  # destination address of the meter itself


class KmpFrameError(ValueError):
    """Bytes that are not a good KMP frame or answer: the message names the fault."""


def _crc_table() -> tuple:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """CRC-16 CCITT (polynomial 0x1021), initial value 0, MSB first, no final xor.

    Over a frame's body with its two CRC bytes appended the result is 0."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC_TABLE[(crc >> 8) ^ byte]
    return crc


def stuff(body: bytes) -> bytes:
    """Each of 06 0D 1B 40 80 as 1B followed by the byte xor FF."""
    out = bytearray()
    for byte in body:
        if byte in STUFFED:
            out += bytes((ESCAPE, byte ^ 0xFF))
        else:
            out.append(byte)
    return bytes(out)


def unstuff(data: bytes) -> bytes:
    """Undo ``stuff`` in one pass, left to right.

    One pass is the point: undoing it with a replace() per stuffed byte (PyKMP 0.0.2)
    turns a data ``1B F2`` (sent ``1B E4 F2``) into ``1B`` and then ``0D``."""
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        byte = data[i]
        if byte == ESCAPE:
            if i + 1 == n:
                raise KmpFrameError("a stuffing byte 1B at the end")
            value = data[i + 1] ^ 0xFF
            if value not in STUFFED:
                raise KmpFrameError(
                    f"stuffing 1B {data[i + 1]:02X} stands for {value:02X}, which is never stuffed"
                )
            out.append(value)
            i += 2
            continue
        if byte in STUFFED:
            raise KmpFrameError(f"an unstuffed {byte:02X} inside the frame")
        out.append(byte)
        i += 1
    return bytes(out)


def _frame(start: int, cid: int, data: bytes, destination: int) -> bytes:
    body = bytes((destination, cid)) + bytes(data)
    return bytes((start,)) + stuff(body + crc16(body).to_bytes(2, "big")) + bytes((STOP,))


def request_frame(cid: int, data: bytes = b"", destination: int = HEAT_METER) -> bytes:
    """80, destination, CID, data, CRC, 0D: stuffed between start and stop."""
    return _frame(START_REQUEST, cid, data, destination)


def answer_frame(cid: int, data: bytes = b"", destination: int = HEAT_METER) -> bytes:
    """What a meter sends: as a request, with the start byte 40."""
    return _frame(START_ANSWER, cid, data, destination)


class KmpFrame:
    """A checked frame: the destination address, the command id and its data."""

    __slots__ = ("destination", "cid", "data")

    def __init__(self, destination: int, cid: int, data: bytes):
        self.destination = destination
        self.cid = cid
        self.data = bytes(data)

    def __eq__(self, other):
        if not isinstance(other, KmpFrame):
            return NotImplemented
        return (self.destination, self.cid, self.data) == (other.destination, other.cid, other.data)

    def __repr__(self) -> str:
        return f"KmpFrame(0x{self.destination:02X}, 0x{self.cid:02X}, {self.data.hex(' ')!r})"


def parse_frame(frame: bytes, start: int = START_ANSWER) -> KmpFrame:
    """One whole frame, from its start byte to its stop byte, checked.

    A lone 06 is no frame (the caller tells an ACK apart with ``is_ack``)."""
    if not frame:
        raise KmpFrameError("no bytes")
    if frame[0] != start:
        raise KmpFrameError(f"start byte {frame[0]:02X}, expected {start:02X}")
    if frame[-1] != STOP or len(frame) < 2:
        raise KmpFrameError("no stop byte")
    body = unstuff(frame[1:-1])
    if len(body) < 4:
        raise KmpFrameError(f"{len(body)} bytes between start and stop, at least 4 expected")
    sent = int.from_bytes(body[-2:], "big")
    expected = crc16(body[:-2])
    if sent != expected:
        raise KmpFrameError(f"CRC 0x{sent:04X}, expected 0x{expected:04X}")
    return KmpFrame(body[0], body[1], body[2:-2])


def is_ack(data: bytes) -> bool:
    return data == bytes((ACK,))


def find_answer(buf: bytes) -> tuple:
    """The first answer frame in ``buf`` (an echo of the request and noise before it are
    skipped): (frame bytes, end) with ``end`` the index after its stop byte, or
    (None, 0) while no whole frame is there.  A stuffed frame holds no raw 40, so the
    frame starts at the last 40 before its stop byte.  The frame is not checked: pass it
    to ``parse_frame``."""
    start = buf.find(bytes((START_ANSWER,)))
    while start >= 0:
        stop = buf.find(bytes((STOP,)), start + 1)
        later = buf.find(bytes((START_ANSWER,)), start + 1)
        if stop < 0:
            return None, 0
        if 0 <= later < stop:  # a new start before the stop: what came before was noise
            start = later
            continue
        return bytes(buf[start : stop + 1]), stop + 1
    return None, 0


# ---------------------------------------------------------------------------
# 2. Application: commands, registers, values in SI units
# ---------------------------------------------------------------------------

CID_GET_TYPE = 0x01
CID_GET_SERIAL = 0x02
CID_GET_REGISTER = 0x10
MAX_REGISTERS = 8  # GetRegister asks for at most 8 registers at once

# Registers of MULTICAL 30x/40x/60x -> (quantity, SI unit).  Quantity names and unit
# strings are the M-Bus decoder's (kamstrup_textfile.py's VIF tables), so that both
# ports give the same metrics.  Ids agree in PyKMP's constants.REGISTERS, PHK's
# kamstrup.py (kamstrup_603_var: 60, 68, 74, 80, 86, 87, 89, 99 "Info codes", 1001
# "Serial number", 1004 "Operating hour counter"), ESPHome's kamstrup_kmp.h (CMD_*:
# 0x3C, 0x50, 0x56, 0x57, 0x59, 0x4A, 0x44) and ha-kamstrup_403's sensor.py.
# 113 (0x71) is NOT the info code: it is the info *event counter* ("Infoevent" in
# PyKMP and ha-kamstrup_403, which show it as if it were the code).  The info code,
# the bit field of kamstrup_textfile's INFO_FLAGS, is register 99 (0x63).
ENERGY_E1 = 60  # 0x003C
VOLUME_V1 = 68  # 0x0044
VOLUME_FLOW = 74  # 0x004A
POWER = 80  # 0x0050
T1 = 86  # 0x0056
T2 = 87  # 0x0057
T1_T2 = 89  # 0x0059
INFO_CODE = 99  # 0x0063
INFO_EVENT_COUNTER = 113  # 0x0071: how many info events, not which; not read
SERIAL_NUMBER = 1001  # 0x03E9
HOUR_COUNTER = 1004  # 0x03EC

REGISTERS = {
    ENERGY_E1: ("energy", "J"),
    VOLUME_V1: ("volume", "m3"),
    HOUR_COUNTER: ("on_time", "s"),
    T1: ("flow_temperature", "degC"),
    T2: ("return_temperature", "degC"),
    T1_T2: ("temperature_difference", "K"),
    POWER: ("power", "W"),
    VOLUME_FLOW: ("volume_flow", "m3/s"),
    INFO_CODE: ("info_code", ""),
    SERIAL_NUMBER: ("serial_number", ""),
}
READ_REGISTERS = tuple(REGISTERS)  # what one read asks for: 10 registers, 2 requests

# KMP unit code -> (the meter's unit, SI unit, num, den): SI value = value * num / den.
# The codes agree in PyKMP's constants.UNITS_NAMES, PHK's kamstrup.py ("Units, provided
# by Erik Jensen"), ESPHome's kamstrup_kmp.h UNITS[] and ha-kamstrup_403's const.py.
# Power: all four list 0x15 (21) and 0x16 (22) as kW, 0x17 (23) MW, 0x18 (24) GW; the
# Kamstrup document's GetRegister example sends unit 0x16.  Codes left out (calories,
# var, "m3 x 10", dates, ...) are not converted: such a register is left out of a read.
_WH = 3600
UNITS = {
    0x00: ("", "", 1, 1),  # a number (the info code, the serial number)
    0x01: ("Wh", "J", _WH, 1),
    0x02: ("kWh", "J", _WH * 10**3, 1),
    0x03: ("MWh", "J", _WH * 10**6, 1),
    0x04: ("GWh", "J", _WH * 10**9, 1),
    0x05: ("J", "J", 1, 1),
    0x06: ("kJ", "J", 10**3, 1),
    0x07: ("MJ", "J", 10**6, 1),
    0x08: ("GJ", "J", 10**9, 1),
    0x15: ("kW", "W", 10**3, 1),
    0x16: ("kW", "W", 10**3, 1),
    0x17: ("MW", "W", 10**6, 1),
    0x18: ("GW", "W", 10**9, 1),
    0x25: ("°C", "degC", 1, 1),
    0x26: ("K", "K", 1, 1),
    0x27: ("l", "m3", 1, 10**3),
    0x28: ("m³", "m3", 1, 1),
    0x29: ("l/h", "m3/s", 1, 3600 * 10**3),
    0x2A: ("m³/h", "m3/s", 1, 3600),
    0x2E: ("h", "s", 3600, 1),
    0x33: ("", "", 1, 1),  # "no unit (number)" too
    0x3A: ("min", "s", 60, 1),
    0x3B: ("bits", "", 1, 1),  # "Bitfield"
    0x3C: ("s", "s", 1, 1),
    0x3E: ("d", "s", 86400, 1),
}


def get_type_request() -> bytes:
    return request_frame(CID_GET_TYPE)


def get_serial_request() -> bytes:
    return request_frame(CID_GET_SERIAL)


def get_register_request(ids: Sequence[int]) -> bytes:
    """GetRegister: N (1..8), then N register ids of 2 bytes, big-endian."""
    if not 1 <= len(ids) <= MAX_REGISTERS:
        raise ValueError(f"GetRegister takes 1 to {MAX_REGISTERS} registers, not {len(ids)}")
    data = bytes((len(ids),)) + b"".join(int(i).to_bytes(2, "big") for i in ids)
    return request_frame(CID_GET_REGISTER, data)


def read_plan(ids: Sequence[int] = READ_REGISTERS) -> list:
    """The registers in as few GetRegister requests as they fit: 10 -> [8, 2]."""
    ids = list(dict.fromkeys(ids))
    return [ids[i : i + MAX_REGISTERS] for i in range(0, len(ids), MAX_REGISTERS)]


def _expect(frame: KmpFrame, cid: int) -> bytes:
    if frame.cid != cid:
        raise KmpFrameError(f"answer to command 0x{frame.cid:02X}, expected 0x{cid:02X}")
    return frame.data


def parse_type(frame: KmpFrame) -> tuple:
    """GetType's answer: (meter type, software revision such as 'F1', or None)."""
    data = _expect(frame, CID_GET_TYPE)
    if len(data) != 4:
        raise KmpFrameError(f"GetType answer of {len(data)} bytes, expected 4")
    letter, number = data[2], data[3]
    revision = f"{chr(ord('A') + letter - 1)}{number}" if 1 <= letter <= 26 else None
    return int.from_bytes(data[:2], "big"), revision


def parse_serial(frame: KmpFrame) -> int:
    """GetSerialNo's answer: 4 bytes, big-endian."""
    data = _expect(frame, CID_GET_SERIAL)
    if len(data) != 4:
        raise KmpFrameError(f"GetSerialNo answer of {len(data)} bytes, expected 4")
    return int.from_bytes(data, "big")


def decode_number(sigexp: int, mantissa: bytes) -> Decimal:
    """±mantissa × 10^(±exponent), exact: bit 7 the mantissa's sign, bit 6 the
    exponent's, bits 0-5 the exponent."""
    exponent = sigexp & 0x3F
    if sigexp & 0x40:
        exponent = -exponent
    value = int.from_bytes(mantissa, "big")
    return Decimal((1 if sigexp & 0x80 else 0, tuple(int(d) for d in str(value)), exponent))


def encode_number(value, length: int = 4) -> tuple:
    """(sigexp, mantissa bytes) for ``value`` (a Decimal, an int or a decimal string)."""
    sign, digits, exponent = Decimal(value).as_tuple()
    if not isinstance(exponent, int) or abs(exponent) > 0x3F:
        raise ValueError(f"{value} has no KMP number form")
    mantissa = int("".join(map(str, digits)) or "0")
    sigexp = (0x80 if sign else 0) | (0x40 if exponent < 0 else 0) | abs(exponent)
    return sigexp, mantissa.to_bytes(length, "big")


class Register:
    """One register of a GetRegister answer; ``exact`` is the meter's number, unscaled."""

    __slots__ = ("id", "unit_code", "exact")

    def __init__(self, id: int, unit_code: int, exact: Decimal):
        self.id = id
        self.unit_code = unit_code
        self.exact = exact

    def __eq__(self, other):
        if not isinstance(other, Register):
            return NotImplemented
        return (self.id, self.unit_code, self.exact) == (other.id, other.unit_code, other.exact)

    def __repr__(self) -> str:
        return f"Register({self.id}, 0x{self.unit_code:02X}, {self.exact!r})"

    @property
    def quantity(self) -> str | None:
        known = REGISTERS.get(self.id)
        return known[0] if known else None

    @property
    def unit(self) -> str | None:
        """The SI unit of the value, as the M-Bus decoder writes it; None: unknown unit."""
        unit = UNITS.get(self.unit_code)
        return unit[1] if unit else None

    @property
    def si(self) -> Fraction | None:
        """The value in SI units, exact; None for a unit code without a conversion."""
        unit = UNITS.get(self.unit_code)
        if unit is None:
            return None
        return Fraction(self.exact) * unit[2] / unit[3]

    @property
    def value(self) -> float | None:
        """The float nearest the exact SI value: one correctly rounded int/int division
        at the end, as the M-Bus decoder's ``_scale`` does (so that 1128 l/h is the same
        float through either port)."""
        unit = UNITS.get(self.unit_code)
        if unit is None:
            return None
        numerator, denominator = self.exact.as_integer_ratio()
        return (numerator * unit[2]) / (denominator * unit[3])


def parse_registers(frame: KmpFrame, asked: Sequence[int] | None = None) -> dict:
    """GetRegister's answer: id -> Register, for each register the meter knows (it
    leaves out those it does not); a register not asked for is a fault."""
    data = _expect(frame, CID_GET_REGISTER)
    out = {}
    pos = 0
    while pos < len(data):
        if len(data) - pos < 5:
            raise KmpFrameError(f"register cut off: {len(data) - pos} bytes left")
        rid = int.from_bytes(data[pos : pos + 2], "big")
        unit, length, sigexp = data[pos + 2], data[pos + 3], data[pos + 4]
        end = pos + 5 + length
        if end > len(data):
            raise KmpFrameError(f"register {rid} cut off: {length} bytes of value announced")
        if asked is not None and rid not in asked:
            raise KmpFrameError(f"register {rid} sent, not asked for")
        if rid in out:
            raise KmpFrameError(f"register {rid} sent twice")
        out[rid] = Register(rid, unit, decode_number(sigexp, data[pos + 5 : end]))
        pos = end
    return out


def register_data(registers: Sequence[Register], length: int = 4) -> bytes:
    """The data of a GetRegister answer (the simulated meter's side of parse_registers)."""
    out = bytearray()
    for reg in registers:
        sigexp, mantissa = encode_number(reg.exact, length)
        out += reg.id.to_bytes(2, "big") + bytes((reg.unit_code, len(mantissa), sigexp))
        out += mantissa
    return bytes(out)


class KmpReading:
    """What one read of a meter gives: its serial number and its values in SI units.

    ``serial`` is written with 8 digits, as the M-Bus module sends the same number
    (its identification number), so that the meter label stays the same."""

    __slots__ = ("serial", "registers", "info_code", "left_out", "requests")

    def __init__(self, serial: str, registers: dict, left_out: dict, requests: int):
        self.serial = serial
        self.registers = registers  # id -> Register, the ones with a value
        info = registers.get(INFO_CODE)
        self.info_code = int(info.exact) if info is not None else None
        self.left_out = left_out  # id -> why (a unit with no conversion)
        self.requests = requests

    @property
    def values(self) -> dict:
        """quantity -> float in SI units (the info code and serial number are not here)."""
        return {
            r.quantity: r.value
            for r in self.registers.values()
            if r.quantity not in (None, "info_code", "serial_number")
        }

    def to_json(self) -> dict:
        return {
            "serial": self.serial,
            "info_code": self.info_code,
            "registers": [
                {
                    "id": r.id,
                    "quantity": r.quantity,
                    "unit": r.unit,
                    "value": r.value,
                    "exact": str(r.exact),
                    "unit_code": r.unit_code,
                }
                for r in self.registers.values()
            ],  # fmt: skip
            "left_out": {str(k): v for k, v in self.left_out.items()},
            "requests": self.requests,
        }


def reading_from(registers: dict, requests: int, serial: int | None = None) -> KmpReading:
    """Registers -> a reading: units checked against each quantity, the serial number
    taken from register 1001 (or from GetSerialNo's ``serial``)."""
    kept, left_out = {}, {}
    for rid, reg in registers.items():
        known = REGISTERS.get(rid)
        if known is None:
            continue
        quantity, si_unit = known
        if quantity in ("info_code", "serial_number"):
            if reg.exact != reg.exact.to_integral_value() or reg.exact < 0:
                left_out[rid] = f"{quantity} {reg.exact} is no whole number"
                continue
        elif reg.unit != si_unit:
            code = UNITS.get(reg.unit_code, (f"unit 0x{reg.unit_code:02X}",))[0]
            left_out[rid] = f"{quantity} in {code or 'no unit'}: not in {si_unit}"
            continue
        kept[rid] = reg
    number = kept.pop(SERIAL_NUMBER, None)
    if number is not None:
        serial = int(number.exact)
    if serial is None:
        raise KmpFrameError("no serial number (register 1001)")
    return KmpReading(f"{serial:08d}", kept, left_out, requests)


# ---------------------------------------------------------------------------
# 3. Port: the only code that touches a port
# ---------------------------------------------------------------------------

# pyserial open parameters for the eye (the caller opens the port): 8N2.  A receiver
# needs only one stop bit, so heads that send one are reported to work too.
BAUDRATE = 1200
BYTESIZE = 8
PARITY = "N"
STOPBITS = 2
SERIAL_SETTINGS = {"baudrate": BAUDRATE, "bytesize": BYTESIZE, "parity": PARITY,
                   "stopbits": STOPBITS}  # fmt: skip
BYTE_BITS = 11  # 8N2: start, 8 data, 2 stop

ANSWER_TIMEOUT = 1.0  # seconds a meter may stay silent after a request (PyKMP waits 2 s)
STALL = 0.2  # seconds an answer that has begun may pause between two bytes
LONGEST_ANSWER = 600  # bytes: 8 registers of up to 8-byte values, all stuffed, and more
READ_SLICE = 0.05


class KmpError(Exception):
    """A meter could not be read through the eye; the message is one line that says why."""


def wire_seconds(nbytes: int, baudrate: int = BAUDRATE) -> float:
    return nbytes * BYTE_BITS / baudrate


class KmpMeter:
    """A KMP master on a pyserial-like port (anything with ``read(n)`` and ``write(b)``).

    The meter may stay silent ``timeout`` seconds from the end of a request (its answer
    delay); once its answer has begun (the byte 40), each byte may follow the last
    within STALL.  Noise and the request's own echo (many IR heads reflect it) before
    the 40 are skipped: a stuffed request holds no 40.  A retry comes on a quiet line.
    However the line babbles, one exchange ends after LONGEST_ANSWER bytes beyond the
    request's echo, and by a time limit."""

    def __init__(self, port, *, baudrate=BAUDRATE, timeout=ANSWER_TIMEOUT, retries=2,
                 pause=0.1, log=None, clock=None, on_answer=None):  # fmt: skip
        if not (math.isfinite(timeout) and math.isfinite(pause)):
            raise ValueError(f"timeout {timeout!r} and pause {pause!r} must be numbers")
        self.port = port
        self.baudrate = baudrate
        self.timeout = timeout
        self.retries = retries
        self.pause = pause
        self.log = log
        self.clock = clock or time.monotonic
        self.requests = 0  # requests sent: each one costs the meter's battery
        self.on_answer = on_answer  # called with each good answer's bytes (a capture)

    # -- raw I/O ---------------------------------------------------------

    def _io(self, doing: str, call, *args):
        try:
            return call(*args)
        except Exception as exc:  # the port is foreign code: whatever it raises, one line
            raise KmpError(f"port failed while {doing}: {_reason(exc)}") from None

    def _trace(self, what: str, data) -> None:
        if self.log:
            self.log(f"{what} {bytes(data).hex(' ').upper()}")

    def _read(self) -> bytes:
        """What has come, or waits one port timeout for a byte."""
        waiting = getattr(self.port, "in_waiting", 0) or 0
        if isinstance(waiting, int) and waiting > 0:
            return self._io("reading", self.port.read, waiting)
        return self._io("reading", self.port.read, 1)

    def _send(self, frame: bytes) -> float:
        reset = getattr(self.port, "reset_input_buffer", None)
        if reset is not None:  # a late answer to an earlier request must not pass for this
            self._io("discarding old input", reset)
        self._trace(">", frame)
        written = self.clock()
        self._io("writing", self.port.write, frame)
        flush = getattr(self.port, "flush", None)
        if flush is not None:
            self._io("writing", flush)
        self.requests += 1
        # the meter's time starts once the request has left the wire
        return max(self.clock(), written + wire_seconds(len(frame), self.baudrate))

    def quiet(self) -> None:
        """Wait until the line has been quiet for ``pause``: the rest of a cut-off or late
        answer must not pass for the answer to a retry.  Gives up on a babbling line."""
        quiet = max(self.pause, wire_seconds(4, self.baudrate))
        start = last = self.clock()
        give_up = start + quiet + wire_seconds(LONGEST_ANSWER, self.baudrate) + STALL
        while self.clock() - last < quiet and self.clock() < give_up:
            chunk = self._read()
            if chunk:
                self._trace("late", chunk)
                last = self.clock()

    # -- one exchange ----------------------------------------------------

    def _answer(self, request: bytes, sent_at: float, fits=None) -> KmpFrame:
        deadline = sent_at + wire_seconds(1, self.baudrate) + self.timeout
        hard = deadline + 2 * wire_seconds(LONGEST_ANSWER, self.baudrate) + STALL
        buf = bytearray()
        begun = False  # a 40 has come: the answer is under way
        last = sent_at
        bad = None  # a frame that failed its checks: the meter has had its say
        acked = False  # a lone 06: the meter may still send an answer, so wait on
        budget = LONGEST_ANSWER + len(request)  # the echo, noise and the answer
        while True:
            if begun or bad:  # each byte of an answer may follow the last within STALL
                limit = min(last + STALL + wire_seconds(2, self.baudrate), hard)
            else:
                limit = deadline
            if self.clock() >= limit:
                break
            chunk = self._read()
            if not chunk:
                continue
            last = self.clock()
            buf += chunk
            if len(buf) > budget:
                self._trace("<", buf)
                raise KmpError(f"a babbling line: {len(buf)} bytes and no answer")
            while True:
                frame, end = find_answer(bytes(buf))
                if frame is None:
                    break
                self._skip(buf[: end - len(frame)], request)
                del buf[:end]
                self._trace("<", frame)
                try:
                    parsed = parse_frame(frame)
                except KmpFrameError as exc:
                    bad = str(exc)
                else:
                    if fits is not None and not fits(parsed):  # a late answer to a retry
                        self._trace("late", frame)
                        continue
                    if self.on_answer is not None:
                        self.on_answer(frame)
                    return parsed
            at = buf.find(START_ANSWER)
            acked = acked or ACK in (buf if at < 0 else buf[:at])
            begun = at >= 0
        at = buf.find(START_ANSWER)
        self._skip(buf if at < 0 else buf[:at], request)
        if at >= 0:
            self._trace("<", buf[at:])
            raise KmpError(f"answer cut off: {len(buf) - at} bytes and no stop byte")
        if bad:
            raise KmpError(bad)
        if acked:
            raise KmpError("a lone ACK (06) where an answer was due")
        noise = len(buf) - (len(request) if request in buf else 0)
        if noise:
            raise KmpError(f"no answer within {self.timeout:g} s, {noise} bytes of noise")
        raise KmpError(f"no answer within {self.timeout:g} s")

    def _skip(self, skipped, request: bytes) -> None:
        """Trace what came before the answer: the request's echo, noise."""
        skipped = bytes(skipped)
        at = skipped.find(request)
        if at >= 0:
            self._trace("noise", skipped[:at]) if at else None
            self._trace("echo", request)
            skipped = skipped[at + len(request) :]
        if skipped:
            self._trace("noise", skipped)

    def exchange(self, request: bytes, what: str, fits=None) -> KmpFrame:
        """Send ``request``, return the meter's checked answer; at most 1 + retries
        requests, each on a quiet line."""
        reason = ""
        for attempt in range(1 + self.retries):
            if attempt:
                self.quiet()
            try:
                return self._answer(request, self._send(request), fits)
            except KmpError as exc:
                if str(exc).startswith("port failed"):  # asking again will not help
                    raise
                reason = str(exc)
                if self.log:
                    self.log(f"! {what}: {reason}")
        tries = 1 + self.retries
        raise KmpError(f"{what}: {reason} (after {tries} {'try' if tries == 1 else 'tries'})")

    # -- commands ----------------------------------------------------------

    def _ask(self, request: bytes, what: str, parse, fits=None):
        frame = self.exchange(request, what, fits)
        try:
            if frame.destination != HEAT_METER:
                raise KmpFrameError(f"answer from address 0x{frame.destination:02X}")
            return parse(frame)
        except KmpFrameError as exc:  # the meter answered: asking again will not help
            raise KmpError(f"{what}: {exc}") from None

    def get_type(self) -> tuple:
        return self._ask(get_type_request(), "GetType", parse_type)

    def get_serial(self) -> int:
        return self._ask(get_serial_request(), "GetSerialNo", parse_serial)

    def get_registers(self, ids: Sequence[int]) -> dict:
        what = f"GetRegister {','.join(map(str, ids))}"

        def fits(frame: KmpFrame) -> bool:  # not the answer to an earlier request's retry
            first = int.from_bytes(frame.data[:2], "big") if len(frame.data) >= 2 else None
            return frame.cid != CID_GET_REGISTER or first is None or first in ids

        request = get_register_request(ids)
        return self._ask(request, what, lambda f: parse_registers(f, ids), fits)

    def read(self, ids: Sequence[int] = READ_REGISTERS) -> KmpReading:
        """One read: the registers in ``read_plan`` requests (2 for the default ten).
        Only a meter that does not know register 1001 costs a third (GetSerialNo)."""
        first = self.requests
        registers: dict = {}
        for batch in read_plan(ids):
            registers.update(self.get_registers(batch))
        serial = None
        if SERIAL_NUMBER not in registers:
            serial = self.get_serial()
        try:
            return reading_from(registers, self.requests - first, serial)
        except KmpFrameError as exc:
            raise KmpError(str(exc)) from None


def read_meter(port, *, baudrate=BAUDRATE, timeout=ANSWER_TIMEOUT, retries=2, log=None,
               clock=None, on_answer=None) -> KmpReading:  # fmt: skip
    """Read the meter on ``port`` (opened with SERIAL_SETTINGS): its serial number and
    values in SI units, or KmpError saying why not."""
    meter = KmpMeter(port, baudrate=baudrate, timeout=timeout, retries=retries, log=log,
                     clock=clock, on_answer=on_answer)  # fmt: skip
    return meter.read()


# ---------------------------------------------------------------------------
# 4. A simulated MULTICAL 303 behind its eye
# ---------------------------------------------------------------------------

# The values of the simulator's M-Bus MULTICAL 303 (tests/data/kamstrup/
# multical303_heat_cooling.hex, kamstrup_sim's FRAMES["303"]), in the units a 303 shows:
# register -> (unit code, value).
MULTICAL303 = {
    ENERGY_E1: (0x02, "154"),  # kWh
    VOLUME_V1: (0x28, "39.49"),  # m3
    HOUR_COUNTER: (0x2E, "2697"),  # h
    T1: (0x25, "29.30"),  # degC
    T2: (0x25, "28.20"),
    T1_T2: (0x26, "1.10"),  # K
    POWER: (0x16, "1.4"),  # kW
    VOLUME_FLOW: (0x29, "1128"),  # l/h
    INFO_CODE: (0x00, "0"),
    INFO_EVENT_COUNTER: (0x00, "3"),  # not the info code: a read must not take it for it
    SERIAL_NUMBER: (0x00, "30303030"),
}
# The energy in another unit the meter may be set to: unit code, value.
ENERGY_UNITS = {"kWh": (0x02, "154"), "MWh": (0x03, "0.154"), "GJ": (0x08, "0.5544")}
# The Kamstrup document's GetType example (00 04, revision F1): a 303's own is not known.
METER_TYPE = b"\x00\x04\x06\x01"
FAULTS = ("silent", "crc", "cut", "ack", "noise", "garbage")
NOISE = b"\x00\xff\x0d\x12"  # line noise before an answer (a 0D among it)


class SimulatedKmpMeter:
    """A MULTICAL 303 behind its eye: request bytes in, answer bytes out.

    ``answer(request)`` is the meter's side of one exchange.  ``feed(data, rate)`` is the
    interface of kamstrup_sim's SimulatedBus (FakePort and the pty/TCP lines call it):
    a list of (seconds after the request, bytes, False).  ``requests`` counts what
    reached the meter (its battery).  ``faults`` are used up one per request: "silent",
    "crc" (a corrupt CRC), "cut" (the answer cut off), "ack" (a lone 06), "noise" (bytes
    before the 40), "garbage" (noise without an answer); ``echo`` reflects each request
    as an IR head does; ``values`` overrides registers (id -> (unit code, value))."""

    def __init__(self, values: dict | None = None, *, energy_unit: str = "kWh",
                 faults: Sequence[str] = (), echo: bool = False, delay: float = 0.05,
                 baudrate: int | None = BAUDRATE, length: int = 4):  # fmt: skip
        self.values = dict(MULTICAL303)
        self.values[ENERGY_E1] = ENERGY_UNITS[energy_unit]
        self.values.update(values or {})
        self.faults = list(faults)
        for fault in self.faults:
            if fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}: one of {', '.join(FAULTS)}")
        self.echo = echo
        self.delay = delay
        self.baudrate = baudrate  # None: hears every rate (a gateway)
        self.length = length
        self.requests = 0
        self.log: list = []  # the requests heard
        self.buffer = bytearray()

    def registers(self, ids: Sequence[int]) -> list:
        return [Register(i, self.values[i][0], Decimal(self.values[i][1]))
                for i in ids if i in self.values]  # fmt: skip

    def reply(self, frame: KmpFrame):
        """(CID, data) of the answer to a good request, or None (ignored)."""
        if frame.destination != HEAT_METER:
            return None
        if frame.cid == CID_GET_TYPE:
            return CID_GET_TYPE, METER_TYPE
        if frame.cid == CID_GET_SERIAL:
            return CID_GET_SERIAL, int(self.values[SERIAL_NUMBER][1]).to_bytes(4, "big")
        if frame.cid == CID_GET_REGISTER and frame.data:
            n = frame.data[0]
            if not 1 <= n <= MAX_REGISTERS or len(frame.data) != 1 + 2 * n:
                return None
            ids = [int.from_bytes(frame.data[1 + 2 * k : 3 + 2 * k], "big") for k in range(n)]
            return CID_GET_REGISTER, register_data(self.registers(ids), self.length)
        return None

    def answer(self, request: bytes) -> bytes:
        """The bytes the meter sends back to one whole request frame (b"": silence)."""
        try:
            frame = parse_frame(request, START_REQUEST)
        except KmpFrameError:
            return b""  # a meter stays silent on what it cannot read
        self.requests += 1
        self.log.append(bytes(request))
        reply = self.reply(frame)
        fault = self.faults.pop(0) if self.faults else None
        if reply is None or fault == "silent":
            return b""
        cid, data = reply
        body = bytes((HEAT_METER, cid)) + data
        crc = crc16(body) ^ (0x0101 if fault == "crc" else 0)
        out = bytes((START_ANSWER,)) + stuff(body + crc.to_bytes(2, "big")) + bytes((STOP,))
        if fault == "cut":
            out = out[: len(out) // 2]
        elif fault == "ack":
            out = bytes((ACK,))
        elif fault == "noise":
            out = NOISE + out
        elif fault == "garbage":
            out = NOISE + b"\x80\x55"
        return out

    def feed(self, data: bytes, rate: int | None = None) -> list:
        out = []
        if self.echo and data:  # heard back while it is sent: it began len(data) bytes ago
            out.append((-wire_seconds(len(data), rate or BAUDRATE), bytes(data), False))
        if self.baudrate is not None and rate not in (None, self.baudrate):
            return out  # at another rate the meter hears garbage, and stays silent
        self.buffer += data
        while True:
            start = self.buffer.find(bytes((START_REQUEST,)))
            if start < 0:
                self.buffer.clear()
                break
            stop = self.buffer.find(bytes((STOP,)), start)
            if stop < 0:
                del self.buffer[:start]
                break
            request = bytes(self.buffer[start : stop + 1])
            del self.buffer[: stop + 1]
            answer = self.answer(request)
            if answer:
                out.append((self.delay, answer, False))
        return out
