#!/usr/bin/env python3
"""A simulated M-Bus with Kamstrup MULTICAL meters, for running and testing without hardware.

    kamstrup-sim -- kamstrup-textfile --once --output -

creates a pseudo-terminal, answers on it like a MULTICAL 303 at primary address 48
(paced at the baud rate, 11 bits a byte, answering after 50 ms), sets
KAMSTRUP_PORT to the pty for the command and exits with the command's status.
``--tcp 127.0.0.1:10001`` serves the same bus on a TCP socket
(``--port socket://127.0.0.1:10001``) until interrupted.

The answers are real MULTICAL frames (corpus/kamstrup), with the address and
identification number rewritten.  Behaviours for tests: silent, late, a bad
checksum, a truncated answer, noise before the frame, an echoing adapter,
multi-telegram answers, and a disconnect mid-frame.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

# Real answers (RSP_UD) of Kamstrup meters, data only (see ../shared/corpus/kamstrup).
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
    """One simulated slave.  ``telegrams``: the answers to successive REQ_UD2 (FCB toggled)."""

    address: int = 48
    ident: str = "30303030"
    kind: str = "303"
    silent: bool = False
    delay: float = 0.05  # answer after 50 ms (11..330 bit times + 50 ms in the standard)
    bad_checksum: bool = False
    truncate: int | None = None  # send only this many bytes of the answer
    noise: bytes = b""  # bytes sent before the answer
    multi: bool = False  # answer in two telegrams, the first ending with DIF 0x1F
    disconnect_at: int | None = None  # close the line after this many bytes of the answer
    fail_first: int = 0  # stay silent on the first N requests (a sleepy battery meter)
    application_error: int | None = None  # answer REQ_UD2 with CI 0x70 and this code
    selected: bool = False
    requests: list = field(default_factory=list)
    _next: int = 0

    def telegrams(self) -> list:
        frame = rewrite(bytes.fromhex(FRAMES[self.kind]), self.address, self.ident)
        return split_more_records(frame) if self.multi else [frame]

    def answer(self) -> bytes:
        if self.application_error is not None:
            return _long(bytes((0x08, self.address, 0x70, self.application_error)))
        telegrams = self.telegrams()
        frame = telegrams[min(self._next, len(telegrams) - 1)]
        self._next = (self._next + 1) % len(telegrams)
        if self.bad_checksum:
            frame = frame[:-2] + bytes(((frame[-2] + 1) & 0xFF, 0x16))
        if self.truncate is not None:
            frame = frame[: self.truncate]
        return frame


class SimulatedBus:
    """The slaves on one bus: takes the master's bytes, gives the answers to send back."""

    def __init__(self, meters, *, echo: bool = False):
        self.meters = list(meters)
        self.echo = echo
        self.buffer = bytearray()
        self.log: list = []

    def feed(self, data: bytes) -> list:
        """Bytes from the master -> list of (delay seconds, bytes, disconnect after?)."""
        out = []
        if self.echo and data:
            out.append((0.0, bytes(data), False))
        self.buffer += data
        while True:
            request = self._take_frame()
            if request is None:
                break
            self.log.append(request)
            out.extend(self._handle(request))
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

    def _targets(self, address: int):
        if address == 0xFE:
            return [m for m in self.meters]
        if address == 0xFD:
            return [m for m in self.meters if m.selected]
        return [m for m in self.meters if m.address == address]

    def _handle(self, frame: bytes) -> list:
        out = []
        if frame[0] == 0x10:
            c, a = frame[1], frame[2]
            if frame[3] != (c + a) & 0xFF:
                return out
            for meter in self._targets(a):
                meter.requests.append(frame)
                if not self._awake(meter):
                    continue
                if c == 0x40:  # SND_NKE
                    meter._next = 0
                    if a == 0xFD:
                        meter.selected = False
                    out.append((meter.delay, ACK, False))
                elif c & 0xCF == 0x4B:  # REQ_UD2 with or without FCB
                    answer = meter.noise + meter.answer()
                    cut = meter.disconnect_at
                    if cut is not None:
                        out.append((meter.delay, answer[:cut], True))
                    else:
                        out.append((meter.delay, answer, False))
            return out
        # long frame from the master: SND_UD selecting a secondary address
        c, a, ci = frame[4], frame[5], frame[6]
        if c == 0x53 and a == 0xFD and ci == 0x52:
            wanted = frame[7:11][::-1].hex().upper()
            for meter in self.meters:
                meter.selected = meter.ident == wanted
                if meter.selected and self._awake(meter):
                    out.append((meter.delay, ACK, False))
        return out

    @staticmethod
    def _awake(meter: Meter) -> bool:
        if meter.silent:
            return False
        if meter.fail_first > 0:
            meter.fail_first -= 1
            return False
        return True


class FakePort:
    """An in-process port with pyserial's read/write over a SimulatedBus, no pacing.

    ``read(n)`` returns what the bus has answered so far (at most n bytes); time
    passes only through ``timeout`` on an empty read, so silence is fast to test.
    """

    def __init__(self, bus: SimulatedBus, timeout: float = 0.01):
        self.bus = bus
        self.timeout = timeout
        self.pending = bytearray()
        self.written = bytearray()
        self.closed = False
        self.disconnected = False

    def write(self, data: bytes) -> int:
        self.written += data
        for _delay, answer, disconnect in self.bus.feed(bytes(data)):
            self.pending += answer
            if disconnect:
                self.disconnected = True
        return len(data)

    def read(self, n: int = 1) -> bytes:
        if not self.pending:
            if self.disconnected:
                import serial

                raise serial.SerialException(
                    "device reports readiness to read but returned no data"
                )
            time.sleep(self.timeout)
            return b""
        chunk = bytes(self.pending[:n])
        del self.pending[:n]
        return chunk

    def reset_input_buffer(self) -> None:
        self.pending.clear()

    def close(self) -> None:
        self.closed = True


class _Line:
    """Serves a SimulatedBus on a file descriptor or socket, pacing bytes at the baud rate."""

    def __init__(self, bus: SimulatedBus, baudrate: int = 2400, pace: bool = True):
        self.bus = bus
        self.byte_time = 11 / baudrate if pace else 0.0
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _send(self, send, data: bytes) -> None:
        if not self.byte_time:
            send(data)
            return
        start = time.monotonic()
        for i in range(len(data)):
            if self.stop.is_set():
                return
            target = start + (i + 1) * self.byte_time  # a byte is there once its 11 bits are
            wait = target - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            send(data[i : i + 1])

    def _serve(self, recv, send, close, fileno) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select([fileno], [], [], 0.05)
            if not ready:
                continue
            try:
                data = recv()
            except OSError:
                return
            if not data:
                return
            for delay, answer, disconnect in self.bus.feed(data):
                if delay:
                    time.sleep(delay)
                try:
                    self._send(send, answer)
                except OSError:
                    return
                if disconnect:
                    close()
                    return

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


class PtyLine(_Line):
    """A pseudo-terminal: the tool opens ``self.path``; the simulator owns the master side."""

    def __init__(self, bus: SimulatedBus, baudrate: int = 2400, pace: bool = True):
        import tty

        super().__init__(bus, baudrate, pace)
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # the tool's own 8E1 set-up is then the only one with parity
        self.path = os.ttyname(self.slave)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        def close():
            os.close(self.slave)  # the far side goes away: reads fail on the tool's side
            self.slave = -1

        self._serve(
            lambda: os.read(self.master, 4096),
            lambda data: os.write(self.master, data),
            close,
            self.master,
        )

    def close(self) -> None:
        super().close()
        for fd in (self.master, self.slave):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


class TcpLine(_Line):
    """A TCP listener (one client at a time), like a network M-Bus gateway."""

    def __init__(self, bus, host="127.0.0.1", port=0, baudrate=2400, pace=True):
        super().__init__(bus, baudrate, pace)
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind((host, port))
        self.server.listen(4)
        self.host, self.port = self.server.getsockname()[:2]
        self.url = f"socket://{self.host}:{self.port}"
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select([self.server], [], [], 0.05)
            if not ready:
                continue
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                self._serve_connection(conn)

    def _serve_connection(self, conn: socket.socket) -> None:
        self._serve(
            lambda: conn.recv(4096),
            conn.sendall,
            lambda: conn.shutdown(socket.SHUT_RDWR),
            conn.fileno(),
        )

    def close(self) -> None:
        super().close()
        self.server.close()


def _parse_meter(text: str) -> Meter:
    """KIND[:ADDRESS[:ID]], e.g. 303, 303:133, 403:74:77447744."""
    parts = text.split(":")
    meter = Meter(kind=parts[0])
    if meter.kind not in FRAMES:
        raise ValueError(f"unknown meter {parts[0]!r}: choose from {', '.join(FRAMES)}")
    if len(parts) > 1:
        meter.address = int(parts[1])
    if len(parts) > 2:
        meter.ident = parts[2]
    return meter


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="kamstrup-sim",
        description="A simulated M-Bus with Kamstrup MULTICAL meters on a pty or TCP port.",
    )
    parser.add_argument(
        "--meter",
        action="append",
        default=[],
        metavar="KIND[:ADDR[:ID]]",
        help="a meter on the bus (303, 303-heat, 403); default 303:48:30303030",
    )
    parser.add_argument("--baudrate", type=int, default=2400)
    parser.add_argument("--tcp", metavar="HOST:PORT", help="serve on TCP instead of a pty")
    parser.add_argument("--echo", action="store_true", help="echo the master's bytes")
    parser.add_argument("command", nargs="*", help="run this with KAMSTRUP_PORT set")
    args = parser.parse_args(argv)
    try:
        meters = [_parse_meter(text) for text in args.meter] or [Meter()]
    except ValueError as exc:
        parser.error(str(exc))
    bus = SimulatedBus(meters, echo=args.echo)
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        line = TcpLine(bus, host or "127.0.0.1", int(port), args.baudrate)
        where = line.url
    else:
        line = PtyLine(bus, args.baudrate)
        where = line.path
    try:
        if args.command:
            env = dict(os.environ, KAMSTRUP_PORT=where, KAMSTRUP_BAUDRATE=str(args.baudrate))
            try:
                return subprocess.call(args.command, env=env)
            except OSError as exc:
                print(
                    f"kamstrup-sim: cannot run {args.command[0]}: {exc.strerror}", file=sys.stderr
                )
                return 127
        print(f"simulated M-Bus on {where} (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        line.close()


if __name__ == "__main__":
    sys.exit(main())
