"""--setup, the first hour (issue 18): adapters, meters, the udev rule, the settings file
and the proof, in-process with a machine of its own (ROOT: /dev, /sys, /etc, /run in a
temporary directory), simulated meters behind open_port in simulated time; and once
through a real pty with kamstrup_sim."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tools import ROOT as TOP
from tools import SimTime, invoke

import kamstrup_kmp as kmp
import kamstrup_mbus as mbus
import kamstrup_port as kport
import kamstrup_setup as ks
import kamstrup_sim as sim
import kamstrup_textfile as kt

FTDI = "usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0"


def plug(root, node="ttyUSB0", link=FTDI, serial="A50285BI", usb=True):
    """A serial device in the fake /dev (and its /sys entry, on USB or a board's)."""
    dev = root / "dev"
    (dev / "serial" / "by-id").mkdir(parents=True, exist_ok=True)
    (dev / node).write_text("")
    if link:
        os.symlink(f"../../{node}", dev / "serial" / "by-id" / link)
    if usb:
        parent = root / "sys" / "devices" / "usb1" / f"1-{node[-1]}"
        where = parent / f"1-{node[-1]}:1.0" / node
        where.mkdir(parents=True)
        for name, value in (("idVendor", "0403"), ("idProduct", "6001"),
                            ("manufacturer", "FTDI"), ("product", "FT232R USB UART")):  # fmt: skip
            (parent / name).write_text(value + "\n")
        if serial:
            (parent / "serial").write_text(serial + "\n")
    else:
        where = root / "sys" / "devices" / "platform" / "serial0" / node
        where.mkdir(parents=True)
    tty = root / "sys" / "class" / "tty" / node
    tty.mkdir(parents=True)
    os.symlink(os.path.relpath(where, tty), tty / "device")


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A root of our own, root's uid, meters on a bus behind kt.open_port (simulated
    time); returns (root, meters list, kmp list: put a SimulatedKmpMeter in to hold a
    head on an eye, opened ports)."""
    root = tmp_path / "root"
    (root / "etc" / "default").mkdir(parents=True)
    monkeypatch.setattr(ks, "ROOT", str(root))
    monkeypatch.setattr(ks, "geteuid", lambda: 0)
    clock = sim.SimClock()
    monkeypatch.setattr(kt, "time", SimTime(clock))
    monkeypatch.setattr(mbus, "time", SimTime(clock))
    meters: list = []
    eye: list = []
    opened: list = []

    def open_port(url, baudrate, wait=10.0, line=kport.MBUS_LINE, adapter=None):
        opened.append(url)
        line_bus = eye[0] if line == kport.KMP_LINE and eye else sim.SimulatedBus(meters)
        return sim.FakePort(line_bus, timeout=mbus.READ_SLICE, clock=clock, baudrate=baudrate)

    monkeypatch.setattr(kt, "open_port", open_port)
    return root, meters, eye, opened


def setup(*args):
    return invoke(["--setup", "--yes", *args])


def settings_of(root):
    return kt.read_settings(str(root / "etc" / "default" / "kamstrup"))


RULE = (
    'SUBSYSTEM=="tty", ATTRS{idVendor}=="0403", ATTRS{idProduct}=="6001", '
    'ATTRS{serial}=="A50285BI", SYMLINK+="ttymeterBus", GROUP="dialout", MODE="0660"\n'
)


def test_not_root_is_one_line_before_anything(machine, monkeypatch):
    root, meters, _, opened = machine
    plug(root)
    meters.append(sim.Meter(address=48))
    monkeypatch.setattr(ks, "geteuid", lambda: 1000)
    result = setup()
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert "run it as root (sudo kamstrup-textfile --setup)" in line
    assert opened == [] and not (root / "etc" / "default" / "kamstrup").exists()


def test_no_adapter_is_one_line_and_nothing_written(machine):
    root, meters, _, opened = machine
    result = setup()
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert "no USB serial adapter found" in line
    assert opened == [] and os.listdir(root / "etc" / "default") == []


def test_several_adapters_with_yes_list_them_and_touch_none(machine):
    root, meters, _, opened = machine
    plug(root)
    plug(root, "ttyACM1", link=None)
    result = setup()
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert "2 adapters, choose one with --port:" in line
    assert f"{root}/dev/serial/by-id/{FTDI}: FTDI FT232R USB UART A50285BI (ttyUSB0)" in line
    assert f"{root}/dev/ttyACM1: FTDI FT232R USB UART A50285BI (ttyACM1)" in line
    assert opened == []


def test_a_board_uart_is_no_candidate_but_can_be_chosen(machine):
    root, meters, _, opened = machine
    plug(root, "ttyAMA0", link=None, usb=False)
    assert ks.find_adapters() == []  # not without --port
    meters.append(sim.Meter(address=48, baudrate=2400))
    result = setup("--port", str(root / "dev" / "ttyAMA0"))
    assert result.exit_code == 0, result.stderr
    assert opened and set(opened) == {str(root / "dev" / "ttyAMA0")}
    rules = (root / "etc" / "udev" / "rules.d" / "10-usbports.rules").read_text()
    assert rules.endswith('SUBSYSTEM=="tty", KERNEL=="ttyAMA0", SYMLINK+="ttymeterBus", '
                          'GROUP="dialout", MODE="0660"\n')  # fmt: skip
    assert settings_of(root)["KAMSTRUP_PORT"] == "/dev/ttymeterBus"


def test_the_only_adapter_three_meters_at_9600_one_pair_sharing_an_address(machine):
    root, meters, _, opened = machine
    plug(root)
    meters += [sim.Meter(address=0, ident=i, baudrate=9600)
               for i in ("82937133", "82937134", "71234567")]  # fmt: skip
    default = (TOP / "kamstrup.default").read_text()
    (root / "etc" / "default" / "kamstrup").write_text(default)
    result = setup()
    assert result.exit_code == 0, result.stderr
    assert set(opened) == {f"{root}/dev/serial/by-id/{FTDI}"}
    out = result.stdout
    assert "Adapter: FTDI FT232R USB UART A50285BI (ttyUSB0)" in out
    assert ("meter 71234567 (KAM, address 0, 9600 baud): energy 154 kWh, volume 39.49 m3, "
            "flow 29.3 °C, return 28.2 °C, power 1.4 kW") in out.splitlines()  # fmt: skip
    written = settings_of(root)
    assert written["KAMSTRUP_PORT"] == "/dev/ttymeterBus"
    assert written["KAMSTRUP_ADDRESS"] == "71234567 82937133 82937134"
    assert written["KAMSTRUP_BAUDRATE"] == "9600"
    assert written["KAMSTRUP_PROTOCOL"] == "mbus"
    new = (root / "etc" / "default" / "kamstrup").read_text()
    assert (root / "etc" / "default" / "kamstrup.orig").read_text() == default
    # the commented defaults were uncommented in place; every other line is as it was
    assert [x for x in new.splitlines() if not x.startswith("KAMSTRUP_")] == [
        x for x in default.splitlines() if not x.startswith(tuple("#" + n for n in ks.NAMES))
    ]
    rules = (root / "etc" / "udev" / "rules.d" / "10-usbports.rules").read_text()
    assert rules.endswith(RULE) and rules.startswith("# 10-usbports.rules")
    assert "systemd does not run here" in out


def test_a_second_run_changes_nothing_and_an_added_meter_is_added(machine):
    root, meters, _, _ = machine
    plug(root)
    meters.append(sim.Meter(address=48, ident="30303030"))
    assert setup().exit_code == 0
    path = root / "etc" / "default" / "kamstrup"
    rules = root / "etc" / "udev" / "rules.d" / "10-usbports.rules"
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (path, rules)}
    os.utime(path, ns=(1, 1))
    os.utime(rules, ns=(1, 1))
    result = setup()
    assert result.exit_code == 0
    assert "nothing changed" in result.stdout
    for p in (path, rules):
        assert p.read_bytes() == before[p][0] and p.stat().st_mtime_ns == 1
    assert not (root / "etc" / "default" / "kamstrup.orig").exists()
    meters.append(sim.Meter(address=133, ident="67434187", kind="403"))
    assert setup().exit_code == 0
    assert settings_of(root)["KAMSTRUP_ADDRESS"] == "30303030 67434187"
    assert kt.read_settings(str(path) + ".orig")["KAMSTRUP_ADDRESS"] == "30303030"


def test_the_persons_order_of_the_same_meters_is_kept(machine):
    root, meters, _, _ = machine
    plug(root)
    meters += [sim.Meter(address=48, ident="30303030"), sim.Meter(address=133, ident="67434187")]
    path = root / "etc" / "default" / "kamstrup"
    path.write_text('# mine\nKAMSTRUP_ADDRESS="67434187 30303030"\nKAMSTRUP_BAUDRATE=2400\n'
                    "KAMSTRUP_PORT=/dev/ttymeterBus\nKAMSTRUP_PROTOCOL=mbus\n")  # fmt: skip
    before = path.read_bytes()
    assert setup().exit_code == 0
    assert path.read_bytes() == before


def test_a_signal_mid_setup_leaves_the_old_files(machine, monkeypatch):
    root, meters, _, _ = machine
    plug(root)
    meters.append(sim.Meter(address=48))
    path = root / "etc" / "default" / "kamstrup"
    path.write_text("# mine\nKAMSTRUP_ADDRESS=5\n")
    real = mbus.scan_secondary

    def interrupted(bus, *args, **kw):
        kt._stop(signal.SIGTERM, None)  # as the handler does when the signal comes
        return real(bus, *args, **kw)

    monkeypatch.setattr(ks, "scan_secondary", interrupted)
    result = setup()
    assert result.exit_code == 128 + signal.SIGTERM
    assert result.stderr.splitlines()[-1].endswith("stopped by SIGTERM; nothing written")
    assert path.read_text() == "# mine\nKAMSTRUP_ADDRESS=5\n"
    assert sorted(os.listdir(root / "etc" / "default")) == ["kamstrup"]
    assert not (root / "etc" / "udev").exists()


def test_a_signal_while_writing_waits_for_whole_files(machine, monkeypatch):
    root, meters, _, _ = machine
    plug(root)
    meters.append(sim.Meter(address=48))
    real = kt.write_atomic
    calls: list = []

    def write(path, text):
        if not calls:
            kt._stop(signal.SIGHUP, None)  # comes during the first write
        calls.append(path)
        real(path, text)

    monkeypatch.setattr(kt, "write_atomic", write)
    result = setup()
    assert result.exit_code == 128 + signal.SIGHUP
    assert settings_of(root)["KAMSTRUP_ADDRESS"] == "30303030"  # whole, both files
    assert (root / "etc" / "udev" / "rules.d" / "10-usbports.rules").read_text().endswith(RULE)


def test_no_meter_is_one_line_nothing_written_after_the_eye_was_asked(machine):
    root, meters, eye, opened = machine
    plug(root)
    result = setup()
    assert result.exit_code == 1
    assert "no meter answered on" in result.stderr.splitlines()[-1]
    assert "Asking the optical eye (KMP) at 1200 and 2400 baud" in result.stdout
    assert os.listdir(root / "etc" / "default") == []


def test_a_head_on_the_eye_is_found_after_the_silent_mbus_rates(machine):
    root, meters, eye, _ = machine
    plug(root)
    eye.append(kmp.SimulatedKmpMeter())
    path = root / "etc" / "default" / "kamstrup"
    path.write_text("KAMSTRUP_ADDRESS=48\n")
    result = setup()
    assert result.exit_code == 0, result.stderr
    assert "meter 12345678" in result.stdout or "optical eye" in result.stdout
    text = path.read_text()
    assert text.startswith("#KAMSTRUP_ADDRESS=48\n")  # does not apply to KMP: commented out
    written = settings_of(root)
    assert written["KAMSTRUP_PROTOCOL"] == "kmp" and written["KAMSTRUP_BAUDRATE"] == "1200"
    assert "KAMSTRUP_ADDRESS" not in written


def test_an_adapter_without_serial_number_is_said(machine):
    root, meters, _, _ = machine
    plug(root, link="usb-1a86_USB_Serial-if00-port0", serial=None)
    meters.append(sim.Meter(address=48))
    result = setup()
    assert result.exit_code == 0, result.stderr
    assert "the adapter has no serial number: any adapter of this model (0403:6001)" in (
        result.stdout
    )


def test_a_port_udev_does_not_know_is_configured_as_named(machine):
    root, meters, _, _ = machine
    meters.append(sim.Meter(address=48))
    node = root / "dev" / "pts5"
    node.parent.mkdir(parents=True, exist_ok=True)
    node.write_text("")
    result = setup("--port", str(node))
    assert result.exit_code == 0, result.stderr
    assert settings_of(root)["KAMSTRUP_PORT"] == str(node)
    assert not (root / "etc" / "udev").exists()
    assert "no udev rule" in result.stdout


def test_a_first_settings_file_names_no_orig_that_is_not_there(machine):
    """No /etc/default/kamstrup before (pip install, no package): the line said 'Wrote
    .../kamstrup (the one before: .../kamstrup.orig)', a file that does not exist."""
    root, meters, _, _ = machine
    plug(root)
    meters.append(sim.Meter(address=48))
    result = setup()
    assert result.exit_code == 0, result.stderr
    settings = root / "etc" / "default" / "kamstrup"
    assert settings.exists() and not (root / "etc" / "default" / "kamstrup.orig").exists()
    assert f"Wrote {settings}" in result.stdout.splitlines()
    assert ".orig" not in result.stdout


# -- the settings file: every line not setting our names survives -------------

LINE = st.one_of(
    st.just(""),
    st.just("   "),
    st.text(
        st.characters(blacklist_characters="\r\n\0", blacklist_categories=("Cs",)), max_size=20
    ).map(lambda t: "#" + t),  # fmt: skip
    st.sampled_from(ks.NAMES + ("KAMSTRUP_OUTPUT", "KAMSTRUP_LABEL", "OTHER")).flatmap(
        lambda name: st.tuples(
            st.sampled_from(["", " ", "#"]),
            st.just(name),
            st.sampled_from(["=", " = ", "="]),
            st.text(st.sampled_from("ab 1/'\"\\#="), max_size=12),
        ).map("".join)
    ),
)
VALUES = st.fixed_dictionaries({
    "KAMSTRUP_PORT": st.sampled_from(["/dev/ttymeterBus", "/dev/serial/by-id/usb-a b'c"]),
    "KAMSTRUP_ADDRESS": st.sampled_from(["48", "133 48", "71234567 82937133"]),
    "KAMSTRUP_BAUDRATE": st.sampled_from(["2400", "auto"]),
    "KAMSTRUP_PROTOCOL": st.sampled_from(["mbus", "kmp"]),
})  # fmt: skip


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(lines=st.lists(LINE, max_size=12), ends=st.sampled_from(["\n", "\r\n"]),
       last=st.booleans(), values=VALUES)  # fmt: skip
def test_editing_keeps_every_other_line_and_reads_back(tmp_path, lines, ends, last, values):
    text = ends.join(lines) + (ends if last and lines else "")
    try:
        new = ks.edit_settings(text, values)
    except ValueError:  # only a file whose end leaves a quote or a backslash open
        assert ks.logical_lines(text)[-1][2] == "open"
        return
    old_path, new_path = tmp_path / "old", tmp_path / "new"
    old_path.write_bytes(text.encode("utf-8", "surrogateescape"))
    new_path.write_bytes(new.encode("utf-8", "surrogateescape"))
    before, after = kt.read_settings(str(old_path)), kt.read_settings(str(new_path))
    assert {n: after.get(n) for n in values} == values
    assert {n: v for n, v in after.items() if n not in values} == {
        n: v for n, v in before.items() if n not in values
    }
    # every logical line that sets none of our names is in the new file, byte for byte
    physical = ks.physical_lines(text)
    ours = {f"set {n}" for n in values}
    kept = [
        "".join(physical[first : first + count])
        for first, count, kind in ks.logical_lines(text)
        if kind not in ours and not (kind == "comment" and ks._COMMENTED.match(physical[first]))
    ]
    rest = new
    for chunk in kept:  # in order
        at = rest.find(chunk)
        assert at >= 0, (chunk, new)
        rest = rest[at + len(chunk) :]
    assert ks.edit_settings(new, values) == new  # a second run changes nothing


def test_editing_a_file_that_leaves_a_quote_open_is_refused(machine):
    root, meters, _, _ = machine
    plug(root)
    meters.append(sim.Meter(address=48))
    path = root / "etc" / "default" / "kamstrup"
    path.write_text("KAMSTRUP_LABEL='a=b\n")
    result = setup()
    assert result.exit_code == 1
    assert "leaves a quote or a backslash open" in result.stderr.splitlines()[-1]
    assert path.read_text() == "KAMSTRUP_LABEL='a=b\n"


# -- through a real pty ----------------------------------------------------------

DRIVER = textwrap.dedent("""\
    import sys, time
    import kamstrup_setup, kamstrup_textfile
    kamstrup_setup.ROOT = sys.argv[1]
    kamstrup_setup.geteuid = lambda: 0
    sys.argv = ["kamstrup-textfile", *sys.argv[2:]]
    kamstrup_textfile.main()
""")


@pytest.mark.slow
def test_three_meters_at_9600_through_a_pty(tmp_path):
    root = tmp_path / "root"
    (root / "etc" / "default").mkdir(parents=True)
    meters = [sim.Meter(address=a, ident=i, baudrate=9600)
              for a, i in ((48, "30303030"), (133, "67434187"), (74, "71234567"))]  # fmt: skip
    line = sim.PtyLine(sim.SimulatedBus(meters), pace=True)
    try:
        result = subprocess.run(
            [sys.executable, "-c", DRIVER, str(root), "--setup", "--yes", "--port", line.path],
            capture_output=True, text=True, timeout=300, cwd=TOP,
            env={**os.environ, "KAMSTRUP_CONFIG": ""},
        )  # fmt: skip
    finally:
        line.close()
    assert result.returncode == 0, result.stderr
    written = kt.read_settings(str(root / "etc" / "default" / "kamstrup"))
    assert written == {"KAMSTRUP_PORT": line.path, "KAMSTRUP_ADDRESS": "30303030 67434187 71234567",
                       "KAMSTRUP_BAUDRATE": "9600", "KAMSTRUP_PROTOCOL": "mbus"}  # fmt: skip
    assert "systemd does not run here" in result.stdout


def test_a_line_appended_after_a_comment_ending_in_a_backslash_survives_both_systemds(tmp_path):
    """systemd 252 (Debian 12) joins the line after such a comment to it, 257 does not:
    a blank line between keeps the appended setting for both."""
    import kamstrup_textfile as kt

    edited = ks.edit_settings("# the cellar \\\n", {"KAMSTRUP_PORT": "/dev/ttymeterBus"})
    assert edited == "# the cellar \\\n\nKAMSTRUP_PORT=/dev/ttymeterBus\n"
    path = tmp_path / "kamstrup"
    path.write_text(edited)
    assert kt.read_settings(str(path)) == {"KAMSTRUP_PORT": "/dev/ttymeterBus"}
