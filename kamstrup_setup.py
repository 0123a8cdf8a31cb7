"""kamstrup_setup: the first hour, ``sudo kamstrup-textfile --setup`` (issue 18).

From a plugged-in adapter to every meter in Prometheus, in the order the data flows:

1. Adapters.  The candidates are the links in /dev/serial/by-id (udev's name for a USB
   serial adapter, ``usb-<ID_SERIAL>-ifNN-portN``: vendor, model, serial number), and
   /dev/ttyUSB* and /dev/ttyACM* that no such link names.  A board's own UARTs
   (ttyAMA*, ttyS*: a Raspberry Pi always has one) only when named with --port.  Not a
   byte goes to a port the person did not name unless it is the only candidate.  No
   candidate: one line, exit 1.  Several and no --port: asked on a terminal, else
   (--yes, a script) one line listing them, exit 1 (2 stays click's usage errors).
   Not root: one line, exit 1, before anything is looked at.
2. Meters.  M-Bus first: which of 2400, 9600 and 300 baud anything answers at
   (rates_in_use, about 8 s when nothing does), then at each such rate the secondary
   search (EN 13757-3's wildcard search), the primary scan of 0-250 only where the
   search finds nobody (a meter without the wildcard search) or cannot tell meters
   apart (a shared id).  Why the search first: for three meters it costs 81
   selections, 14.2 s at 9600 and 31.4 s at 2400 through the paced pty, where the
   primary scan costs 24.5 s and 55.8 s (README, Benchmarks, table 5), and it finds
   meters whose primary addresses collide, which the primary scan cannot read.  Then
   KMP (the optical eye, 1200 then 2400 baud) only when no M-Bus meter answered: an IR
   head is another adapter than an M-Bus master, and a person with a master (the wired
   case, many meters) should not wait for the eye's timeouts; an eye pays the ~8 s of
   silent M-Bus rates once.
3. What the meters say: each meter's own answer from the scan (no second read: the
   battery pays for each), as a person checks it against the display: serial number,
   energy in kWh (GJ for a meter counting joules), volume, temperatures, power.
4. Permanent: a udev rule giving the adapter /dev/ttymeterBus (10-usbports.rules'
   shape, the adapter's idVendor/idProduct/serial read from /sys; a board UART by its
   kernel name; a port with no device in /sys, a pty or a gateway, gets no rule and
   is configured as it was named), then /etc/default/kamstrup (or --config /
   $KAMSTRUP_CONFIG) gets KAMSTRUP_PORT, _ADDRESS, _BAUDRATE and _PROTOCOL.  Every line
   that does not set those names stays byte for byte; a line that sets one is
   rewritten in place, a commented default (``#KAMSTRUP_PORT=...``) is uncommented in
   place, a missing one appended.  Each file written atomically (the collector's
   write_atomic), the file before kept beside it as NAME.orig only when something
   changes; nothing changed, nothing written (mtime too).  A signal during the scans
   stops before anything is written; during the writes it waits for them to end.
5. Proof: only where systemd runs (/run/systemd/system): start kamstrup.service, read
   the written file's kamstrup_up lines, scrape node_exporter (localhost:9100) for
   node_textfile_scrape_error, ask when kamstrup.timer runs next.  Without systemd it
   says what it could not prove and exits 0 once the configuration is written.

Roots (/dev, /sys, /etc, /run) are ROOT-relative: tests set ``ROOT`` and ``geteuid``
(a test's own process, never through the environment, which is an interface).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import click

import kamstrup_kmp as kmp
import kamstrup_textfile as kt
from kamstrup_mbus import FAILING, Bus, Found, rates_in_use, scan_primary, scan_secondary
from kamstrup_port import BusError, PortError, _one_line

ROOT = "/"  # where /dev, /sys, /etc and /run are (a test's directory)
geteuid = os.geteuid  # who we are (a test says root, or not)
LINK = "ttymeterBus"  # the name kamstrup.service's DeviceAllow= allows
RULES = "etc/udev/rules.d/10-usbports.rules"
SETTINGS = "etc/default/kamstrup"
NAMES = ("KAMSTRUP_PORT", "KAMSTRUP_ADDRESS", "KAMSTRUP_BAUDRATE", "KAMSTRUP_PROTOCOL")


class SetupError(Exception):
    """One line for the person, and the exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def _at(*parts: str) -> str:
    return os.path.join(ROOT, *parts)


def _tell(text: str = "") -> None:
    click.echo(text)


# ---------------------------------------------------------------------------
# 1. Adapters
# ---------------------------------------------------------------------------

USB_SERIAL = re.compile(r"^tty(USB|ACM)\d+$")


class Adapter:
    """A port a meter could be on: the path to configure and open (the by-id link when
    there is one), the device node it is, and what a person recognises it by."""

    def __init__(self, path: str, device: str, name: str):
        self.path, self.device, self.name = path, device, name

    def __repr__(self) -> str:
        return f"Adapter({self.path!r}, {self.device!r}, {self.name!r})"


def _by_id_name(link: str) -> str:
    """usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0 -> FTDI FT232R USB UART A50285BI."""
    name = re.sub(r"-if\d+(-port\d+)?$", "", link)
    name = re.sub(r"^(usb|pci|platform)-", "", name)
    return name.replace("_", " ")


def find_adapters() -> list:
    """The USB serial adapters under ROOT/dev, by-id links first (sorted)."""
    dev = _at("dev")
    by_id = os.path.join(dev, "serial", "by-id")
    found, named = [], set()
    try:
        links = sorted(os.listdir(by_id))
    except OSError:
        links = []
    for link in links:
        path = os.path.join(by_id, link)
        device = os.path.realpath(path)
        if not os.path.exists(device):
            continue  # a link left behind
        usb = usb_attributes(device)
        name = _by_id_name(link)
        if usb and usb.get("serial") and usb["serial"] not in name:
            name += f" {usb['serial']}"
        found.append(Adapter(path, device, f"{name} ({os.path.basename(device)})"))
        named.add(device)
    try:
        nodes = sorted(n for n in os.listdir(dev) if USB_SERIAL.match(n))
    except OSError:
        nodes = []
    for node in nodes:
        device = os.path.join(dev, node)
        if os.path.realpath(device) not in named:
            usb = usb_attributes(device) or {}
            what = " ".join(usb[k] for k in ("manufacturer", "product", "serial") if usb.get(k))
            found.append(Adapter(device, device, f"{what or 'USB serial'} ({node})"))
    return found


def usb_attributes(device: str) -> dict | None:
    """idVendor, idProduct, serial (manufacturer, product) of the USB device a tty is on,
    from ROOT/sys; {} for a tty that is not on USB (a board UART); None for a node that
    is no tty udev knows (a pty, a missing /sys)."""
    tty = os.path.join(_at("sys"), "class", "tty", os.path.basename(device))
    if not os.path.isdir(tty):
        return None
    here = os.path.realpath(os.path.join(tty, "device"))
    top = os.path.realpath(_at("sys"))
    while here.startswith(top + os.sep):
        if os.path.isfile(os.path.join(here, "idVendor")):
            out = {}
            for name in ("idVendor", "idProduct", "serial", "manufacturer", "product"):
                try:
                    with open(os.path.join(here, name), encoding="utf-8", errors="replace") as f:
                        out[name] = f.read().strip()
                except OSError:
                    pass
            return out
        here = os.path.dirname(here)
    return {}


def choose_adapter(port: str | None, ask: bool) -> Adapter:
    """The adapter named with --port, else the only one, else the one the person picks."""
    if port is not None:
        if "://" in port:
            return Adapter(port, port, port)
        if not os.path.exists(port):
            raise SetupError(f"port {port} does not exist")
        device = os.path.realpath(port)
        return Adapter(port, device, f"{port} ({os.path.basename(device)})")
    adapters = find_adapters()
    if not adapters:
        raise SetupError("no USB serial adapter found (nothing in /dev/serial/by-id, no "
                         "/dev/ttyUSB* or /dev/ttyACM*): plug the M-Bus master or the "
                         "infrared head in, or name the port with --port")  # fmt: skip
    if len(adapters) == 1:
        return adapters[0]
    listed = "; ".join(f"{a.path}: {a.name}" for a in adapters)
    if not ask:
        raise SetupError(f"{len(adapters)} adapters, choose one with --port: {listed}")
    _tell("Adapters:")
    for i, adapter in enumerate(adapters, 1):
        _tell(f"  {i}. {adapter.name}  {adapter.path}")
    pick = click.prompt("Which one is the meters'", type=click.IntRange(1, len(adapters)))
    return adapters[pick - 1]


# ---------------------------------------------------------------------------
# 2. Meters
# ---------------------------------------------------------------------------

MBUS_RATES = kt.AUTO_RATES  # 2400, 9600, 300


class Meters:
    """What the scans found: Found (telegram, rate) each, and how each is addressed."""

    def __init__(self, protocol: str):
        self.protocol = protocol
        self.found: list = []
        self.addresses: list = []  # KAMSTRUP_ADDRESS's words, one per meter
        self.notes: list = []  # what is wrong (collisions, shared ids)
        self.kmp_rate = None

    @property
    def baudrate(self) -> str:
        if self.protocol == "kmp":
            return str(self.kmp_rate)
        used = sorted({f.baudrate for f in self.found})
        return str(used[0]) if len(used) == 1 else "auto"


def find_meters(url: str, *, baudrate, protocol, timeout, retries, log) -> Meters:
    """Every M-Bus meter at every rate, else the meter on the eye (see the docstring)."""
    meters = Meters("mbus")
    if protocol != "kmp":
        rates = list(MBUS_RATES) if baudrate in (None, "auto") else [baudrate]
        if url.startswith("socket://"):
            rates = rates[:1]  # a gateway talks to the meters at its own rate
        _find_mbus(url, rates, timeout or 0.0, retries, log, meters)
        if meters.found or protocol == "mbus":
            return meters
    meters = Meters("kmp")
    rates = list(kt.KMP_RATES) if baudrate in (None, "auto") else [baudrate]
    _tell(f"Asking the optical eye (KMP) at {' and '.join(map(str, rates))} baud ...")
    for rate in rates:  # two requests at each: the battery pays for each
        (reading,) = kt.read_kmp(url, baudrate=rate, timeout=timeout or kmp.ANSWER_TIMEOUT,
                                 retries=retries, log=log)  # fmt: skip
        if reading.error and "stopped by" in reading.error:
            signum = kt._STOPPING["signum"] or 2
            raise SetupError(f"{reading.error}; nothing written", 128 + signum)
        if reading.telegram is not None:
            meters.found.append(Found(reading.telegram, rate))
            meters.addresses.append(kt.KMP_ADDRESS)
            meters.kmp_rate = rate
            break
        if reading.port or "no answer" not in reading.error:
            if not reading.port:
                meters.notes.append(f"the optical eye at {rate} baud: {reading.error}")
            else:
                raise SetupError(reading.error)
            break
    return meters


def _find_mbus(url, rates, timeout, retries, log, meters: Meters) -> None:
    try:
        port = kt.open_port(url, rates[0])
    except BusError as exc:
        raise SetupError(str(exc)) from None
    secondary: set = set()  # id() of the Found the secondary search gave
    try:
        bus = Bus(port, baudrate=rates[0], timeout=timeout, retries=retries, log=log)
        if len(rates) > 1:
            _tell(f"Listening for M-Bus meters at {', '.join(map(str, rates))} baud ...")
            rates = rates_in_use(bus, rates)
            if not rates:
                _tell("No M-Bus meter answered.")
        for rate in rates:
            bus.set_baudrate(rate)
            here: list = []
            notes: list = []
            with kt._Progress("selections", None, f"{rate} baud") as progress:
                scan_secondary(bus, progress, notes.append, found=here)
            if here and not any(f in n for n in notes for f in FAILING):
                secondary.update(id(f) for f in here)
            else:  # nobody did the search, or it cannot tell them apart: by address
                by_address: dict = {}
                notes = []
                with kt._Progress("addresses", 251, f"{rate} baud") as progress:
                    scan_primary(bus, progress=progress, note=notes.append, found=by_address)
                here = [by_address[a] for a in sorted(by_address)]
            meters.found += here
            meters.notes += notes
    except PortError as exc:
        raise SetupError(f"{exc}; nothing written") from None
    except kt.Stopped as exc:
        raise SetupError(f"stopped by {exc.name}; nothing written", 128 + exc.signum) from None
    finally:
        kt._close(port)
    kept = kt._one_each(meters.found, meters.notes)
    ids = [f.telegram.id for f in kept]
    for f in kept:
        unique = f.telegram.id is not None and ids.count(f.telegram.id) == 1
        if id(f) in secondary and unique:
            meters.addresses.append(f.telegram.id)
        else:
            meters.addresses.append(str(f.telegram.address))
    meters.found = kept


# ---------------------------------------------------------------------------
# 3. What the meters say
# ---------------------------------------------------------------------------


def _current(telegram, quantity: str):
    for record in telegram.records:
        if record.current and record.quantity == quantity and record.value is not None:
            return record
    return None


def describe(found, address: str) -> str:
    """One line a person checks against the meter's display."""
    t = found.telegram
    parts = []
    energy = _current(t, "energy")
    if energy is not None:
        joules = bool(energy.vib) and (energy.vib[0] & 0x78) == 0x08  # J, not Wh
        if joules:
            parts.append(f"energy {float(energy.value) / 1e9:.3f} GJ")
        else:
            parts.append(f"energy {float(energy.value) / 3.6e6:g} kWh")
    volume = _current(t, "volume")
    if volume is not None:
        parts.append(f"volume {float(volume.value):g} m3")
    for quantity, said in (("flow_temperature", "flow"), ("return_temperature", "return")):
        record = _current(t, quantity)
        if record is not None:
            parts.append(f"{said} {float(record.value):g} °C")
    power = _current(t, "power")
    if power is not None:
        parts.append(f"power {float(power.value) / 1000:g} kW")
    where = "optical eye" if address == kt.KMP_ADDRESS else f"address {t.address}"
    rate = f", {found.baudrate} baud" if found.baudrate else ""
    return (f"meter {t.id or '-'} ({t.manufacturer or '?'}, {where}{rate}): "
            + (", ".join(parts) or "no readings"))  # fmt: skip


# ---------------------------------------------------------------------------
# 4. Making it permanent: the udev rule, the settings file
# ---------------------------------------------------------------------------

RULES_HEADER = """\
# 10-usbports.rules: a stable name, /dev/ttymeterBus, for the adapter that
# kamstrup_textfile reads the heat meters through (written by kamstrup-textfile
# --setup; see /usr/share/doc/kamstrup-textfile/examples/10-usbports.rules).
# Lines without ttymeterBus are yours and stay as they are.

"""


def udev_rule(adapter: Adapter) -> tuple:
    """(the rule line, "") or (None, why there is none)."""
    usb = usb_attributes(adapter.device)
    if usb is None:
        return None, (f"{adapter.device} is no device udev knows (no /sys/class/tty entry): "
                      "no udev rule, the port is configured as named")  # fmt: skip
    tail = f'SYMLINK+="{LINK}", GROUP="dialout", MODE="0660"'
    if not usb:  # a board's UART: by its kernel name, which is stable
        return f'SUBSYSTEM=="tty", KERNEL=="{os.path.basename(adapter.device)}", {tail}\n', ""
    product = usb.get("idProduct", "")
    match = f'ATTRS{{idVendor}}=="{usb["idVendor"]}", ATTRS{{idProduct}}=="{product}"'
    why = ""
    if usb.get("serial"):
        match += f', ATTRS{{serial}}=="{usb["serial"]}"'
    else:
        why = ("the adapter has no serial number: any adapter of this model "
               f"({usb['idVendor']}:{usb.get('idProduct', '')}) gets /dev/{LINK}")  # fmt: skip
    return f'SUBSYSTEM=="tty", {match}, {tail}\n', why


def edit_rules(text: str | None, rule: str) -> str:
    """The rules file with our line for ttymeterBus (the first such line replaced, others
    commented out), every other line as it was."""
    if text is None:
        return RULES_HEADER + rule
    lines = text.splitlines(keepends=True)
    out, placed = [], False
    for line in lines:
        if f'"{LINK}"' in line and not line.lstrip().startswith("#"):
            out.append("# " + line if placed else rule)
            placed = True
        else:
            out.append(line)
    if not placed:
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
        out.append(rule)
    return "".join(out)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMMENTED = re.compile(r"#(KAMSTRUP_[A-Z_]+)=[^\\\r\n]*(\r?\n)?$")


_PHYSICAL = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")


def physical_lines(text: str) -> list:
    """The file's lines, each with its end (LF, CR LF, or a lone CR: systemd's line
    ends; not the other characters str.splitlines() splits at)."""
    return _PHYSICAL.findall(text)


def logical_lines(text: str) -> list:
    """The file as systemd's EnvironmentFile= parser (read_settings) sees it: [(first
    physical line, number of physical lines, kind)], kind "comment", "blank", "key" (no
    name to set), "set NAME" or "open" (a quote or backslash open to the end of the
    file).  A quoted value or a backslash-newline runs on over the next lines."""
    physical = physical_lines(text)
    out = []
    i = 0
    while i < len(physical):
        start, state, kind, key = i, "pre_key", "blank", []
        while True:
            for c in physical[i]:
                if state == "pre_key":
                    if c in "#;":
                        state, kind = "comment", "comment"
                    elif c not in " \t\n\r":
                        state, kind, key = "key", "key", [c]
                elif state == "key":
                    if c in "\n\r":
                        state = "pre_key"
                    elif c == "=":
                        state = "pre_value"
                        name = "".join(key).rstrip(" \t")
                        kind = f"set {name}" if _NAME.fullmatch(name) else "key"
                    else:
                        key.append(c)
                elif state in ("pre_value", "value"):
                    if c in "\n\r":
                        state = "pre_key"
                    elif c == "\\":
                        state = "value_escape"
                    elif state == "pre_value" and c == "'":
                        state = "single"
                    elif state == "pre_value" and c == '"':
                        state = "double"
                    elif c not in " \t":
                        state = "value"
                elif state == "value_escape":
                    state = "value"
                elif state == "single":
                    if c == "'":
                        state = "pre_value"
                elif state == "double":
                    if c == '"':
                        state = "pre_value"
                    elif c == "\\":
                        state = "double_escape"
                elif state == "double_escape":
                    state = "double"
                elif state == "comment":  # ends at its line's end, as systemd 257 and
                    if c in "\n\r":  # read_settings read it (252 joined the next line)
                        state = "pre_key"
            i += 1
            if state == "pre_key" or i == len(physical):
                break
        ended = physical[i - 1].endswith(("\n", "\r"))  # a line end that was not escaped
        if state not in ("pre_key", "key", "pre_value", "value", "comment") or (
            state != "pre_key" and ended
        ):
            kind = "open"
        out.append((start, i - start, kind))
    return out


def quoted(value: str) -> str:
    """A value both systemd and a shell read alike."""
    if re.fullmatch(r"[A-Za-z0-9_./:@%+,=-]+", value):
        return value
    if "'" not in value and not re.search(r"[\r\n\\]", value):
        return f"'{value}'"
    return '"' + re.sub(r'(["\\`$])', r"\\\1", value) + '"'


def edit_settings(text: str, values: dict) -> str:
    """``text`` with NAME=value for each of ``values`` (None: commented out): lines that
    set a name rewritten in place, else its commented default uncommented in place, else
    appended.  Every other line stays byte for byte.  Raises ValueError for a file whose
    end leaves a quote or a backslash open (an appended line would be swallowed)."""
    physical = physical_lines(text)
    logical = logical_lines(text)
    if logical and logical[-1][2] == "open":
        raise ValueError(f"line {logical[-1][0] + 1} leaves a quote or a backslash open "
                         "to the end of the file")  # fmt: skip
    replace: dict = {}  # first physical line -> (count, new text)
    done = set()
    for first, count, kind in logical:
        name = kind[4:] if kind.startswith("set ") else None
        if name in values:
            ending = re.search(r"(\r\n|\r|\n)$", physical[first + count - 1])
            nl = ending.group(0) if ending else "\n"
            old = "".join(physical[first : first + count])
            if values[name] is None:
                new = "".join("#" + p for p in physical[first : first + count])
            elif _value_of(old) == {name: values[name]}:
                new = old  # the value already, as the person wrote it
            else:
                new = f"{name}={quoted(values[name])}{nl}"
            replace[first] = (count, new)
            done.add(name)
    for first, count, kind in logical:
        m = _COMMENTED.match(physical[first]) if kind == "comment" and count == 1 else None
        name = m.group(1) if m else None
        if name in values and name not in done and values[name] is not None:
            nl = m.group(2) or "\n"
            replace[first] = (1, f"{name}={quoted(values[name])}{nl}")
            done.add(name)
    out, i = [], 0
    while i < len(physical):
        if i in replace:
            count, new = replace[i]
            out.append(new)
            i += count
        else:
            out.append(physical[i])
            i += 1
    missing = [n for n in values if n not in done and values[n] is not None]
    if missing and out and not out[-1].endswith(("\n", "\r")):
        out.append("\n")
    if missing and out and re.search(r"^[ \t]*[#;].*\\\r?\n?$", out[-1]):
        out.append("\n")  # systemd 252 joins the line after a comment ending in \ to it
    out += [f"{n}={quoted(values[n])}\n" for n in missing]
    return "".join(out)


def _value_of(text: str) -> dict | None:
    """What read_settings reads from ``text`` (None: what systemd refuses)."""
    import tempfile

    with tempfile.NamedTemporaryFile("wb") as f:
        f.write(text.encode("utf-8", "surrogateescape"))
        f.flush()
        try:
            return kt.read_settings(f.name)
        except (kt.SettingsError, OSError):
            return None


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SetupError(f"cannot read {path}: {exc.strerror}") from None


def replace_file(path: str, old: str | None, new: str) -> bool:
    """Write ``new`` atomically if it differs, ``old`` kept as PATH.orig; whether written."""
    if old == new:
        return False
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if old is not None:
            kt.write_atomic(path + ".orig", old)
        kt.write_atomic(path, new)
    except (kt.OutputError, OSError) as exc:
        raise SetupError(str(exc)) from None
    return True


# ---------------------------------------------------------------------------
# 5. Proof
# ---------------------------------------------------------------------------


def _run(*cmd: str, timeout: float = 330.0) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def prove(output: str, addresses: list) -> int:
    """Start the service once, and say what that showed; 0 unless it showed a failure."""
    if not os.path.isdir(_at("run", "systemd", "system")):
        _tell("systemd does not run here: kamstrup.service was not started, so it is not "
              "proven that the meters are read, that node_exporter serves the file, or "
              "when the timer runs (the configuration is written).")  # fmt: skip
        return 0
    _tell("Starting kamstrup.service ...")
    _run("systemctl", "reset-failed", "kamstrup.service")
    started = _run("systemctl", "start", "kamstrup.service")
    status = 0
    ups = {}
    try:
        with open(output, encoding="utf-8") as f:
            for line in f:
                m = re.match(r'kamstrup_up\{address="([^"]*)"[^}]*\} (\S+)$', line)
                if m:
                    ups[m.group(1)] = m.group(2)
    except OSError as exc:
        _tell(f"kamstrup.service wrote no {output}: {exc.strerror}")
        status = 1
    if ups:
        failed = [a for a, v in ups.items() if v != "1"]
        if failed or started.returncode:
            _tell(f"kamstrup.service did not read address {', '.join(failed) or '?'} "
                  "(journalctl -u kamstrup.service says why)")  # fmt: skip
            status = 1
        else:
            _tell(f"kamstrup.service read every meter ({len(ups)}) into {output}.")
    _tell(_scrape(output))
    shown = _run("systemctl", "show", "-p", "NextElapseUSecRealtime", "--value", "kamstrup.timer")
    nxt = shown.stdout.strip()
    if nxt and nxt not in ("n/a", "0"):
        _tell(f"kamstrup.timer runs next at {nxt}.")
    else:
        _tell("kamstrup.timer is not scheduled: sudo systemctl enable --now kamstrup.timer")
    return status


def _scrape(output: str) -> str:
    import urllib.request

    url = "http://localhost:9100/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read(32 << 20).decode("utf-8", "replace")
    except Exception as exc:  # refused, a timeout, no such host: we cannot tell
        return f"node_exporter did not answer at {url} ({exc}): could not tell whether it serves the file."  # noqa: E501
    m = re.search(r"^node_textfile_scrape_error (\S+)$", text, re.M)
    served = f'file="{output}"' in text or f'file="{os.path.basename(output)}"' in text
    if m and m.group(1) == "0" and served:
        return "node_exporter serves the file (node_textfile_scrape_error 0)."
    if m and m.group(1) != "0":
        return "node_exporter reports node_textfile_scrape_error 1: a .prom file it cannot read"
    return "node_exporter answers, but does not list the file (is --collector.textfile.directory its directory?)"  # noqa: E501


# ---------------------------------------------------------------------------
# 6. The setup, step by step
# ---------------------------------------------------------------------------


def settings_path(config: str | None, environ) -> str:
    """The settings file the tool reads: --config, $KAMSTRUP_CONFIG, /etc/default/kamstrup."""
    path = config if config is not None else environ.get(kt.CONFIG_VARIABLE, "")
    return path.strip() or _at(SETTINGS)


def setup(*, port=None, baudrate=None, protocol=None, timeout=None, retries=2, config=None,
          output=kt.DEFAULT_OUTPUT, yes=False, log=None, environ=os.environ) -> int:  # fmt: skip
    """The whole first hour; the exit status."""
    try:
        return _setup(port, baudrate, protocol, timeout, retries, config, output, yes, log,
                      environ)  # fmt: skip
    except SetupError as exc:
        kt._fail(exc.args[0])
        return exc.status
    except kt.Stopped as exc:
        kt._fail(f"stopped by {exc.name}; nothing written")
        return 128 + exc.signum


def _setup(port, baudrate, protocol, timeout, retries, config, output, yes, log, environ):
    if geteuid() != 0:
        raise SetupError("--setup writes /etc/udev/rules.d and /etc/default/kamstrup: run it "
                         "as root (sudo kamstrup-textfile --setup)")  # fmt: skip
    ask = not yes and sys.stdin is not None and sys.stdin.isatty()
    kt._STOPPING.update(signum=None, raise_=True)
    adapter = choose_adapter(port, ask)
    _tell(f"Adapter: {adapter.name}")
    meters = find_meters(adapter.path, baudrate=baudrate, protocol=protocol, timeout=timeout,
                         retries=retries, log=log)  # fmt: skip
    for text in meters.notes:
        kt._fail(text)
    if not meters.found:
        rates = ", ".join(map(str, MBUS_RATES))
        raise SetupError(f"no meter answered on {adapter.path} (M-Bus at {rates} baud, the "
                         "optical eye at 1200 and 2400): check the wires, the head on the "
                         "eye; nothing written")  # fmt: skip
    for found, address in zip(meters.found, meters.addresses):
        _tell(describe(found, address))
    if any(f in n for n in meters.notes for f in FAILING):
        raise SetupError("the meters above cannot all be read as they are (see above): "
                         "nothing written; fix that and run --setup again")  # fmt: skip

    rule, why = udev_rule(adapter)
    path = f"/dev/{LINK}" if rule else adapter.path
    values = {
        "KAMSTRUP_PORT": path,
        "KAMSTRUP_ADDRESS": " ".join(meters.addresses) if meters.protocol == "mbus" else None,
        "KAMSTRUP_BAUDRATE": meters.baudrate,
        "KAMSTRUP_PROTOCOL": meters.protocol,
    }
    settings = settings_path(config, environ)
    rules_path = _at(RULES)
    old_settings = _read(settings)
    if old_settings is not None:
        previous = _previous_addresses(old_settings)
        if (
            previous is not None
            and values["KAMSTRUP_ADDRESS"] is not None
            and (sorted(previous.split()) == sorted(values["KAMSTRUP_ADDRESS"].split()))
        ):
            values["KAMSTRUP_ADDRESS"] = previous  # the same meters in the person's order
    try:
        new_settings = edit_settings(old_settings or "", values)
    except ValueError as exc:
        raise SetupError(f"cannot edit {settings}: {exc}") from None
    old_rules = _read(rules_path) if rule else None
    new_rules = edit_rules(old_rules, rule) if rule else None
    if why:
        _tell(f"Note: {why}")
    if ask and not click.confirm(f"Write {settings}" + (f" and {rules_path}" if rule else "")
                                 + "?", default=True):  # fmt: skip
        raise SetupError("nothing written")
    kt._STOPPING["raise_"] = False  # from here a signal waits for the files to be whole
    wrote = []
    if rule and replace_file(rules_path, old_rules, new_rules):
        wrote.append(rules_path)
    if replace_file(settings, old_settings, new_settings):
        wrote.append(settings)
    if kt._STOPPING["signum"] is not None:
        kt._fail(f"stopped by {kt.Stopped(kt._STOPPING['signum']).name}: "
                 f"{', '.join(wrote) or 'nothing'} written whole")  # fmt: skip
        return 128 + kt._STOPPING["signum"]
    before = {rules_path: old_rules, settings: old_settings}
    for name in wrote:
        _tell(f"Wrote {name} (the one before: {name}.orig)" if before[name] is not None
              else f"Wrote {name}")  # fmt: skip
    if not wrote:
        _tell("The configuration is already this: nothing changed.")
    if rule and rules_path in wrote:
        _trigger_udev()
    return prove(output, meters.addresses)


def _previous_addresses(text: str) -> str | None:
    return (_value_of(text) or {}).get("KAMSTRUP_ADDRESS")


def _trigger_udev() -> None:
    """Let udev make the link now, where udev runs on this root."""
    if ROOT != "/" or not os.path.exists("/run/udev/control"):
        _tell(f"udev does not run here: /dev/{LINK} appears when the adapter is plugged "
              "in again or at the next boot")  # fmt: skip
        return
    try:
        _run("udevadm", "control", "--reload", timeout=30)
        _run("udevadm", "trigger", "--action=add", "--subsystem-match=tty", timeout=30)
        _run("udevadm", "settle", "--timeout=10", timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        _tell(f"udevadm failed ({_one_line(str(exc))}): /dev/{LINK} appears at the next boot")
