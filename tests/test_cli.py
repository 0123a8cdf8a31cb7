"""The command line: --decode and its JSON contract, errors, usage, environment variables.

In-process through click's CliRunner where that is enough, and as a real
``python3 kamstrup_textfile.py`` subprocess for the exit status and stderr a
user sees.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from corpus import KAMSTRUP, LIBMBUS
from tools import invoke, run_tool, up_line

import kamstrup_sim as sim
import kamstrup_textfile as kt

ROOT = Path(__file__).resolve().parent.parent

# file -> (address, id, version, medium, access number, status), from corpus/kamstrup/README.md
HEADERS = {
    "multical303_heat.hex": (133, "82937133", 0x40, "heat", 0x43, 0x10),
    "multical303_heat_cooling.hex": (48, "30303030", 0x40, "heat/cooling", 0x00, 0x00),
    "multical403.hex": (74, "77447744", 0x34, "heat", 0x06, 0x00),
    "multical603.hex": (230, "32323232", 0x35, "heat", 0x19, 0x00),
    "multical302.hex": (183, "67211183", 0x30, "heat", 0x21, 0x00),
}

METER_KEYS = {
    "address",
    "id",
    "manufacturer",
    "version",
    "medium",
    "access_number",
    "status",
    "records",
}
RECORD_KEYS = {"storage", "tariff", "subunit", "function", "quantity", "unit", "value"}


def decode_json(path: Path) -> dict:
    result = invoke(["--decode", str(path), "--format", "json", "--output", "-"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# --- --decode: the JSON contract ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(HEADERS))
def test_decode_json_contract(name):
    data = decode_json(KAMSTRUP / name)
    assert list(data) == ["meters"]
    assert len(data["meters"]) == 1
    meter = data["meters"][0]
    assert METER_KEYS <= set(meter)
    address, ident, version, medium, access, status = HEADERS[name]
    assert type(meter["address"]) is int and meter["address"] == address
    assert type(meter["version"]) is int and meter["version"] == version
    assert isinstance(meter["id"], str) and len(meter["id"]) == 8 and meter["id"].isdigit()
    assert meter["id"] == ident
    assert meter["manufacturer"] == "KAM"
    assert meter["medium"] == medium
    assert meter["access_number"] == access
    assert meter["status"] == status
    assert meter["records"], "no records"
    for record in meter["records"]:
        assert RECORD_KEYS <= set(record)
        for key in ("storage", "tariff", "subunit"):
            assert type(record[key]) is int


def test_decode_303_heat_cooling_first_record_is_energy():
    record = decode_json(KAMSTRUP / "multical303_heat_cooling.hex")["meters"][0]["records"][0]
    assert record["quantity"] == "energy"
    assert record["unit"] == "J"
    assert record["value"] == 554400000.0
    assert (record["storage"], record["tariff"], record["subunit"]) == (0, 0, 0)
    assert record["function"] == "instantaneous"


def test_decode_json_subprocess_matches_in_process():
    path = KAMSTRUP / "multical603.hex"
    result = run_tool("--decode", str(path), "--format", "json", "--output", "-")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout) == decode_json(path)


def test_decode_multi_telegram_pair_is_one_meter(tmp_path):
    first = LIBMBUS / "test-frames" / "svm_f22_telegram1.hex"
    second = LIBMBUS / "unsupported-frames" / "svm_f22_telegram2.hex"
    pair = tmp_path / "pair.hex"
    pair.write_text(first.read_text() + "\n" + second.read_text())
    one = decode_json(first)["meters"][0]
    two = decode_json(second)["meters"][0]
    assert one["records"][-1]["dib"] == "1f"  # "more records follow"
    merged = decode_json(pair)["meters"]
    assert len(merged) == 1
    meter = merged[0]
    assert (meter["address"], meter["id"]) == (one["address"], one["id"]) == (1, "01006089")
    assert meter["records"] == one["records"][:-1] + two["records"]


def test_decode_two_different_meters_are_two(tmp_path):
    both = tmp_path / "both.hex"
    both.write_text(
        (KAMSTRUP / "multical403.hex").read_text() + (KAMSTRUP / "multical302.hex").read_text()
    )
    meters = decode_json(both)["meters"]
    assert [m["id"] for m in meters] == ["77447744", "67211183"]


def test_decode_stdin():
    text = (KAMSTRUP / "multical303_heat.hex").read_text()
    result = run_tool("--decode", "-", "--format", "json", "--output", "-", input=text)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["meters"][0]["id"] == "82937133"


def test_decode_stdin_in_process_prom():
    text = (KAMSTRUP / "multical403.hex").read_text()
    result = invoke(["--decode", "-", "--output", "-"], input=text)
    assert result.exit_code == 0
    assert up_line(74, 1, meter="77447744") in result.stdout


# --- bad input files ------------------------------------------------------------------

BAD_FILES = {
    "non_hex": "68 0G 0B",
    "odd_digits": "68 0B 0",
    "no_frame": "10 5B FE 59 16",
    "truncated": "68 88 88 68 08 30 72 30",
    "bad_checksum": (KAMSTRUP / "multical303_heat_cooling.hex")
    .read_text()
    .replace("6C 16", "6D 16"),
    "empty": "",
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_one_line_exit_1_no_output(tmp_path, kind):
    assert kind != "bad_checksum" or BAD_FILES[kind].rstrip().endswith("6D 16")
    bad = tmp_path / f"{kind}.hex"
    bad.write_text(BAD_FILES[kind])
    out = tmp_path / "kamstrup.prom"
    result = run_tool("--decode", str(bad), "--output", str(out))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kamstrup_textfile.py: ")  # named as invoked
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]


def test_binary_file_is_one_clean_error(tmp_path):
    bad = tmp_path / "binary.hex"
    bad.write_bytes(b"\x68\xff\xfe\x00\x80 not text")
    out = tmp_path / "kamstrup.prom"
    result = run_tool("--decode", str(bad), "--output", str(out))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"kamstrup_textfile.py: {bad}: not hex text"]
    assert not out.exists()


def test_bad_checksum_message_names_the_checksum(tmp_path):
    bad = tmp_path / "bad.hex"
    bad.write_text(BAD_FILES["bad_checksum"])
    result = run_tool("--decode", str(bad), "--output", "-")
    assert "checksum" in result.stderr
    assert result.returncode == 1


def test_missing_decode_file_is_a_usage_error(tmp_path):
    result = run_tool("--decode", str(tmp_path / "nope.hex"), "--output", "-")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


# --- usage errors -----------------------------------------------------------------------

USAGE_ERRORS = {
    "typo": ["--prot", "/dev/ttyUSB0", "--once"],
    "address_251": ["--once", "--address", "251"],
    "address_7_digits": ["--once", "--address", "1234567"],
    "baudrate_100": ["--once", "--baudrate", "100"],
    "baudrate_typo": ["--scan", "--baudrate", "2040"],  # no M-Bus rate: a typo of 2400
    "label_bad_name": ["--once", "--label", "9bad=x"],
    "label_reserved": ["--once", "--label", "meter=x"],
    "label_no_equals": ["--once", "--label", "location"],
    "label_unit": ["--once", "--label", "unit=x"],  # the tool's own label on some records
    "no_mode": [],
    "two_modes": ["--once", "--scan"],
    "format_unknown": ["--once", "--format", "xml"],
}


@pytest.mark.parametrize("kind", sorted(USAGE_ERRORS))
def test_usage_errors_exit_2(kind, tmp_path, monkeypatch):
    opened = []
    monkeypatch.setattr(kt, "open_port", lambda *a, **k: opened.append(a))
    out = tmp_path / "k.prom"
    result = invoke([*USAGE_ERRORS[kind], "--output", str(out)])
    assert result.exit_code == 2, result.stdout + result.stderr
    (line,) = result.stderr.splitlines()  # one line, not click's usage block
    assert line.startswith("kamstrup-textfile: ") and line.endswith(" --help)")
    assert opened == []
    assert not out.exists()


def test_two_modes_on_the_command_line_are_named(monkeypatch):
    monkeypatch.setattr(kt, "open_port", lambda *a, **k: pytest.fail("port opened"))
    result = invoke(["--once", "--scan-secondary", "--output", "-"])
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert "--once and --scan-secondary exclude" in line, line


ENV_ACTION_IGNORED = (
    "kamstrup-textfile: warning: {name} in the environment is ignored: {option} is given "
    "on the command line only"
)


def test_a_mode_set_in_the_environment_is_not_taken_and_is_named(monkeypatch):
    """KAMSTRUP_SCAN=1 left in /etc/default/kamstrup (or exported in a shell) must not
    turn the timer's --once into a scan, nor stop it: the run reads the meters, and one
    line says that the variable was ignored."""
    opened = []

    def open_port(url, baudrate, wait=10.0):
        opened.append(url)
        return sim.FakePort(sim.SimulatedBus([sim.Meter(address=48)]), timeout=0.001)

    monkeypatch.setattr(kt, "open_port", open_port)
    monkeypatch.setattr(kt, "_scan", lambda *a, **k: pytest.fail("scanned"))
    result = invoke(["--once", "--output", "-"], env={"KAMSTRUP_SCAN": "1"})
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [
        ENV_ACTION_IGNORED.format(name="KAMSTRUP_SCAN", option="--scan")
    ]
    assert opened == ["/dev/ttymeterBus"]
    assert up_line(254, 1, meter="30303030") in result.stdout


def test_once_set_in_the_environment_does_not_stop_a_scan(monkeypatch):
    """KAMSTRUP_ONCE=true in the environment of a hand --scan: the scan runs, nothing is
    read into a file, and one line names the ignored variable."""
    scans = []
    monkeypatch.setattr(kt, "_scan", lambda *a, **k: scans.append(a) or 0)
    monkeypatch.setattr(kt, "read_meters", lambda *a, **k: pytest.fail("read as --once"))
    result = invoke(["--scan"], env={"KAMSTRUP_ONCE": "true"})
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [
        ENV_ACTION_IGNORED.format(name="KAMSTRUP_ONCE", option="--once")
    ]
    assert [scan[0] for scan in scans] == ["/dev/ttymeterBus"]
    assert "kamstrup_up" not in result.stdout


def test_usage_error_subprocess_no_traceback():
    result = run_tool("--once", "--address", "251")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "'251'" in result.stderr


def test_address_254_and_secondary_accepted(monkeypatch):
    seen = []

    def read_meters(port, addresses, **kwargs):
        seen.append(addresses)
        return []

    monkeypatch.setattr(kt, "read_meters", read_meters)
    monkeypatch.setattr(kt, "open_port", lambda *a, **k: sim.FakePort(sim.SimulatedBus([])))
    args = ["--once", "--address", "254", "--address", "00000007", "--address", "0"]
    result = invoke([*args, "--output", "-"])
    assert result.exit_code == 0, result.stderr
    assert seen == [[254, "00000007", 0]]


def test_version():
    result = run_tool("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"kamstrup_textfile.py, version {kt.__version__}"


def test_help_mentions_environment():
    result = invoke(["--help"])
    assert result.exit_code == 0
    assert "KAMSTRUP_" in result.stdout


# --- environment variables ----------------------------------------------------------------


@pytest.fixture
def fake_bus(monkeypatch):
    """open_port gives an in-process simulated bus; returns (meters list, opened urls)."""
    meters: list = []
    opened: list = []

    def open_port(url, baudrate, wait=10.0):
        opened.append((url, baudrate))
        return sim.FakePort(sim.SimulatedBus(meters), timeout=0.001)

    monkeypatch.setattr(kt, "open_port", open_port)
    return meters, opened


def test_env_port_baudrate_timeout_retries_output(fake_bus, tmp_path):
    meters, opened = fake_bus
    meters.append(sim.Meter(address=48, silent=True))
    out = tmp_path / "env.prom"
    env = {
        "KAMSTRUP_PORT": "socket://gateway.invalid:10001",
        "KAMSTRUP_BAUDRATE": "9600",
        "KAMSTRUP_TIMEOUT": "0.3",
        "KAMSTRUP_RETRIES": "1",
        "KAMSTRUP_OUTPUT": str(out),
    }
    result = invoke(["--once"], env=env)
    assert result.exit_code == 1
    assert opened == [("socket://gateway.invalid:10001", 9600)]
    assert "no answer within 0.3 s" in result.stderr
    assert "after 2 tries" in result.stderr
    assert len(meters[0].requests) == 2
    assert up_line(254, 0, bus="env") in out.read_text()


def test_env_once_flag_is_not_an_action(fake_bus, tmp_path):
    """KAMSTRUP_ONCE=1 does not make a run out of a command line that names no action
    (a sourced settings file must never start a read, nor stop one): a usage error, no
    port opened, no file written."""
    meters, opened = fake_bus
    meters.append(sim.Meter(address=48))
    out = tmp_path / "k.prom"
    result = invoke(["--output", str(out)], env={"KAMSTRUP_ONCE": "1"})
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("kamstrup-textfile: nothing to do: give one of --once"), line
    assert opened == []
    assert not out.exists()


def test_command_line_beats_environment(fake_bus):
    _, opened = fake_bus
    invoke(["--once", "--port", "/dev/ttyA", "--output", "-"], env={"KAMSTRUP_PORT": "/dev/ttyB"})
    assert opened == [("/dev/ttyA", 2400)]


def test_env_bad_value_is_a_usage_error(fake_bus):
    _, opened = fake_bus
    result = invoke(["--once", "--output", "-"], env={"KAMSTRUP_BAUDRATE": "100"})
    assert result.exit_code == 2
    assert opened == []


def test_env_address_list(fake_bus):
    meters, _ = fake_bus
    meters.extend([sim.Meter(address=48), sim.Meter(address=133, ident="82937133")])
    result = invoke(["--once", "--output", "-"], env={"KAMSTRUP_ADDRESS": "48 133"})
    assert result.exit_code == 0, result.stderr
    assert up_line(48, 1, meter="30303030") in result.stdout
    assert up_line(133, 1, meter="82937133") in result.stdout
    assert 'address="254"' not in result.stdout


def test_env_label():
    result = invoke(
        ["--decode", str(KAMSTRUP / "multical403.hex"), "--output", "-"],
        env={"KAMSTRUP_LABEL": "location=cellar building=north"},
    )
    assert result.exit_code == 0
    up = 'kamstrup_up{address="74",bus="kamstrup",meter="77447744",location="cellar",'
    assert up + 'building="north"} 1\n' in result.stdout


def test_env_format():
    result = invoke(
        ["--decode", str(KAMSTRUP / "multical403.hex"), "--output", "-"],
        env={"KAMSTRUP_FORMAT": "json"},
    )
    assert result.exit_code == 0
    assert json.loads(result.stdout)["meters"][0]["id"] == "77447744"


# --- labels ------------------------------------------------------------------------------


def test_label_values_are_escaped():
    text = (KAMSTRUP / "multical403.hex").read_text()
    value = 'a "quoted" \\back\nnew'
    result = invoke(
        ["--decode", "-", "--output", "-", "--label", f"note={value}", "--label", "site=x"],
        input=text,
    )
    assert result.exit_code == 0, result.stderr
    escaped = 'note="a \\"quoted\\" \\\\back\\nnew",site="x"'
    up = 'kamstrup_up{address="74",bus="kamstrup",meter="77447744",'
    assert f"{up}{escaped}}} 1\n" in result.stdout
    for line in result.stdout.splitlines():
        if not line.startswith("#"):
            assert escaped in line, line
    assert "\nnew" not in result.stdout


def test_multiple_cli_labels_on_every_series():
    result = invoke(
        [
            "--decode",
            str(KAMSTRUP / "multical302.hex"),
            "--output",
            "-",
            "--label",
            "location=cellar",
            "--label",
            "building=north",
        ]
    )
    samples = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert samples
    assert all('location="cellar",building="north"}' in line for line in samples)


def test_decode_writes_to_stdout_unless_told(tmp_path):
    """A decoded capture must never replace the live file by default."""
    result = run_tool("--decode", str(KAMSTRUP / "multical403.hex"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert up_line(74, 1, meter="77447744") in result.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["--once", "--port", "/tmp/nope\nsecond line", "--output", "-"],
        ["--decode", "{tmp}/bad\nname.hex"],
        ["--once", "--port", "/tmp/nope", "--output", "-", "--capture", "/nonexist/a\nb.hex"],
    ],
)
def test_a_failure_naming_a_file_with_a_line_break_is_one_line(args, tmp_path):
    (tmp_path / "bad\nname.hex").write_text("zz\n")
    result = run_tool(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == 1
    assert result.stderr.strip()
    for line in result.stderr.splitlines():
        assert line.startswith("kamstrup_textfile.py: "), result.stderr
