"""The collector reading a MULTICAL through its optical eye (KMP, issue 17), through the
operating system's paths: kamstrup-sim --protocol kmp serving a paced pty (1200 baud,
8N2) or a TCP gateway, and kamstrup_textfile.py run as a separate process.  Every fault of
the eye, what a read costs the meter's battery (counted by the simulator: --requests),
the same series as the M-Bus read of the same meter.  All slow: CI runs them."""

from __future__ import annotations

import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from tools import TOOL, parse_exposition, up_line

import kamstrup_kmp as kmp
import kamstrup_sim as sim

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SIM = str(ROOT / "kamstrup_sim.py")
PATHS = ["pty", "tcp"]
# A run's wall-clock bound: three tries of the longest exchange, the rates of "auto" and
# the start-up, many times over.  Not a speed test: a hang is what it catches.
RUN_TIMEOUT = 60

ENERGY = 'kamstrup_energy_joules_total{meter="30303030"} 554400000\n'
UP = up_line("kmp", 1, bus="k", meter="30303030")
DOWN = up_line("kmp", 0, bus="k")  # a meter never read before: no serial number known
# The series of the meter's readings (not the per-address ones: up, duration, ...).
READINGS = ("kamstrup_energy", "kamstrup_volume", "kamstrup_on_time", "kamstrup_temperature",
            "kamstrup_power", "kamstrup_info", "kamstrup_meter_info")  # fmt: skip


class Run:
    """One kamstrup-sim run around one kamstrup_textfile.py run."""

    def __init__(self, result, requests: int, out: Path):
        self.result = result
        self.requests = requests  # what the meter heard: the battery's cost
        self.out = out

    @property
    def text(self) -> str:
        return self.out.read_text()

    @property
    def lines(self) -> list:
        return self.result.stderr.splitlines()


def through_sim(tmp_path: Path, sim_args, *tool_args, path="pty", name="k.prom") -> Run:
    """``kamstrup-sim --protocol kmp SIM_ARGS -- kamstrup_textfile.py TOOL_ARGS``: the tool
    gets KAMSTRUP_PORT, KAMSTRUP_BAUDRATE and KAMSTRUP_PROTOCOL from the simulator."""
    out = tmp_path / name
    count = tmp_path / "requests.txt"
    cmd = [sys.executable, SIM, "--protocol", "kmp", "--requests", str(count), *sim_args]
    if path == "tcp":
        cmd += ["--tcp", "127.0.0.1:0"]
    cmd += ["--", sys.executable, TOOL, *tool_args]
    if "--scan" not in tool_args and "--decode" not in tool_args:
        cmd += ["--output", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    return Run(result, int(count.read_text()), out)


def once(tmp_path, *sim_args, path="pty", args=()) -> Run:
    return through_sim(tmp_path, sim_args, "--once", *args, path=path)


def series(text: str) -> dict:
    """{(name, labels): value} of an exposition, the values of the run's clock left out."""
    found = {}
    for name, labels, value in parse_exposition(text):
        timed = name in (
            "kamstrup_read_duration_seconds",
            "kamstrup_last_success_timestamp_seconds",
        )
        found[(name, labels)] = None if timed else value
    return found


def readings_in(text: str) -> list:
    return [line for line in text.splitlines() if line.startswith(READINGS)]


def assert_failed_once(run: Run, says: str) -> None:
    """kamstrup_up 0, none of the meter's readings, one line, no traceback, exit 1."""
    assert run.result.returncode == 1, run.result.stderr
    (line,) = run.lines
    assert line.startswith("kamstrup_textfile.py: address kmp: "), line
    assert says in line, line
    assert DOWN in run.text
    assert readings_in(run.text) == []


# --- a read costs 2 requests and gives the M-Bus read's series ---------------------------

# What the M-Bus module of the simulator's 303 (multical303_heat_cooling) sends and KMP's
# ten registers do not ask for: the cooling energy, E8, E9, the error hour counter, the
# maxima, and the records of storage 1 (the last target date's values).
M_BUS_ONLY = {
    "kamstrup_cooling_energy_joules_total",
    "kamstrup_e8_cubic_meters_celsius_total",
    "kamstrup_e9_cubic_meters_celsius_total",
    "kamstrup_error_on_time_seconds_total",
    "kamstrup_max_power_watts",
    "kamstrup_max_volume_flow_cubic_meters_per_second",
    "kamstrup_register_cooling_energy_joules",
    "kamstrup_register_e8_cubic_meters_celsius",
    "kamstrup_register_e9_cubic_meters_celsius",
    "kamstrup_register_energy_joules",
    "kamstrup_register_max_power_watts",
    "kamstrup_register_max_volume_flow_cubic_meters_per_second",
    "kamstrup_register_volume_cubic_meters",
}


def m_bus_read(tmp_path: Path) -> dict:
    """The series of an M-Bus read of the simulator's 303 at address 48 (as
    test_sim_paths runs it), with what only says the port (the address, the M-Bus
    version and medium bytes) as a KMP read says it."""
    (tmp_path / "mbus").mkdir()
    out = tmp_path / "mbus" / "k.prom"
    cmd = [sys.executable, SIM, "--meter", "303:48:30303030", "--", sys.executable, TOOL,
           "--once", "--address", "48", "--output", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert 'version="64",medium="heat/cooling"' in text
    text = text.replace('address="48"', 'address="kmp"')
    return series(text.replace('version="64",medium="heat/cooling"', 'version="",medium="heat"'))


@pytest.mark.parametrize("path", PATHS)
def test_a_read_through_the_eye_gives_the_m_bus_reads_series_for_two_requests(tmp_path, path):
    run = once(tmp_path, path=path)
    assert run.result.returncode == 0, run.result.stderr
    assert run.result.stderr == ""
    assert run.requests == 2  # the battery's cost of one read (issue 17: at most 2)
    kmp_series = series(run.text)
    m_bus = m_bus_read(tmp_path)
    assert {key: m_bus[key] for key in m_bus if key[0] not in M_BUS_ONLY} == kmp_series
    assert {name for name, _ in m_bus} - {name for name, _ in kmp_series} == M_BUS_ONLY


def test_the_energy_unit_the_meter_shows_does_not_change_the_file(tmp_path):
    run = once(tmp_path, "--energy-unit", "MWh")
    assert run.result.returncode == 0, run.result.stderr
    assert ENERGY in run.text


@pytest.mark.parametrize("path", PATHS)
def test_values_that_need_stuffing_read_right(tmp_path, path):
    """Mantissas 00 06 0D 1B, 00 1B 40 80, 00 00 06 80, 00 00 0D 06 (sim.STUFFED_VALUES)."""
    run = once(tmp_path, "--meter", "303::30303030,stuffed", path=path)
    assert run.result.returncode == 0, run.result.stderr
    text = run.text
    assert 'kamstrup_energy_joules_total{meter="30303030"} 1427655600000\n' in text  # 396571 kWh
    assert 'kamstrup_volume_cubic_meters_total{meter="30303030"} 17859.84\n' in text
    assert 'kamstrup_on_time_seconds_total{meter="30303030"} 5990400\n' in text  # 1664 h
    assert 'kamstrup_temperature_celsius{meter="30303030",sensor="flow"} 33.34\n' in text
    assert run.requests == 2


def test_another_serial_number_is_the_meter_label(tmp_path):
    run = once(tmp_path, "--meter", "303::00012345")
    assert run.result.returncode == 0, run.result.stderr
    assert up_line("kmp", 1, bus="k", meter="00012345") in run.text


# --- the eye's faults -------------------------------------------------------------------

FAULTS = {
    "silent": "no answer within 0.5 s",
    "crc": "CRC 0x",
    "cut": "answer cut off:",
    "ack": "a lone ACK (06) where an answer was due",
    "garbage": "no answer within 0.5 s, 6 bytes of noise",
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_on_the_first_request_is_retried(tmp_path, fault, path):
    run = once(tmp_path, "--meter", f"303,{fault}", path=path, args=("--timeout", "0.5"))
    assert run.result.returncode == 0, run.result.stderr
    assert run.result.stderr == ""
    assert UP in run.text and ENERGY in run.text
    assert run.requests == 3  # the retry costs one more


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_on_every_request_is_one_line_and_no_readings(tmp_path, fault, path):
    run = once(tmp_path, "--meter", f"303,{fault}=always", path=path,
               args=("--timeout", "0.5"))  # fmt: skip
    assert_failed_once(run, FAULTS[fault])
    assert run.lines[0].endswith("(after 3 tries)")
    assert "Traceback" not in run.result.stderr
    assert run.requests == 3  # 1 + --retries 2, then it gives up: no second request


def test_fewer_retries_cost_fewer_requests(tmp_path):
    run = once(tmp_path, "--meter", "303,crc=always", args=("--retries", "0"))
    assert_failed_once(run, "(after 1 try)")
    assert run.requests == 1


@pytest.mark.parametrize("path", PATHS)
def test_echo_and_noise_on_every_request_are_skipped(tmp_path, path):
    run = once(tmp_path, "--echo", "--meter", "303,noise=always", path=path, args=("-v",))
    assert run.result.returncode == 0, run.result.stderr
    assert UP in run.text and ENERGY in run.text
    assert run.requests == 2  # no retry
    assert sum(line.startswith("echo 80 3F 10") for line in run.lines) == 2
    assert sum(line == "noise 00 FF 0D 12" for line in run.lines) == 2


def test_a_meter_at_2400_is_found_by_auto(tmp_path):
    run = once(tmp_path, "--meter", "303,baudrate=2400", args=("--baudrate", "auto", "-v"))
    assert run.result.returncode == 0, run.result.stderr
    assert "KMP: answered at 2400 baud" in run.lines
    assert UP in run.text and ENERGY in run.text
    assert run.requests == 2  # the requests at 1200 were garbage to it


def test_a_meter_at_2400_is_silent_at_the_configured_1200(tmp_path):
    run = once(tmp_path, "--meter", "303,baudrate=2400", args=("--timeout", "0.3"))
    assert_failed_once(run, "no answer within 0.3 s (after 3 tries)")
    assert run.requests == 0


@pytest.mark.parametrize("path", PATHS)
def test_the_head_unplugged_mid_answer(tmp_path, path):
    run = once(tmp_path, "--meter", "303,disconnect_at=20", path=path)
    assert_failed_once(run, "port failed while reading: ")
    assert run.requests == 1  # a port that failed is not asked again


# --- scan, capture and decode -------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_scan_says_serial_type_and_rate(tmp_path, path):
    run = through_sim(tmp_path, [], "--scan", path=path)
    assert run.result.returncode == 0, run.result.stderr
    assert run.result.stdout.splitlines() == [
        "optical eye  serial 30303030  type 0x0004  revision F1  baudrate 1200",
        "KAMSTRUP_PROTOCOL=kmp",
        "KAMSTRUP_BAUDRATE=1200",
    ]
    assert run.requests == 2


def test_scan_with_auto_finds_a_meter_at_2400(tmp_path):
    run = through_sim(tmp_path, ["--meter", "303,baudrate=2400"], "--scan", "--baudrate",
                      "auto", "--timeout", "0.3")  # fmt: skip
    assert run.result.returncode == 0, run.result.stderr
    assert run.result.stdout.splitlines()[-1] == "KAMSTRUP_BAUDRATE=2400"


def test_scan_of_a_silent_meter_says_none_answered(tmp_path):
    run = through_sim(tmp_path, ["--meter", "303,silent=always"], "--scan", "--timeout", "0.3")
    assert run.result.returncode == 1
    assert run.result.stdout == ""
    (line,) = run.lines
    assert line.startswith("kamstrup_textfile.py: no KMP meter answered on /dev/pts/")


def test_capture_then_decode_gives_the_live_reads_series(tmp_path):
    capture = tmp_path / "capture.hex"
    live = once(tmp_path, args=("--capture", str(capture)))
    assert live.result.returncode == 0, live.result.stderr
    (tmp_path / "decoded").mkdir()
    decoded = tmp_path / "decoded" / "k.prom"
    cmd = [sys.executable, TOOL, "--decode", str(capture), "--output", str(decoded)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert series(decoded.read_text()) == series(live.text)


# --- the line itself ----------------------------------------------------------------------


def tool_on(line, out: Path, *args):
    return subprocess.run([sys.executable, TOOL, "--once", "--port", line.path, "--output",
                           str(out), *args], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)  # fmt: skip


def test_kmp_asks_the_port_for_two_stop_bits_and_m_bus_for_one(tmp_path):
    """A pty keeps CSTOPB (not parity: FIELD-NOTES), and its master sees what the client
    set: KMP_LINE's 8N2 reaches the kernel, M-Bus's 8E1 does not set it."""
    seen = {}
    for protocol, bus in (("kmp", sim.KmpEyeMeter()), ("mbus", sim.SimulatedBus([sim.Meter()]))):
        line = sim.PtyLine(bus, baudrate=1200 if protocol == "kmp" else 2400, pace=False)
        try:
            result = tool_on(line, tmp_path / f"{protocol}.prom", "--protocol", protocol)
        finally:
            line.close()
        assert result.returncode == 0, result.stderr
        seen[protocol] = (line.rate, line.cflag)
    assert seen["kmp"][0] == 1200 and seen["kmp"][1] & termios.CSTOPB
    assert seen["mbus"][0] == 2400 and not seen["mbus"][1] & termios.CSTOPB
    assert seen["kmp"][1] & termios.CSIZE == termios.CS8


# --- kamstrup-sim's own command line -------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--meter", "303:48"], "KMP has no address: write 303::SERIAL"),
        (["--meter", "403"], "the simulated eye shows a 303"),
        (["--meter", "303::123"], "'123' is not an 8-digit serial number"),
        (["--meter", "303,crc=often"], "neither a count nor 'always'"),
        (["--meter", "303,bad_checksum"], "unknown KMP fault 'bad_checksum'"),
        (["--meter", "303", "--meter", "303"], "the optical eye sees one meter"),
    ],
)
def test_kamstrup_sim_refuses_a_bad_kmp_meter(args, message):
    result = subprocess.run([sys.executable, SIM, "--protocol", "kmp", *args, "--", "true"],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr


def test_kamstrup_sim_hands_the_command_the_kmp_settings(tmp_path):
    code = "import os; print(os.environ['KAMSTRUP_PROTOCOL'], os.environ['KAMSTRUP_BAUDRATE'])"
    result = subprocess.run([sys.executable, SIM, "--protocol", "kmp", "--", sys.executable,
                             "-c", code], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "kmp 1200\n"


def test_kamstrup_sim_help_says_the_kmp_syntax():
    result = subprocess.run([sys.executable, SIM, "--help"], capture_output=True, text=True,
                            timeout=30)  # fmt: skip
    assert "--protocol {mbus,kmp}" in result.stdout
    assert "303[::SERIAL][,FAULT[=N|always]]" in " ".join(result.stdout.split())
    assert "--requests FILE" in result.stdout


def test_a_fault_n_times_hits_the_first_n_requests():
    meter = sim._parse_kmp_meter("303::30303030,crc=2,echo")
    assert meter.faults == ["crc", "crc"] and meter.echo and meter.always is None
    assert meter.values[kmp.SERIAL_NUMBER] == (0x00, "30303030")


def test_auto_says_what_each_rate_gave(tmp_path):
    """A meter that babbles at 1200 and is silent at 2400: the one line says both, not
    only 2400's silence (which hid that something did send at 1200)."""
    run = once(tmp_path, "--meter", "303,garbage=always", args=("--baudrate", "auto",
               "--timeout", "0.3"))  # fmt: skip
    assert_failed_once(run, "1200 baud: GetRegister 60,68,1004,86,87,89,80,74: no answer "
                       "within 0.3 s, 6 bytes of noise (after 3 tries); 2400 baud: ")  # fmt: skip
    assert run.lines[0].endswith("no answer within 0.3 s (after 3 tries)")


def test_the_meter_answers_after_the_request_has_crossed_the_wire(tmp_path):
    """A pty hands a request over at once; the simulated meter answers only after the
    request's bits at 1200 baud and its own delay, as on a real line (a reader that
    forgot the request's own time would pass a simulator without it).  A lower bound:
    a loaded machine only makes the answer later."""
    import serial

    meter = sim.KmpEyeMeter()
    line = sim.PtyLine(meter, baudrate=1200, pace=True)
    try:
        port = serial.Serial(line.path, 1200, stopbits=2, timeout=5)
        request = kmp.get_register_request(kmp.read_plan()[0])
        sent = time.monotonic()
        port.write(request)
        first = port.read(1)
        came = time.monotonic() - sent
        port.close()
    finally:
        line.close()
    assert first == b"\x40"
    assert came >= kmp.wire_seconds(len(request), 1200) + meter.delay + kmp.wire_seconds(1, 1200)
