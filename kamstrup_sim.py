#!/usr/bin/env python3
"""A simulated M-Bus with Kamstrup MULTICAL meters, for running and testing without hardware.

    kamstrup-sim -- kamstrup-textfile --once --output -

creates a pseudo-terminal, answers on it like a MULTICAL 303 at primary address 48
(paced at the baud rate, 11 bits a byte, answering after 50 ms), sets
KAMSTRUP_PORT to the pty for the command and exits with the command's status.
``--tcp 127.0.0.1:10001`` serves the same bus on a TCP socket
(``--port socket://127.0.0.1:10001``) until interrupted, like a transparent gateway:
to any number of clients at once, each hearing every answer.

The answers are real MULTICAL frames (tests/data/kamstrup), with the address and
identification number rewritten.  As hostile as a real bus: each meter hears only
requests at its own baud rate, answers after its own delay, honours the FCB as a
slave does, is selected by secondary address with wildcards; meters that answer at
once collide (wired-AND, garbage out of step).  Faults per meter (``--meter
303:48,delay=0.19,ignore_fcb``): silent, late, a bad checksum, a truncated answer,
noise before the frame, multi-telegram answers, endless "more records follow", a
meter that ignores the FCB, an application error, a sleepy first request, and the
adapter pulled mid-frame; and an echoing adapter (``--echo``).

``--protocol kmp`` serves a MULTICAL 303 behind its optical eye instead (Kamstrup's
KMP, kamstrup_kmp.SimulatedKmpMeter) at 1200 baud, paced at 11 bits a byte (8N2; a pty
cannot carry stop bits, but the meter answers only requests sent at its rate), with the
eye's faults (``--meter 303::30303030,crc=always``): silence, a bad CRC, a cut-off
answer, a lone ACK, noise before or instead of the answer, the head's echo, a meter at
another rate, values that need byte stuffing, the head unplugged mid-answer.
``--requests FILE`` says what the run cost the meter's battery: the requests it heard.
"""

from __future__ import annotations

import math
import os
import select
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import kamstrup_kmp as kmp

# Real answers (RSP_UD) of Kamstrup meters, data only (see tests/data/kamstrup).
FRAMES = {
    "303": (
        "68 88 88 68 08 30 72 30 30 30 30 2D 2C 40 0D 00 00 00 00 04 06 9A 00 00 00 04 86 3C"
        " 00 00 00 00 04 14 6D 0F 00 00 04 FF 07 72 05 00 00 04 FF 08 EC 04 00 00 03 22 89 0A"
        " 00 33 22 00 00 00 02 59 72 0B 02 5D 04 0B 02 61 6E 00 02 2D 0E 00 12 2D B4 00 02 3B"
        " 68 04 12 3B 7A 04 02 FF 22 00 00 44 06 00 00 00 00 44 86 3C 00 00 00 00 44 14 00 00"
        " 00 00 44 FF 07 00 00 00 00 44 FF 08 00 00 00 00 52 2D 00 00 52 3B 00 00 42 6C 00 00"
        " 6C 16"
    ),
    "303-heat": (
        "68 7A 7A 68 08 85 72 33 71 93 82 2D 2C 40 04 43 10 00 00 04 06 0D 00 00 00 04 14 33"
        " 01 00 00 04 FF 07 7D 00 00 00 04 FF 08 72 00 00 00 03 22 AE 10 00 33 22 96 00 00 02"
        " 59 48 09 02 5D 17 09 02 61 31 00 02 2D 00 00 12 2D 5A 00 02 3B 00 00 12 3B 67 05 02"
        " FF 22 00 01 44 06 00 00 00 00 44 14 00 00 00 00 44 FF 07 00 00 00 00 44 FF 08 00 00"
        " 00 00 52 2D 00 00 52 3B 00 00 42 6C 01 36 A6 16"
    ),
    "403": (
        "68 46 46 68 08 4A 72 44 77 44 77 2D 2C 34 04 06 00 00 00 04 06 CE 86 00 00 04 FF 07"
        " 34 44 02 00 04 FF 08 F8 CE 01 00 04 14 11 68 03 00 04 3B 0F 02 00 00 02 59 3C 19 02"
        " 5D A4 11 04 FF 22 00 00 00 00 04 A5 FF 21 C7 D0 27 00 D9 16"
    ),
}

ACK = b"\xe5"


def checksum(body: bytes) -> int:
    return sum(body) & 0xFF


def rewrite(frame: bytes, address: int | None = None, ident: str | None = None) -> bytes:
    """The same long frame with another primary address and/or identification number."""
    body = bytearray(frame[4:-2])
    if address is not None:
        body[1] = address
    if ident is not None:
        body[3:7] = bytes.fromhex(ident)[::-1]
    return bytes(frame[:4]) + bytes(body) + bytes((checksum(body), 0x16))


def split_more_records(frame: bytes) -> list:
    """Two telegrams from one: the first half of the records ending in DIF 0x1F.

    The MULTICAL 303 record boundaries are known (corpus layout); cut after the
    record that ends at byte offset ``cut`` of the data.
    """
    body = frame[4:-2]
    header = body[:15]  # C A CI + 12-byte header
    records = body[15:]
    cut = 43  # after 04 06, 04 86 3C, 04 14, 04 FF 07, 04 FF 08, 03 22 and 33 22
    first = header + records[:cut] + b"\x1f"
    second = header + records[cut:]
    return [_long(first), _long(second)]


def _long(body: bytes) -> bytes:
    n = len(body)
    return bytes((0x68, n, n, 0x68)) + body + bytes((checksum(body), 0x16))


@dataclass
class Meter:
    """One simulated slave, with the faults a real one (or its line) can have.

    ``telegrams()`` are the answers to successive REQ_UD2.  The FCB is honoured as a
    slave does: the first REQ_UD2 after SND_NKE (or a selection) gets the first
    telegram, a toggled FCB the next one, a repeated FCB the same one again (the
    master lost it and asks anew).
    """

    address: int = 48
    ident: str = "30303030"
    kind: str = "303"
    silent: bool = False
    delay: float = 0.05  # answer after 50 ms (11..330 bit times + 50 ms in the standard)
    delays: list = field(default_factory=list)  # the first answers' own delays, then delay
    bad_checksum: bool = False
    truncate: int | None = None  # send only this many bytes of the answer
    noise: bytes = b""  # bytes sent before the answer
    multi: bool = False  # answer in two telegrams, the first ending with DIF 0x1F
    disconnect_at: int | None = None  # the line goes away after this many bytes of the answer
    fail_first: int = 0  # stay silent on the first N requests (a sleepy battery meter)
    application_error: int | None = None  # answer REQ_UD2 with CI 0x70 and this code
    ignore_fcb: bool = False  # always the first telegram, whatever the FCB says
    endless: bool = False  # every telegram says "more records follow" (DIF 0x1F)
    corrupt: frozenset = frozenset()  # answers to these REQ_UD2 (1, 2, ...) get a bad checksum
    baudrate: int | None = None  # the only rate it hears (None: any)
    selected: bool = False
    requests: list = field(default_factory=list)
    _fcb: int | None = None  # FCB of the last REQ_UD2 answered; None after SND_NKE
    _index: int = 0  # the telegram last sent
    _answered: int = 0  # REQ_UD2 answered so far

    def telegrams(self) -> list:
        frame = rewrite(bytes.fromhex(FRAMES[self.kind]), self.address, self.ident)
        telegrams = split_more_records(frame) if self.multi else [frame]
        if self.endless:  # "more follow" on each, told apart by their access numbers
            telegrams = [_more_follow(t, access) for access, t in enumerate(telegrams * 32)]
        return telegrams

    def matches(self, mask: bytes) -> bool:
        """Whether a selection (ID, MAN, VER, MED; F nibbles, FF bytes wildcards) is ours."""
        wanted = mask[0:4][::-1].hex().upper()
        if any(w != "F" and w != own for w, own in zip(wanted, self.ident)):
            return False
        header = self.telegrams()[0][11:15]  # MAN(2) VER MED after C A CI ID(4)
        if mask[4:6] != b"\xff\xff" and mask[4:6] != header[0:2]:
            return False
        return all(m in (0xFF, own) for m, own in zip(mask[6:8], header[2:4]))

    def next_delay(self) -> float:
        return self.delays.pop(0) if self.delays else self.delay

    def reset_link(self) -> None:
        """SND_NKE (or a new selection): the next REQ_UD2 starts at the first telegram."""
        self._fcb = None
        self._index = 0

    def answer(self, fcb: int = 1) -> bytes:
        self._answered += 1
        if self.application_error is not None:
            return _long(bytes((0x08, self.address, 0x70, self.application_error)))
        telegrams = self.telegrams()
        if self.ignore_fcb:
            self._index = 0
        elif self._fcb is not None and fcb != self._fcb:
            self._index = (self._index + 1) % len(telegrams)
        self._fcb = fcb
        frame = telegrams[self._index]
        if self.bad_checksum or self._answered in self.corrupt:
            frame = frame[:-2] + bytes(((frame[-2] + 1) & 0xFF, 0x16))
        if self.truncate is not None:
            frame = frame[: self.truncate]
        return frame


def _more_follow(frame: bytes, access: int) -> bytes:
    """The telegram with DIF 0x1F ("more records follow") appended and another access number."""
    body = bytearray(frame[4:-2])
    if body[-1] != 0x1F:
        body.append(0x1F)
    body[11] = access & 0xFF  # C A CI, then ID(4) MAN(2) VER MED: the access number
    return _long(bytes(body))


class SimulatedBus:
    """The slaves on one bus: takes the master's bytes, gives the answers to send back.

    A meter hears only requests sent at its baud rate (at another rate it gets
    garbage and stays silent, as a real one does); several meters that answer one
    request answer at once and their bytes smear on the wire (wired-AND, and garbage
    where they are out of step), as on a real M-Bus.
    """

    def __init__(self, meters, *, echo: bool = False):
        self.meters = list(meters)
        self.echo = echo
        self.buffer = bytearray()
        self.log: list = []

    def feed(self, data: bytes, rate: int | None = None) -> list:
        """Bytes from the master at ``rate`` (None: a gateway, every meter hears) ->
        list of (seconds after the request, bytes, disconnect after?), in time order (an
        echo's time is negative: it comes back as the request goes out)."""
        out = []
        if self.echo and data:  # heard back while it is sent: it began len(data) bytes ago
            out.append((-len(data) * 11 / (rate or 2400), bytes(data), False))
        self.buffer += data
        while True:
            request = self._take_frame()
            if request is None:
                break
            self.log.append(request)
            hearing = [m for m in self.meters if m.baudrate is None or rate in (None, m.baudrate)]
            answers = self._handle(request, hearing)
            if len(answers) > 1:
                answers = _smear(answers, 11 / (rate or 2400))
            out.extend(answers)
        return out

    def _take_frame(self):
        buf = self.buffer
        while buf and buf[0] not in (0x10, 0x68):
            del buf[0]
        if not buf:
            return None
        if buf[0] == 0x10:
            if len(buf) < 5:
                return None
            frame = bytes(buf[:5])
            del buf[:5]
            return frame
        if len(buf) < 4:
            return None
        length = buf[1] + 6
        if len(buf) < length:
            return None
        frame = bytes(buf[:length])
        del buf[:length]
        return frame

    @staticmethod
    def _targets(address: int, meters):
        if address == 0xFE:
            return list(meters)
        if address == 0xFD:
            return [m for m in meters if m.selected]
        return [m for m in meters if m.address == address]

    def _handle(self, frame: bytes, meters) -> list:
        out = []
        if frame[0] == 0x10:
            c, a = frame[1], frame[2]
            if frame[3] != (c + a) & 0xFF:
                return out
            for meter in self._targets(a, meters):
                meter.requests.append(frame)
                if not self._awake(meter):
                    continue
                if c == 0x40:  # SND_NKE
                    meter.reset_link()
                    if a == 0xFD:
                        meter.selected = False
                    out.append((meter.next_delay(), ACK, False))
                elif c & 0xCF == 0x4B:  # REQ_UD2, FCB 0 or 1
                    answer = meter.noise + meter.answer(fcb=(c >> 5) & 1)
                    cut = meter.disconnect_at
                    if cut is not None:
                        out.append((meter.next_delay(), answer[:cut], True))
                    else:
                        out.append((meter.next_delay(), answer, False))
            return out
        # long frame from the master: SND_UD (either FCB) selecting by secondary address,
        # F nibbles and FF bytes as wildcards; a meter that does not match is deselected
        c, a, ci = frame[4], frame[5], frame[6]
        if c & 0xDF == 0x53 and a == 0xFD and ci == 0x52 and len(frame) == 17:
            mask = frame[7:15]
            for meter in meters:
                meter.selected = meter.matches(mask)
                if meter.selected:
                    meter.requests.append(frame)
                    meter.reset_link()
                    if self._awake(meter):
                        out.append((meter.next_delay(), ACK, False))
        return out

    @staticmethod
    def _awake(meter: Meter) -> bool:
        if meter.silent:
            return False
        if meter.fail_first > 0:
            meter.fail_first -= 1
            return False
        return True


def uart_receive(data: bytes, sent_rate: int, read_rate: int) -> list:
    """What a UART set to ``read_rate`` reads of bytes sent back to back at ``sent_rate``
    (both 8E1): (seconds from the first start bit to the end of each byte read, the
    byte).  A receiver waits for a falling edge, takes it for a start bit if the line is
    still low half a bit later, and samples the middle of each bit time; a byte with a
    low stop bit (a framing error) is passed on as sampled, as Linux does when INPCK is
    off (pyserial turns it off).  A meter's answer read at a faster rate turns into more
    bytes of garbage; at a much slower rate a short answer vanishes, a long one leaves a
    few bytes of garbage."""
    levels = []  # the line in each bit the sender sends: start 0, 8 data, parity, stop 1
    for byte in data:
        bits = [(byte >> k) & 1 for k in range(8)]
        levels += [0, *bits, sum(bits) & 1, 1]
    sent_bit, read_bit = 1 / sent_rate, 1 / read_rate

    def level(t: float) -> int:
        i = math.floor(t / sent_bit + 1e-9)
        return levels[i] if 0 <= i < len(levels) else 1  # idle after the last byte

    out = []
    i = 0
    while i < len(levels):
        if levels[i] == 1 or (i and levels[i - 1] == 0):
            i += 1
            continue
        start = i * sent_bit  # a falling edge
        if level(start + read_bit / 2):
            i += 1
            continue  # a glitch, no start bit
        value = sum(level(start + (k + 1.5) * read_bit) << k for k in range(8))
        out.append((start + 11 * read_bit, value))
        i = max(i + 1, math.floor((start + 10.5 * read_bit) / sent_bit + 1e-9) + 1)
    return out


def _smear(answers: list, byte_time: float) -> list:
    """Answers sent at once, as the master hears them.  Where they overlap, the first
    bytes of two answers in step AND (a 0 bit from any slave wins on the wire: two E5s
    make one E5, a lone byte that looks valid); out of step they turn into garbage; and
    the later bytes of answers that overlap are framing errors (the slaves' clocks
    drift apart within a few bytes), garbage that we make 00."""
    events = sorted(
        (delay + i * byte_time, byte, i)
        for delay, data, _ in answers
        for i, byte in enumerate(data)
    )
    heard: list = []  # [time, byte, first bytes only so far?]
    for when, byte, index in events:
        if heard and when - heard[-1][0] < byte_time - 1e-9:  # overlaps the byte before
            shift = round((when - heard[-1][0]) / byte_time * 11) % 8
            if index or not heard[-1][2]:
                heard[-1][1] = 0x00
            elif shift:
                heard[-1][1] &= ((byte << shift) | (byte >> (8 - shift))) & 0xFF
            else:
                heard[-1][1] &= byte
            heard[-1][2] = heard[-1][2] and index == 0
        else:
            heard.append([when, byte, index == 0])
    runs: list = []  # back to (delay, bytes) runs of back-to-back bytes
    for when, byte, _ in heard:
        if runs and abs(when - (runs[-1][0] + len(runs[-1][1]) * byte_time)) < 1e-9:
            runs[-1][1].append(byte)
        else:
            runs.append([when, bytearray((byte,))])
    disconnect = any(d for _, _, d in answers)
    last = len(runs) - 1
    return [(when, bytes(data), disconnect and i == last) for i, (when, data) in enumerate(runs)]


class SimClock:
    """Simulated time for in-process tests: it moves only when someone waits."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


class FakePort:
    """An in-process port with pyserial's read/write/reset_input_buffer over a SimulatedBus.

    Without a clock, answers are there at once and an empty read sleeps ``timeout``
    (fast tests of what is said).  With a SimClock, the port is a line in simulated
    time (tests of when): an answer starts ``delay`` after the request has left, its
    bytes arrive one every 11 bit times, ``read(n)`` returns once n bytes are in or
    ``timeout`` has passed (pyserial's POSIX read), ``reset_input_buffer()`` drops only
    what has arrived, so bytes still on the wire come later, as on a real line.
    """

    def __init__(self, bus: SimulatedBus, timeout: float = 0.01, clock=None, baudrate=2400):
        self.bus = bus
        self.timeout = timeout
        self.clock = clock
        self._baudrate = baudrate  # the master sets it; meters at another rate do not hear
        self.incoming: list = []  # (arrival time, byte) as the master's UART reads them
        self.wire: list = []  # (arrival time, byte, rate sent at) still to come
        self._view: set = set()  # the entries of incoming that are the wire's, as read
        self.drained = 0.0  # when the last byte written has left the master
        self.hangup: float | None = None  # from this time on the line is gone
        self.written = bytearray()
        self.sent: list = []  # (time, bytes) of each write
        self.closed = False

    @property
    def disconnected(self) -> bool:
        return self.hangup is not None

    @property
    def byte_time(self) -> float:
        return 11 / self.baudrate

    @property
    def baudrate(self) -> int:
        return self._baudrate

    @baudrate.setter
    def baudrate(self, rate: int) -> None:
        """A new rate: the bytes still on the wire, sent at the old one, are read as the
        UART at the new rate reads them (see uart_receive)."""
        self._baudrate = rate
        if self.clock is None:
            return
        now = self.clock()
        self.wire = [w for w in self.wire if w[0] > now]
        # what has come stays; what is to come from the meters is read anew (other bytes,
        # such as a test's noise, stay as they are)
        self.incoming = [e for e in self.incoming if e[0] <= now or e not in self._view]
        self._view = set()
        runs: list = []  # back-to-back bytes sent at one rate: [rate, first end, bytes, last end]
        for when, byte, sent in self.wire:
            if runs and runs[-1][0] == sent and when - runs[-1][3] < 11 / sent * 1.5:
                runs[-1][2].append(byte)
                runs[-1][3] = when
            else:
                runs.append([sent, when, bytearray((byte,)), when])
        for sent, first, data, _ in runs:
            begin = first - 11 / sent  # the first start bit
            if sent == rate:
                times = [begin + (i + 1) * 11 / sent for i in range(len(data))]
                read = list(zip(times, data))
            else:
                read = [(begin + t, b) for t, b in uart_receive(data, sent, rate)]
            self.incoming += read
            self._view.update(read)
        self.incoming.sort(key=lambda tb: tb[0])

    def _now(self) -> float:
        return self.clock() if self.clock is not None else 0.0

    def write(self, data: bytes) -> int:
        now = self._now()
        self.written += data
        self.sent.append((now, bytes(data)))
        sent = now + len(data) * self.byte_time if self.clock is not None else now
        self.drained = max(self.drained, sent)
        for delay, answer, disconnect in self.bus.feed(bytes(data), rate=self.baudrate):
            if self.clock is None:
                times = [now] * len(answer)
                self.incoming.extend(zip(times, answer))
            else:
                start = sent + delay
                times = [start + (i + 1) * self.byte_time for i in range(len(answer))]
                self.wire.extend((t, b, self.baudrate) for t, b in zip(times, answer))
                self._arrive(list(zip(times, answer)))
            if disconnect and self.hangup is None:
                self.hangup = times[-1] if times else sent + delay
        return len(data)

    def _arrive(self, new: list) -> None:
        """An answer's bytes on the line, each at its own time: where they overlap bytes
        of another answer still to come (a late answer to an earlier request), both are
        framing errors, here 00, as on a real line."""
        ours = set(new) | self._view  # entries that are the meters' (not a test's noise)
        merged: list = []  # [time, byte, the meters'?]
        for when, byte in sorted(self.incoming + new, key=lambda tb: tb[0]):
            entry = [when, byte, (when, byte) in ours]
            if merged and when - merged[-1][0] < self.byte_time - 1e-9:
                merged[-1][1] = entry[1] = 0x00
            merged.append(entry)
        self.incoming = [(when, byte) for when, byte, _ in merged]
        self._view = {(when, byte) for when, byte, mine in merged if mine}

    @property
    def in_waiting(self) -> int:
        now = self._now()
        return sum(1 for t, _ in self.incoming if self.clock is None or t <= now)

    def read(self, n: int = 1) -> bytes:
        if self.clock is None:
            if not self.incoming:
                if self.hangup is not None:
                    raise _hangup()
                time.sleep(self.timeout)
                return b""
            return self._take(n)
        now = self.clock()
        limit = now + self.timeout
        ready = 0
        while ready < len(self.incoming) and ready < n and self.incoming[ready][0] <= limit:
            ready += 1
        if ready == n:
            self.clock.now = max(now, self.incoming[n - 1][0])
            return self._take(n)
        if self.hangup is not None and self.hangup <= limit:
            self.clock.now = max(now, self.hangup)
            if not ready:
                raise _hangup()
            return self._take(ready)
        self.clock.now = limit
        return self._take(ready)

    def wait_readable(self, timeout: float) -> bool:
        """What select() on a real port's fd does: wait up to ``timeout`` for a byte (or
        the hang-up); whether one is there."""
        if self.clock is None:
            if self.incoming or self.hangup is not None:
                return True
            time.sleep(timeout)
            return False
        now = self.clock()
        limit = now + timeout
        first = self.incoming[0][0] if self.incoming else None
        if self.hangup is not None and (first is None or self.hangup < first):
            first = self.hangup
        if first is not None and first <= limit:
            self.clock.now = max(now, first)
            return True
        self.clock.now = limit
        return False

    def _take(self, n: int) -> bytes:
        chunk = bytes(b for _, b in self.incoming[:n])
        del self.incoming[:n]
        return chunk

    def reset_input_buffer(self) -> None:
        now = self._now()
        self.incoming = [(t, b) for t, b in self.incoming if t > now]

    def flush(self) -> None:
        """pyserial's flush() is tcdrain(): it returns once the bytes have left (on a
        UART; a pty or a USB adapter returns sooner)."""
        if self.clock is not None:
            self.clock.now = max(self.clock.now, self.drained)

    def close(self) -> None:
        self.closed = True


def _hangup():
    import serial

    return serial.SerialException("device reports readiness to read but returned no data")


class _Line:
    """Serves a SimulatedBus on a file descriptor or socket, pacing bytes at the baud rate."""

    def __init__(self, bus: SimulatedBus, baudrate: int = 2400, pace: bool = True):
        self.bus = bus
        self.byte_time = 11 / baudrate if pace else 0.0
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _send(self, send, data: bytes, byte_time: float) -> None:
        if not byte_time:
            send(data)
            return
        start = time.monotonic()
        for i in range(len(data)):
            if self.stop.is_set() or self._gone():
                return  # nobody listens any more: a real slave would not know, but stop
            target = start + (i + 1) * byte_time  # a byte is there once its 11 bits are
            wait = target - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            send(data[i : i + 1])

    def _answer(self, data: bytes, send, hang_up, rate=None) -> bool:
        """Feed the master's bytes to the bus and send its answers, each at its time after
        the request (paced at ``rate`` if known); False once hung up."""
        start = time.monotonic()
        byte_time = self.byte_time and (11 / rate if rate else self.byte_time)
        for delay, answer, disconnect in self.bus.feed(data, rate=rate):
            wait = start + delay - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                self._send(send, answer, byte_time)
            except OSError:
                return False
            if disconnect:
                hang_up()
                return False
        return True

    def _gone(self) -> bool:
        """Whether the client went away (a pty's hang-up); a TCP send fails instead."""
        return False

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


class PtyLine(_Line):
    """A pseudo-terminal: the tool opens ``self.path``; the simulator owns the master side.

    It serves any number of clients, one after another or at once.  Linux keeps a pty's
    settings while its master is open and refuses a configuration that changes nothing
    it keeps (it drops PARENB, so a second 8E1 set-up looks like no change: EINVAL).  So
    the line is kept at an idle speed no client uses (50 baud): in packet mode with
    EXTPROC the master hears of every configuration at once and notes the speed the
    client set (the meters hear only requests at their rate); it sets the line back to
    idle 20 ms later (glibc reads the settings back at once, and reports EINVAL if its
    own are not there), or as soon as nobody has the pty open.
    ``disconnect`` closes the master: the client's port hangs up (EIO) and the device
    node goes away, as when a USB adapter is unplugged.
    """

    IDLE_SPEED = "B50"
    EXTPROC = 0o200000  # Linux's termios flag (Python's termios module lacks the name)
    TIOCPKT_IOCTL = 0x40  # packet mode: the slave's termios changed

    def __init__(self, bus: SimulatedBus, baudrate: int = 2400, pace: bool = True):
        import fcntl
        import struct
        import termios
        import tty

        super().__init__(bus, baudrate, pace)
        self.master, slave = os.openpty()
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        attrs = termios.tcgetattr(self.master)
        attrs[3] |= self.EXTPROC
        attrs[4] = attrs[5] = getattr(termios, self.IDLE_SPEED)
        termios.tcsetattr(self.master, termios.TCSANOW, attrs)
        fcntl.ioctl(self.master, termios.TIOCPKT, struct.pack("i", 1))
        os.close(slave)  # a client's close is then a hang-up the master sees
        self.rate: int | None = None  # the rate the client set, as last seen
        self.cflag: int | None = None  # the c_cflag the client set, as last seen
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _configured(self) -> bool:
        """A client set the line up: note the speed it set; whether it is not idle."""
        import termios

        if not hasattr(self, "_speeds"):
            self._speeds = {
                getattr(termios, name): int(name[1:])
                for name in dir(termios)
                if name.startswith("B") and name[1:].isdigit()
            }
        attrs = termios.tcgetattr(self.master)
        if attrs[4] == getattr(termios, self.IDLE_SPEED):
            return False
        self.rate = self._speeds.get(attrs[4])
        self.cflag = attrs[2]  # what else the client set: CSTOPB for KMP's 2 stop bits
        return True

    def _idle_again(self) -> None:
        """Set the line back to the idle speed (keeping the client's other settings)."""
        import termios

        attrs = termios.tcgetattr(self.master)
        attrs[4] = attrs[5] = getattr(termios, self.IDLE_SPEED)
        termios.tcsetattr(self.master, termios.TCSANOW, attrs)

    def client_speed(self) -> int | None:
        """The baud rate the client set, as last seen."""
        return self.rate

    def _gone(self) -> bool:
        events = select.poll()
        events.register(self.master, select.POLLIN)
        found = events.poll(0)
        return bool(found) and bool(found[0][1] & select.POLLHUP)

    # glibc reads a pty's settings back right after setting them (and reports EINVAL if
    # nothing it asked for is there): the line goes back to idle only a little later
    IDLE_AFTER = 0.02

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.master, select.POLLIN | select.POLLPRI)
        idle_at = None  # when to set the line back to idle
        while not self.stop.is_set():
            wait = 50 if idle_at is None else max(0, (idle_at - time.monotonic()) * 1000)
            events = poller.poll(wait)
            flags = events[0][1] if events else 0
            if idle_at is not None and time.monotonic() >= idle_at:
                self._idle_again()
                idle_at = None
            if flags & (select.POLLIN | select.POLLPRI):
                try:
                    packet = os.read(self.master, 4096)
                except OSError:  # the client closed between poll and read
                    packet = b""
                if packet[:1] == b"\x00" and len(packet) > 1:  # data from the client
                    send = lambda b: os.write(self.master, b)  # noqa: E731
                    self._answer(packet[1:], send, self._unplug, self.rate)
                    if self.master < 0:  # unplugged: the line is gone for good
                        return
                    continue
                if packet and packet[0] & self.TIOCPKT_IOCTL:
                    if self._configured():
                        idle_at = time.monotonic() + self.IDLE_AFTER
                    continue
                if packet:
                    continue
            if flags & (select.POLLHUP | select.POLLERR):  # nobody has the pty open
                self.bus.buffer.clear()  # a request cut off by the hang-up is forgotten
                again = poller.poll(0)  # still nobody, just before the reset
                if idle_at is not None and again and again[0][1] & select.POLLHUP:
                    self._idle_again()
                    idle_at = None
                time.sleep(0.001)  # poll() cannot wait for a client while the pty hangs up

    def _unplug(self) -> None:
        master, self.master = self.master, -1
        os.close(master)

    def close(self) -> None:
        super().close()
        if self.master >= 0:
            try:
                os.close(self.master)
            except OSError:
                pass
            self.master = -1


class TcpLine(_Line):
    """A TCP listener like a transparent serial-to-TCP M-Bus gateway: any number of
    clients at once, every client's bytes go onto the one bus and the bus's bytes go to
    every client connected (the gateway cannot know who asked), each at its time after
    the request that caused it, while further requests still come in.  Two masters on
    one gateway therefore read each other's answers, as on a real one.  An answer cut off
    (``disconnect_at``) drops every client, as a gateway that lost its line does."""

    def __init__(self, bus, host="127.0.0.1", port=0, baudrate=2400, pace=True):
        super().__init__(bus, baudrate, pace)
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind((host, port))
        self.server.listen(8)
        self.host, self.port = self.server.getsockname()[:2]
        self.url = f"socket://{self.host}:{self.port}"
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import heapq

        clients: list = []
        due: list = []  # heap of (time, order, bytes, hang up after?) still to go out
        order = 0
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                chunk = bytearray()
                hang_up = False
                while due and due[0][0] <= now:
                    _, _, data, cut = heapq.heappop(due)
                    chunk += data
                    hang_up = hang_up or cut
                for conn in list(clients):
                    try:
                        if chunk:
                            conn.sendall(chunk)
                        if hang_up:
                            conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    if hang_up:
                        self._drop(conn, clients)
                if hang_up:  # the line is gone: what was still to come never comes
                    due.clear()
                wait = 0.05 if not due else max(0.0, min(0.05, due[0][0] - now))
                ready, _, _ = select.select([self.server, *clients], [], [], wait)
                for sock in ready:
                    if sock is self.server:
                        try:
                            clients.append(self.server.accept()[0])
                        except OSError:
                            return
                        continue
                    try:
                        data = sock.recv(4096)
                    except OSError:
                        data = b""
                    if not data:
                        self._drop(sock, clients)
                        continue
                    start = time.monotonic()
                    for delay, answer, cut in self.bus.feed(data):
                        begin = start + delay
                        for i in range(len(answer)):  # a byte is there once its 11 bits are
                            order += 1
                            when = begin + (i + 1) * self.byte_time
                            last = cut and i == len(answer) - 1
                            heapq.heappush(due, (when, order, answer[i : i + 1], last))
                        if cut and not answer:
                            order += 1
                            heapq.heappush(due, (begin, order, b"", True))
        finally:
            for conn in clients:
                conn.close()

    def _drop(self, conn: socket.socket, clients: list) -> None:
        clients.remove(conn)
        conn.close()
        if not clients:  # a request cut off by the last client's going is forgotten
            self.bus.buffer.clear()

    def close(self) -> None:
        super().close()
        self.server.close()


# Faults a --meter may carry after its KIND[:ADDRESS[:ID]], as ,NAME or ,NAME=VALUE.
_FAULTS = {
    "silent": bool,
    "delay": float,
    "bad_checksum": bool,
    "truncate": int,
    "noise": bytes.fromhex,
    "multi": bool,
    "disconnect_at": int,
    "fail_first": int,
    "application_error": int,
    "ignore_fcb": bool,
    "endless": bool,
    "baudrate": int,
}


def _parse_meter(text: str) -> Meter:
    """KIND[:ADDRESS[:ID]][,FAULT[=VALUE]...], e.g. 303, 303:133, 403:74:77447744,delay=0.19."""
    what, *faults = text.split(",")
    parts = what.split(":")
    meter = Meter(kind=parts[0])
    if meter.kind not in FRAMES:
        raise ValueError(f"unknown meter {parts[0]!r}: choose from {', '.join(FRAMES)}")
    try:
        if len(parts) > 1:
            meter.address = int(parts[1])
    except ValueError:
        raise ValueError(f"{what!r} is not KIND[:ADDRESS[:ID]]") from None
    if not 0 <= meter.address <= 250:
        raise ValueError(f"{what!r}: address {meter.address} is not a primary address (0-250)")
    if len(parts) > 2:
        meter.ident = parts[2]
        if not (meter.ident.isascii() and meter.ident.isdigit() and len(meter.ident) == 8):
            raise ValueError(f"{what!r}: {meter.ident!r} is not an 8-digit id")
    for fault in faults:
        name, sep, value = fault.partition("=")
        kind = _FAULTS.get(name)
        if kind is None:
            raise ValueError(f"unknown fault {name!r}: choose from {', '.join(_FAULTS)}")
        try:
            setattr(meter, name, True if kind is bool and not sep else kind(value))
        except ValueError:
            raise ValueError(f"{fault!r}: {value!r} is not a {kind.__name__}") from None
    return meter


# ---------------------------------------------------------------------------
# The optical eye: a MULTICAL 303 talking KMP (--protocol kmp)
# ---------------------------------------------------------------------------

# Values whose mantissas hold the bytes KMP stuffs (06 0D 1B 40 80), some next to each
# other, each a value a 303 could show: energy 396571 kWh (00 06 0D 1B), volume
# 17859.84 m3 (00 1B 40 80), 1664 hours (00 00 06 80), t1 33.34 degC (00 00 0D 06).
STUFFED_VALUES = {
    kmp.ENERGY_E1: (0x02, str(0x00060D1B)),
    kmp.VOLUME_V1: (0x28, "17859.84"),
    kmp.HOUR_COUNTER: (0x2E, str(0x0680)),
    kmp.T1: (0x25, "33.34"),
}


class KmpEyeMeter(kmp.SimulatedKmpMeter):
    """kamstrup_kmp's simulated 303 with what a kamstrup-sim run can ask of it: a fault
    on every request (``always``), not only on the first ones, and the head unplugged
    ``disconnect_at`` bytes into an answer.  It stands in for a SimulatedBus on a
    PtyLine or TcpLine (``feed``, ``buffer``); ``requests`` is what it heard."""

    def __init__(self, *, always: str | None = None, disconnect_at: int | None = None,
                 **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        if always is not None and always not in kmp.FAULTS:
            raise ValueError(f"unknown fault {always!r}: one of {', '.join(kmp.FAULTS)}")
        self.always = always
        self.disconnect_at = disconnect_at

    def answer(self, request: bytes) -> bytes:
        if self.always is not None and not self.faults:
            self.faults.append(self.always)  # used up by this request: the next gets one too
        return super().answer(request)

    def feed(self, data: bytes, rate: int | None = None) -> list:
        # A pty hands the request over at once; on the wire its last byte reaches the
        # meter only after its bits: the answer delay counts from there, as on a real
        # line (without it a reader that forgot the request's own time would pass here).
        wire = len(data) * 11 / (rate or kmp.BAUDRATE)
        out = [(d + wire if d >= 0 else d, a, x) for d, a, x in super().feed(data, rate)]
        if self.disconnect_at is None:
            return out
        for i, (delay, answer, _) in enumerate(out):
            if delay >= 0:  # the meter's answer (an echo comes back at a negative time)
                return out[:i] + [(delay, answer[: self.disconnect_at], True)]
        return out


# What a KMP --meter may carry after 303[::SERIAL], as ,NAME or ,NAME=VALUE.  The eye's
# faults hit the first request (,crc), the first N (,crc=2) or every one (,crc=always).
_KMP_OPTIONS = {
    "echo": bool,  # the head reflects each request (as --echo)
    "delay": float,  # seconds from the end of a request to the answer
    "baudrate": int,  # the only rate the meter hears (a 2400 baud one: baudrate=2400)
    "disconnect_at": int,  # the head is unplugged this many bytes into the first answer
    "stuffed": bool,  # STUFFED_VALUES: values that need byte stuffing
}
KMP_METER_SYNTAX = "303[::SERIAL][,FAULT[=N|always]][,OPTION[=V]]"


def _parse_kmp_meter(text: str, energy_unit: str = "kWh", echo: bool = False) -> KmpEyeMeter:
    """303[::SERIAL][,FAULT[=N|always]...][,OPTION[=VALUE]...]: the one meter the eye
    sees; KMP has no address, so the M-Bus form's address stays empty."""
    what, *options = text.split(",")
    kind, _, rest = what.partition(":")
    if kind != "303":
        raise ValueError(f"unknown KMP meter {kind!r}: the simulated eye shows a 303")
    address, _, serial = rest.partition(":")
    if address:
        raise ValueError(f"{what!r}: KMP has no address: write 303::SERIAL")
    values = {}
    if serial:
        if not (serial.isascii() and serial.isdigit() and len(serial) == 8):
            raise ValueError(f"{what!r}: {serial!r} is not an 8-digit serial number")
        values[kmp.SERIAL_NUMBER] = (0x00, str(int(serial)))
    faults: list = []
    always = None
    settings: dict = {"echo": echo}
    for option in options:
        name, sep, value = option.partition("=")
        if name in kmp.FAULTS:
            if value == "always":
                always = name
            elif not sep or (value.isdigit() and int(value) > 0):
                faults += [name] * (int(value) if sep else 1)
            else:
                raise ValueError(f"{option!r}: {value!r} is neither a count nor 'always'")
            continue
        kind_of = _KMP_OPTIONS.get(name)
        if kind_of is None:
            known = ", ".join([*kmp.FAULTS, *_KMP_OPTIONS])
            raise ValueError(f"unknown KMP fault {name!r}: choose from {known}")
        try:
            settings[name] = True if kind_of is bool and not sep else kind_of(value)
        except ValueError:
            raise ValueError(f"{option!r}: {value!r} is not a {kind_of.__name__}") from None
    if settings.pop("stuffed", False):
        values.update(STUFFED_VALUES)
    return KmpEyeMeter(values=values, energy_unit=energy_unit, faults=faults, always=always,
                       **settings)  # fmt: skip


def requests_heard(bus) -> int:
    """What a run cost the meters' batteries: the requests they heard."""
    if isinstance(bus, kmp.SimulatedKmpMeter):
        return bus.requests
    return sum(len(meter.requests) for meter in bus.meters)


def run(command: list, env: dict) -> int:
    """Run ``command`` and return its exit status, 128 + N when a signal N ended it.

    A Ctrl-C reaches the command as well (one process group): we wait for it to finish
    and pass on what it said, instead of leaving it behind with our own status.
    """
    import signal

    try:
        child = subprocess.Popen(command, env=env)
    except OSError as exc:
        print(f"kamstrup-sim: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),  # the command decides
        # a SIGTERM for us alone (systemd's stop, kill) is passed on, not left behind
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda n, f: child.send_signal(n)),
    }
    try:
        status = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 - status if status < 0 else status


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="kamstrup-sim",
        description="A simulated M-Bus with Kamstrup MULTICAL meters, or a MULTICAL 303 "
        "behind its optical eye (--protocol kmp), on a pty or TCP port.",
        epilog="Faults for --meter: " + ", ".join(_FAULTS) + ". Example: "
        "kamstrup-sim --meter 303:48,delay=0.19 --meter 403:74:77447744,silent.  "
        f"With --protocol kmp, one --meter {KMP_METER_SYNTAX} (KMP has no address): "
        f"faults {', '.join(kmp.FAULTS)} on the first request, the first N (=N) or every "
        f"one (=always); options {', '.join(_KMP_OPTIONS)}. Example: kamstrup-sim "
        "--protocol kmp --meter 303::30303030,crc=always --requests n.txt -- "
        "kamstrup-textfile --once",
    )
    parser.add_argument(
        "--meter",
        action="append",
        default=[],
        metavar="KIND[:ADDR[:ID]][,FAULT[=V]]",
        help="a meter on the bus (303, 303-heat, 403); default 303:48:30303030; "
        f"with --protocol kmp: {KMP_METER_SYNTAX}, default 303::30303030",
    )
    parser.add_argument(
        "--protocol",
        choices=("mbus", "kmp"),
        default="mbus",
        help="mbus: meters on a wired M-Bus (2400 baud); kmp: one meter's optical eye "
        "(1200 baud, 8N2); the command gets KAMSTRUP_PROTOCOL=kmp",
    )
    parser.add_argument(
        "--baudrate", type=int, default=None, help="the line's rate [2400; kmp: 1200]"
    )
    parser.add_argument("--tcp", metavar="HOST:PORT", help="serve on TCP instead of a pty")
    parser.add_argument("--echo", action="store_true", help="echo the master's bytes")
    parser.add_argument(
        "--energy-unit",
        choices=tuple(kmp.ENERGY_UNITS),
        default="kWh",
        help="the unit the KMP meter shows its energy in",
    )
    parser.add_argument(
        "--requests",
        metavar="FILE",
        help="write the number of requests the meters heard (their battery's cost) to "
        "FILE when the simulator ends",
    )
    parser.add_argument("command", nargs="*", help="run this with KAMSTRUP_PORT set")
    args = parser.parse_args(argv)
    kmp_eye = args.protocol == "kmp"
    if args.baudrate is None:
        args.baudrate = kmp.BAUDRATE if kmp_eye else 2400
    try:
        if kmp_eye:
            if len(args.meter) > 1:
                raise ValueError("the optical eye sees one meter: give one --meter")
            text = args.meter[0] if args.meter else "303"
            bus = _parse_kmp_meter(text, args.energy_unit, args.echo)
        else:
            meters = [_parse_meter(text) for text in args.meter] or [Meter()]
            bus = SimulatedBus(meters, echo=args.echo)
    except ValueError as exc:
        parser.error(str(exc))
    if not 300 <= args.baudrate <= 38400:
        parser.error(f"baud rate {args.baudrate} is not from 300 to 38400")
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        if not (port.isdigit() and 0 <= int(port) <= 65535):
            parser.error(f"--tcp {args.tcp}: port {port} is not from 0 to 65535")
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        # a gateway passes bytes at whatever rate its serial side runs: the meter's
        rate = getattr(bus, "baudrate", None) if kmp_eye else None
        line = TcpLine(bus, host or "127.0.0.1", int(port), rate or args.baudrate)
        where = line.url
    else:
        line = PtyLine(bus, args.baudrate)
        where = line.path
    try:
        if args.command:
            env = dict(os.environ, KAMSTRUP_PORT=where, KAMSTRUP_BAUDRATE=str(args.baudrate))
            # the simulated bus is not the one /etc/default/kamstrup names: its settings
            # (addresses, output) are not this run's, unless KAMSTRUP_CONFIG says otherwise
            env.setdefault("KAMSTRUP_CONFIG", "")
            if kmp_eye:
                env["KAMSTRUP_PROTOCOL"] = "kmp"
            return run(args.command, env)
        what = "KMP meter (optical eye)" if kmp_eye else "M-Bus"
        print(f"simulated {what} on {where} (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        line.close()
        if args.requests:
            _write_requests(args.requests, requests_heard(bus))


def _write_requests(path: str, count: int) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"{count}\n")
    except OSError as exc:
        print(f"kamstrup-sim: cannot write {path}: {exc.strerror}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
