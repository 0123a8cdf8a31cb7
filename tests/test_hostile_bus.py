"""The bus and the output against a hostile world (issue 16, items 7, 8 and 16).

- ``--baudrate auto`` goes back to the rate the bus last answered at after a silent meter;
- two runs on one network gateway take turns, as two runs on one serial port do;
- a temporary left by a dead run goes whatever its pid now belongs to;
- the holder of a busy port is named by its command line, never as ourselves.

Each through the real path (a pty, a TCP gateway, separate processes) and in-process.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kamstrup_mbus as mbus
import kamstrup_port as kport
import kamstrup_sim as sim
import kamstrup_textfile as kt

ROOT = Path(__file__).resolve().parent.parent
TOOL = str(ROOT / "kamstrup_textfile.py")


def up(text: str, address: int):
    """The value of kamstrup_up for ``address`` in an exposition, or None."""
    found = re.search(rf'^kamstrup_up\{{address="{address}"[^}}]*\}} (\S+)$', text, re.M)
    return found and found.group(1)


def record_rates(bus: sim.SimulatedBus) -> list:
    """(rate the master sent at, bytes) of everything fed to ``bus`` from now on."""
    heard: list = []
    feed = bus.feed

    def recording(data, rate=None):
        heard.append((rate, bytes(data)))
        return feed(data, rate)

    bus.feed = recording
    return heard


def first_rate_asked(heard: list, address: int):
    """The rate of the first request to ``address`` (a short frame 10 C A CS 16)."""
    for rate, data in heard:
        if data[:1] == b"\x10" and data[2] == address:
            return rate
    return None


# --- 7. --baudrate auto after a silent meter --------------------------------------------


@pytest.mark.parametrize(
    "rate, addresses, asked",
    [
        (2400, [48, 50, 74], 2400),  # the rate the meter before answered at
        (9600, [48, 50, 74], 9600),
        (2400, [50, 74], 2400),  # nothing answered yet: the first auto rate
        (300, [48, 50, 74], 300),
    ],
)
def test_auto_asks_the_meter_after_a_silent_one_at_the_rate_that_last_answered(
    monkeypatch, rate, addresses, asked
):
    meters = [
        sim.Meter(address=48, baudrate=rate),
        sim.Meter(address=74, ident="77447744", kind="403", baudrate=rate),
    ]
    bus = sim.SimulatedBus(meters)
    heard = record_rates(bus)

    def open_port(url, baudrate, wait=10.0):
        return sim.FakePort(bus, timeout=0.001, baudrate=baudrate)

    monkeypatch.setattr(kt, "open_port", open_port)
    readings = kt.read_meters("sim", addresses, baudrate="auto", timeout=0.05, retries=0, log=None)
    assert [(r.address, r.error is None) for r in readings] == [(a, a != 50) for a in addresses]
    assert first_rate_asked(heard, 50) == (2400 if addresses[0] == 50 else asked)
    assert first_rate_asked(heard, 74) == asked


@pytest.mark.slow
def test_auto_after_a_silent_meter_through_a_pty(tmp_path):
    meters = [
        sim.Meter(address=48, baudrate=2400),
        sim.Meter(address=74, ident="77447744", kind="403", baudrate=2400),
    ]
    bus = sim.SimulatedBus(meters)
    heard = record_rates(bus)
    line = sim.PtyLine(bus, pace=True)
    out = tmp_path / "kamstrup.prom"
    try:
        result = subprocess.run(
            [sys.executable, TOOL, "--once", "--port", line.path, "--baudrate", "auto",
             "--address", "48", "--address", "50", "--address", "74", "--timeout", "0.3",
             "--retries", "0", "--output", str(out)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        line.close()
    assert result.returncode == 1, result.stderr
    text = out.read_text()
    assert (up(text, 48), up(text, 50), up(text, 74)) == ("1", "0", "1")
    assert [rate for rate, data in heard if data[2:3] == b"\x32"] == [2400, 9600, 300]
    assert first_rate_asked(heard, 74) == 2400
    assert {rate for rate, data in heard if data[2:3] == b"\x4a"} == {2400}


# --- 8. two runs on one network gateway -------------------------------------------------


def recv_until(conn: socket.socket, n: int) -> bytes:
    conn.settimeout(5)  # a guard against a hang, not a measurement
    data = b""
    while len(data) < n:
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_simulated_gateway_serves_several_clients_at_once():
    """A transparent serial-to-TCP gateway: every client's bytes go onto the one bus, and
    the bus's bytes go to every client connected (it cannot know who asked)."""
    bus = sim.SimulatedBus([sim.Meter(address=48)])
    line = sim.TcpLine(bus, pace=False)
    try:
        a = socket.create_connection((line.host, line.port))
        b = socket.create_connection((line.host, line.port))
        with a, b:
            time.sleep(0.2)  # both accepted before the first byte (the gateway's own pace)
            a.sendall(mbus.snd_nke(48))
            assert recv_until(a, 1) == b"\xe5"
            assert recv_until(b, 1) == b"\xe5"
            b.sendall(mbus.req_ud2(48, True))
            frame = sim.rewrite(bytes.fromhex(sim.FRAMES["303"]), 48, "30303030")
            assert recv_until(b, len(frame)) == frame
            assert recv_until(a, len(frame)) == frame
    finally:
        line.close()
    assert [f[:3] for f in bus.log] == [b"\x10\x40\x30", b"\x10\x7b\x30"]


def test_simulated_gateway_pulled_mid_answer_drops_every_client():
    bus = sim.SimulatedBus([sim.Meter(address=48, disconnect_at=20)])
    line = sim.TcpLine(bus, pace=False)
    try:
        a = socket.create_connection((line.host, line.port))
        b = socket.create_connection((line.host, line.port))
        with a, b:
            time.sleep(0.2)
            a.sendall(mbus.req_ud2(48, True))
            assert len(recv_until(a, 1000)) == 20
            assert len(recv_until(b, 1000)) == 20
    finally:
        line.close()


@pytest.mark.parametrize(
    "one, other, same",
    [
        ("socket://gw.example:10001", "rfc2217://GW.Example:10001", True),
        ("socket://gw.example.:10001", "socket://gw.example:10001", True),
        ("socket://192.0.2.10:10001?logging=debug", "socket://192.0.2.10:10001", True),
        ("socket://[::1]:10001", "socket://[0:0::1]:10001", True),
        ("socket://[::ffff:192.0.2.10]:10001", "socket://192.0.2.10:10001", True),
        ("socket://192.0.2.10:10001", "socket://192.0.2.10:10002", False),
        ("socket://192.0.2.10:10001", "socket://192.0.2.11:10001", False),
        ("socket://gw-a.example:10001", "socket://gw-b.example:10001", False),
    ],
)
def test_gateway_lock_key(one, other, same):
    """One lock for one gateway port, whichever protocol reaches it (socket:// and
    rfc2217:// on one host and port are one serial line behind one TCP port)."""
    assert kport.gateway_lock_name(one) is not None
    assert (kport.gateway_lock_name(one) == kport.gateway_lock_name(other)) == same


@pytest.mark.parametrize("url", ["/dev/ttyUSB0", "loop://", "COM3", "socket://gw:x"])
def test_no_gateway_lock_for_what_is_no_gateway(url):
    assert kport.gateway_lock_name(url) is None


def test_gateway_lock_name_fits_an_abstract_socket_whatever_the_host():
    name = kport.gateway_lock_name(f"socket://{'a' * 63}.{'b' * 63}.{'c' * 63}.example:65535")
    assert name.startswith("\0") and len(name.encode()) <= 107
    assert name != kport.gateway_lock_name(f"socket://{'a' * 63}.{'b' * 63}.{'d' * 63}.x:1")


def test_a_busy_gateway_is_waited_for_then_one_line_names_it():
    bus = sim.SimulatedBus([sim.Meter(address=48)])
    line = sim.TcpLine(bus, pace=False)
    try:
        first = kt.open_port(line.url, 2400, wait=0)
        try:
            with pytest.raises(kt.BusError) as caught:
                kt.open_port(line.url.replace("socket", "rfc2217"), 2400, wait=0.5)
        finally:
            kt._close(first)
        message = str(caught.value)
        assert "\n" not in message
        assert f"127.0.0.1:{line.port}" in message and "busy" in message
        again = kt.open_port(line.url, 2400, wait=0)  # closing the port let the lock go
        kt._close(again)
    finally:
        line.close()


@pytest.mark.slow
def test_two_runs_on_one_gateway_at_once_both_read_every_meter(tmp_path):
    meters = [
        sim.Meter(address=48),
        sim.Meter(address=74, ident="77447744", kind="403"),
        sim.Meter(address=133, ident="82937133", kind="303-heat"),
    ]
    line = sim.TcpLine(sim.SimulatedBus(meters), pace=True)
    outs = [tmp_path / "one" / "kamstrup.prom", tmp_path / "two" / "kamstrup.prom"]
    for out in outs:  # two directories: each run's file alone in its own
        out.parent.mkdir()
    try:
        runs = [
            subprocess.Popen(
                [
                    sys.executable,
                    TOOL,
                    "--once",
                    "--port",
                    line.url,
                    "--address",
                    "48",
                    "--address",
                    "74",
                    "--address",
                    "133",
                    "--output",
                    str(out),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for out in outs
        ]
        results = [(run.wait(timeout=120), run.communicate()[1]) for run in runs]
    finally:
        line.close()
    for (status, stderr), out in zip(results, outs):
        text = out.read_text()
        assert (up(text, 48), up(text, 74), up(text, 133)) == ("1", "1", "1"), stderr
        assert status == 0 and stderr == ""


# --- 16 (a). temporaries of dead runs ---------------------------------------------------


def hold(path: Path) -> subprocess.Popen:
    """A live writer: a process that created ``path`` and holds its flock until killed."""
    code = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdout.readline() == "ready\n"
    return child


def test_leftovers_named_with_a_live_pid_are_removed(tmp_path):
    """A killed run's pid is soon another process's (or ours): the name tells nothing."""
    out = tmp_path / "kamstrup.prom"
    leftovers = [tmp_path / f".kamstrup.prom.{pid}.tmp" for pid in (1, os.getppid(), os.getpid())]
    for path in leftovers:
        path.write_text("half a file of a killed run")
    kt.write_atomic(str(out), "kamstrup_up 1\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kamstrup.prom"]
    assert out.read_text() == "kamstrup_up 1\n"


def test_a_temporary_a_live_writer_holds_is_kept(tmp_path):
    out = tmp_path / "kamstrup.prom"
    child = hold(tmp_path / "placeholder")
    try:
        writing = tmp_path / f".kamstrup.prom.{child.pid}.tmp"
        os.rename(tmp_path / "placeholder", writing)
        kt.write_atomic(str(out), "kamstrup_up 1\n")
        assert writing.exists()
    finally:
        child.kill()
        child.wait()
    kt.write_atomic(str(out), "kamstrup_up 1\n")  # once the writer is gone, its file goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kamstrup.prom"]


def test_a_sweep_between_creation_and_lock_does_not_lose_the_write(tmp_path, monkeypatch):
    """Another run's sweep can find our temporary before we have locked it and remove
    it: we notice (it is no longer linked) and write anew."""
    out = tmp_path / "kamstrup.prom"
    flock = fcntl.flock
    swept = []

    def sweep_first(fd, operation):
        if not swept and operation & fcntl.LOCK_EX and not operation & fcntl.LOCK_NB:
            swept.append(os.listdir(tmp_path))
            kt._remove_stale_temporaries(str(out))  # another run's sweep, just now
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", sweep_first)
    kt.write_atomic(str(out), "kamstrup_up 1\n")
    assert swept == [[f".kamstrup.prom.{os.getpid()}.tmp"]]
    assert out.read_text() == "kamstrup_up 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kamstrup.prom"]


@pytest.mark.slow
def test_next_run_through_a_pty_removes_leftovers_of_dead_runs_only(tmp_path):
    out = tmp_path / "kamstrup.prom"
    dead = [tmp_path / f".kamstrup.prom.{pid}.tmp" for pid in (1, os.getpid())]
    for path in dead:
        path.write_text("half a file of a killed run")
    child = hold(tmp_path / "placeholder")
    line = sim.PtyLine(sim.SimulatedBus([sim.Meter(address=48)]), pace=True)
    try:
        writing = tmp_path / f".kamstrup.prom.{child.pid}.tmp"
        os.rename(tmp_path / "placeholder", writing)
        result = subprocess.run(
            [sys.executable, TOOL, "--once", "--port", line.path, "--address", "48",
             "--output", str(out)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["kamstrup.prom", writing.name])
        assert up(out.read_text(), 48) == "1"
    finally:
        line.close()
        child.kill()
        child.wait()


# --- 16 (b). who holds a busy port ------------------------------------------------------


def hold_port(path: str, script: Path) -> subprocess.Popen:
    """A program named ``script`` that has the port open and locked, as a terminal would."""
    script.write_text(
        "import sys, serial\n"
        "port = serial.Serial(sys.argv[1], exclusive=True)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, str(script), path, "--stay"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdout.readline() == "ready\n"
    return child


@pytest.mark.slow
def test_busy_port_names_its_holder_by_its_command_line_through_a_pty(tmp_path):
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)
    holder = hold_port(path, tmp_path / "a-holder-with-a-long-name.py")
    try:
        result = subprocess.run(
            [sys.executable, TOOL, "--once", "--port", path, "--address", "48",
             "--output", str(tmp_path / "kamstrup.prom")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
        os.close(master)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert (
        f"port {path} is busy: another program has locked it "
        f"(open in a-holder-with-a-long-name.py {path} --stay (pid {holder.pid}))"
    ) in result.stderr


def request_on(master: int, client: subprocess.Popen) -> bytes:
    """The first bytes a client writes on the pty (until one has it open, the master
    reads as hung up: EIO).  Patient: a loaded machine may take many seconds to start
    a Python process; a client that has ended says why."""
    for _ in range(2400):  # a guard against a hang: 120 s
        if client.poll() is not None:
            raise AssertionError(f"the client ended ({client.returncode}) before it wrote: "
                                 f"{client.stderr.read()}")  # fmt: skip
        ready, _, _ = select.select([master], [], [], 0.05)
        try:
            data = os.read(master, 64) if ready else b""
        except OSError:
            data = b""
        if data:
            return data
        time.sleep(0.05)
    return b""


@pytest.mark.slow
def test_a_second_run_names_the_first_run_that_holds_the_port(tmp_path):
    """The console script's process name is cut at 15 characters (kamstrup-textfi)."""
    script = Path(sys.executable).parent / "kamstrup-textfile"  # pip install's console script
    if not script.exists():  # Debian's python3 with PYTHONPATH (CI's second run): the same
        script = tmp_path / "kamstrup-textfile"
        script.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, "
                          f"{str(Path(TOOL).parent)!r})\nfrom kamstrup_textfile import main\n"
                          "sys.exit(main())\n")  # fmt: skip
        script.chmod(0o755)
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)
    first = subprocess.Popen(
        [str(script), "--once", "--port", path, "--address", "48", "--timeout", "60",
         "--retries", "0", "--output", str(tmp_path / "first.prom")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert request_on(master, first) == mbus.snd_nke(48)  # its request: it has the port
        assert first.poll() is None
        second = subprocess.run(
            [str(script), "--once", "--port", path, "--address", "48",
             "--output", str(tmp_path / "second.prom")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        first.kill()
        first.wait()
        os.close(master)
    assert second.returncode == 1
    assert (
        f"is busy: another program has locked it (open in kamstrup-textfile --once "
        f"--port {path} --address 48 "
    ) in second.stderr, second.stderr
    assert f" ... (pid {first.pid}))" in second.stderr


def test_port_holders_never_names_ourselves(tmp_path):
    master, slave = os.openpty()
    path = os.ttyname(slave)
    try:
        assert kt.port_holders(path) == ""  # only we have it open
    finally:
        os.close(slave)
        os.close(master)


def test_port_holders_never_names_ourselves_in_another_pid_namespace(tmp_path):
    """In a pid namespace that shares the host's /proc (a container, unshare), our pid
    (os.getpid(), here 1) is not the one /proc lists us under: we were named as the
    holder of our own port."""
    from tools import require_tool

    code = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import kamstrup_textfile as kt\n"
        "master, slave = os.openpty()\n"
        "print(os.getpid(), repr(kt.port_holders(os.ttyname(slave))))\n"
    )
    unshare = require_tool("unshare")
    result = subprocess.run(
        [unshare, "--user", "--map-root-user", "--pid", "--fork", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1 ''\n"


@pytest.mark.parametrize(
    "argv, name",
    [
        (["/usr/bin/python3", "/usr/local/bin/kamstrup-textfile", "--once"],
         "kamstrup-textfile --once"),
        (["python3.11", "-u", "-X", "dev", "tool.py", "-v"], "tool.py -v"),
        (["/usr/bin/python3", "-m", "serial.tools.miniterm", "/dev/ttyUSB0"],
         "serial.tools.miniterm /dev/ttyUSB0"),
        (["/usr/bin/screen", "/dev/ttyUSB0", "2400"], "screen /dev/ttyUSB0 2400"),
        (["minicom", "-D", "/dev/ttyUSB0", "-b", "2400", "-o", "-w", "-c", "on", "--color",
          "on", "-8"], "minicom -D /dev/ttyUSB0 -b 2400 -o -w -c on --color on -8"),
        (["picocom", "-b", "2400", "/dev/ttyUSB0", "--imap", "lfcrlf", "--omap", "crlf",
          "--emap", "crcrlf", "--echo"],
         "picocom -b 2400 /dev/ttyUSB0 --imap lfcrlf --omap crlf ..."),
        (["a\nb", "c\td"], "a b c d"),
        ([], ""),
    ],
)  # fmt: skip
def test_holder_name_from_command_line(argv, name):
    assert kport.command_name(argv) == name


def test_a_busy_gateway_names_the_process_that_holds_its_lock():
    url = "socket://192.0.2.10:10001"  # never reached: the lock is taken first
    code = (
        "import socket, sys\n"
        "lock = socket.socket(socket.AF_UNIX)\n"
        "lock.bind('\\0' + sys.argv[1])\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, kport.gateway_lock_name(url)[1:]],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "ready\n"
        with pytest.raises(kt.BusError) as caught:
            kt.open_port(url, 2400, wait=0.3)
    finally:
        holder.kill()
        holder.wait()
    assert str(caught.value).startswith(
        f"port {url} is busy: another run is reading the meters through gateway "
        "192.0.2.10:10001 (in python"
    )
    assert str(caught.value).endswith(f" (pid {holder.pid}))")
