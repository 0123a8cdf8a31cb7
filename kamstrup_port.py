#!/usr/bin/env python3
"""The serial port or network gateway a meter is read through, for both protocols.

Opened exclusively (runs on one port or one gateway take turns), with the protocol's
line settings (M-Bus 8E1, KMP 8N2) and a short read slice; every way pyserial, termios or
the kernel can fail becomes one line saying what to do, and who holds a busy port is
named.  Used by kamstrup_mbus.py, kamstrup_kmp.py's callers and kamstrup_textfile.py.
"""

from __future__ import annotations

import os
import re
import time
from typing import Sequence

READ_SLICE = 0.05  # seconds a single port read may block; the deadline is the caller's

# ---------------------------------------------------------------------------
# 1. Errors
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


def _reason(exc: BaseException) -> str:
    """What the system said, on one line: 'Input/output error', not "(5, 'Input/...')"."""
    strerror = getattr(exc, "strerror", None)
    if strerror:
        return _one_line(strerror)
    args = exc.args
    if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):
        return _one_line(args[1])
    return _one_line(str(exc)) or type(exc).__name__


# ---------------------------------------------------------------------------
# 2. Opening a port, and the gateway's lock
# ---------------------------------------------------------------------------

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


MBUS_LINE = ("E", 1)  # EN 13757-2: 8 data bits, even parity, 1 stop bit
KMP_LINE = ("N", 2)  # the optical eye: 8 data bits, no parity, 2 stop bits
ADAPTER = "the M-Bus adapter"  # what a missing port is said to be


def open_port(url: str, baudrate: int, wait: float = 10.0, line=MBUS_LINE, adapter=ADAPTER):
    """Open the serial port or pyserial URL exclusively, 8 data bits with ``line``'s
    parity and stop bits (M-Bus 8E1, KMP 8N2), with a short read slice.

    A port locked by another run (a gateway: see gateway_lock_name) is tried again
    until ``wait`` seconds have passed.  Errors become a BusError with one line saying
    what to do.
    """
    deadline = time.monotonic() + wait
    lock = _lock_gateway(url, deadline)
    try:
        port = _open_serial(url, baudrate, deadline, line, adapter)
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


def _open_serial(url: str, baudrate: int, deadline: float, line=MBUS_LINE, adapter=ADAPTER):
    import errno

    import serial  # pyserial

    while True:
        try:
            port = serial.serial_for_url(
                url,
                baudrate=baudrate,
                bytesize=serial.EIGHTBITS,
                parity=line[0],
                stopbits=line[1],
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
                    f"port {url} does not exist: is {adapter} plugged in "
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


# ---------------------------------------------------------------------------
# 3. Who holds a port
# ---------------------------------------------------------------------------


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
