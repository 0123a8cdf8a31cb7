"""Edges of what goes in and out: labels, stdout, identifiers, meters that share an id,
and a bit field sent as a real number.  Each was a traceback or a bad file once."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest
from corpus import KAMSTRUP
from test_textfile import parse_prom, series
from tools import TOOL, invoke

import kamstrup_sim as sim
import kamstrup_textfile as kt

# --- labels --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "how",
    [
        {"env": {"KAMSTRUP_LABEL": "site=a site=b"}},
        {"args": ["--label", "site=a", "--label", "site=b"]},
        {"args": ["--label", "site=a", "--label", "site=a"]},
    ],
)
def test_a_label_given_twice_is_a_usage_error(how, tmp_path, fake_bus):
    fake_bus.append(sim.Meter(address=48))
    out = tmp_path / "k.prom"
    args = ["--once", "--output", str(out), *how.get("args", [])]
    result = invoke(args, env=how.get("env"))
    assert result.exit_code == 2
    assert "'site' is given twice" in result.stderr
    assert not out.exists()


def test_a_label_value_that_is_not_utf8_is_a_usage_error(tmp_path):
    """An EnvironmentFile written in Latin-1: the bytes reach us as they are."""
    out = tmp_path / "k.prom"
    env = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()}
    env[b"KAMSTRUP_LABEL"] = b"site=K\xf8benhavn"
    result = subprocess.run(
        [sys.executable, TOOL, "--once", "--port", "/dev/null", "--output", str(out)],
        env=env,
        capture_output=True,
        timeout=60,
    )
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert "label 'site' is not UTF-8" in stderr
    assert not out.exists()


def test_a_utf8_label_value_is_kept(tmp_path, fake_bus):
    fake_bus.append(sim.Meter(address=48))
    out = tmp_path / "k.prom"
    result = invoke(["--once", "--output", str(out), "--label", "site=København"])
    assert result.exit_code == 0, result.stderr
    up = 'kamstrup_up{address="254",bus="k",meter="30303030",site="København"} 1\n'
    assert up in out.read_text("utf-8")


# --- stdout ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["--decode", "--once"])
def test_stdout_into_a_full_disk_is_one_line(mode, tmp_path):
    args = ["--decode", str(KAMSTRUP / "multical303_heat.hex")]
    if mode == "--once":  # a port that fails: the file still says kamstrup_up 0
        args = ["--once", "--port", str(tmp_path / "missing"), "--output", "-"]
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, TOOL, *args], stdout=full, stderr=subprocess.PIPE, text=True,
            timeout=60,
        )  # fmt: skip
    lines = result.stderr.splitlines()
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert lines[-1] == (
        "kamstrup_textfile.py: cannot write to standard output: No space left on device"
    )
    assert len(lines) == (2 if mode == "--once" else 1)  # the port's line, then stdout's


@pytest.mark.slow
def test_stdout_into_a_closed_pipe_is_one_line():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader went away before a byte was read (before the tool ran:
    # closed after Popen, a stalled test process could let the whole file into the pipe)
    try:
        proc = subprocess.Popen(
            [sys.executable, TOOL, "--decode", str(KAMSTRUP / "multical603.hex")],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(write_end)
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == 1
    assert stderr == "kamstrup_textfile.py: cannot write to standard output: Broken pipe\n"


# --- identifiers are labels, not samples -----------------------------------------------


def decode(*paths, tmp_path) -> dict:
    out = tmp_path / "k.prom"
    text = "\n".join(p.read_text() for p in paths)
    result = invoke(["--decode", "-", "--output", str(out)], input=text)
    assert result.exit_code == 0, result.stderr
    return parse_prom(out.read_text())


def test_fabrication_number_and_firmware_version_are_labels_on_meter_info(tmp_path):
    families = decode(KAMSTRUP / "multical302.hex", KAMSTRUP / "multical603.hex",
                      tmp_path=tmp_path)  # fmt: skip
    assert "kamstrup_fabrication_number" not in families
    assert "kamstrup_firmware_version" not in families
    info = {labels["meter"]: labels for labels, _ in families["kamstrup_meter_info"]["samples"]}
    assert info["67211183"]["fabrication_number"] == "67211183"
    assert info["67211183"]["firmware_version"] == "1793"
    assert info["32323232"]["fabrication_number"] == "84853230"
    assert "firmware_version" not in info["32323232"]
    for name, family in families.items():  # no identifier left as a sample value
        for labels, sample in family["samples"]:
            assert sample not in ("84853230", "1793"), (name, labels)


def test_an_identifier_label_name_is_reserved():
    result = invoke(["--decode", "-", "--label", "firmware_version=1"], input="")
    assert result.exit_code == 2
    assert "'firmware_version' is set by the tool itself" in result.stderr


def test_passwords_are_never_exported(tmp_path):
    body = bytes.fromhex("08 30 72 30 30 30 30 2D 2C 40 04 00 00 00 00 04 06 9A 00 00 00")
    body += bytes.fromhex("04 FD 16 39 30 00 00")  # FD 16: password 12345
    frame = sim._long(body)
    out = tmp_path / "k.prom"
    result = invoke(["--decode", "-", "--output", str(out)], input=frame.hex())
    assert result.exit_code == 0, result.stderr
    text = out.read_text()
    assert "12345" not in text and "password" not in text
    assert 'kamstrup_energy_joules_total{meter="30303030"} 554400000\n' in text


# --- a bit field sent as a real ---------------------------------------------------------


def info_code_as_real32(value: float) -> bytes:
    frame = bytes.fromhex(sim.FRAMES["303"])
    body = frame[4:-2]
    old = bytes.fromhex("02 FF 22 00 00")
    assert body.count(old) == 1
    return sim._long(body.replace(old, b"\x05\xff\x22" + struct.pack("<f", value)))


@pytest.mark.parametrize("value", [2.5, 256.0])
def test_an_info_code_sent_as_a_real32_is_exported_without_flags(value, tmp_path):
    out = tmp_path / "k.prom"
    result = invoke(["--decode", "-", "--output", str(out)],
                    input=info_code_as_real32(value).hex())  # fmt: skip
    assert result.exit_code == 0, result.stderr
    families = parse_prom(out.read_text())
    assert series(families, "kamstrup_info_code") == [({"meter": "30303030"}, f"{value:g}")]
    assert "kamstrup_info_flag" not in families


# --- meters that share an id -------------------------------------------------------------


def test_two_meters_with_one_id_are_both_exported(tmp_path, fake_bus):
    fake_bus.append(sim.Meter(address=48, ident="30303030", kind="303"))
    fake_bus.append(sim.Meter(address=74, ident="30303030", kind="403"))
    out = tmp_path / "k.prom"
    result = invoke(["--once", "--output", str(out), "--address", "48", "--address", "74"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    families = parse_prom(out.read_text())
    energy = series(families, "kamstrup_energy_joules_total", meter="30303030")
    assert sorted((labels["address"], value) for labels, value in energy) == [
        ("48", "554400000"),
        ("74", "124236000000"),
    ]
    versions = {
        labels["address"]: labels["version"]
        for labels, _ in families["kamstrup_meter_info"]["samples"]
    }
    assert versions == {"48": "64", "74": "52"}


def test_one_meter_at_two_addresses_is_still_exported_once(tmp_path, fake_bus):
    fake_bus.append(sim.Meter(address=48))
    out = tmp_path / "k.prom"
    result = invoke(["--once", "--output", str(out), "--address", "254", "--address", "48"])
    assert result.exit_code == 0
    assert "read at another address too" in result.stderr
    families = parse_prom(out.read_text())
    assert series(families, "kamstrup_energy_joules_total") == [
        ({"meter": "30303030"}, "554400000")
    ]


# --- outputs that are not files ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fifo", "/dev/full", "/dev/zero"])
def test_an_output_that_is_not_a_file_is_refused_at_once(kind, tmp_path):
    """The previous file is read for its last-success times: a fifo would block that read
    forever, /dev/full and /dev/zero would feed it without end."""
    if kind == "fifo":
        output = tmp_path / "kamstrup.prom"
        os.mkfifo(output)
    else:
        output = kind
    result = subprocess.run(
        [sys.executable, TOOL, "--once", "--port", str(tmp_path / "missing"),
         "--output", str(output)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"kamstrup_textfile.py: {output} is not a regular file (use --output - for stdout)"
    )


# --- found by a hostile review ------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "NaN", "-nan", "inf"])
def test_a_timeout_that_is_not_a_number_is_a_usage_error(value, tmp_path):
    result = invoke(["--once", "--timeout", value, "--output", str(tmp_path / "k.prom")])
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert "--timeout" in line
    assert not (tmp_path / "k.prom").exists()


def test_a_bus_never_trusts_a_timeout_that_is_not_a_number():
    port = sim.FakePort(sim.SimulatedBus([]))
    with pytest.raises(ValueError):
        kt.Bus(port, timeout=float("nan"))


@pytest.mark.parametrize(
    "name",
    ["enhanced_identification_subunit_1", "firmware_version_storage_1", "customer_maximum",
     "le", "quantile", "job", "instance"],
)  # fmt: skip
def test_label_names_the_tool_or_prometheus_give_a_meaning_are_refused(name):
    result = invoke(["--decode", "-", "--label", f"{name}=x"], input="")
    assert result.exit_code == 2
    assert f"{name!r}" in result.stderr


def test_a_label_name_with_a_newline_is_refused():
    result = invoke(["--decode", "-", "--label", "site\n=x"], input="")
    assert result.exit_code == 2


@pytest.mark.parametrize("address", ["３０３０３０３０", "٣٠٣٠٣٠٣٠", "४८"])
def test_an_address_in_other_digits_is_a_usage_error(address, tmp_path):
    result = invoke(["--once", "--address", address, "--output", str(tmp_path / "k.prom")])
    assert result.exit_code == 2
    assert not (tmp_path / "k.prom").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [["--decode", str(KAMSTRUP / "multical303_heat.hex")],
     ["--once", "--port", "/nonexistent", "--output", "-"]],
)  # fmt: skip
def test_a_closed_stdout_is_one_line(args):
    result = subprocess.run(
        [sys.executable, TOOL, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, timeout=60, preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "kamstrup_textfile.py: cannot write to standard output: it is closed"
    )


@pytest.mark.slow
def test_a_usage_error_is_exit_2_even_when_stderr_cannot_be_written():
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, TOOL, "--bogus"], stderr=full, timeout=60)
    assert result.returncode == 2


@pytest.mark.slow
def test_stdout_in_ascii_still_gets_utf8():
    env = dict(os.environ, PYTHONIOENCODING="ascii", KAMSTRUP_LABEL="site=Küche")
    result = subprocess.run(
        [sys.executable, TOOL, "--decode", str(KAMSTRUP / "multical303_heat.hex"),
         "--format", "prom"],
        capture_output=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert 'site="Küche"'.encode() in result.stdout


def test_an_empty_output_is_a_usage_error(fake_bus):
    fake_bus.append(sim.Meter(address=48))
    result = invoke(["--once", "--output", ""])
    assert result.exit_code == 2
    assert fake_bus[0].requests == []  # the meter's battery was spared


@pytest.mark.parametrize("kind", ["directory", "missing directory"])
def test_an_unusable_output_is_found_before_the_meter_is_read(kind, tmp_path, fake_bus):
    fake_bus.append(sim.Meter(address=48))
    output = tmp_path / ("dir" if kind == "directory" else "missing/k.prom")
    if kind == "directory":
        output.mkdir()
    result = invoke(["--once", "--output", str(output)])
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1
    assert fake_bus[0].requests == []


@pytest.mark.slow
def test_decode_of_an_endless_file_stops(tmp_path):
    result = subprocess.run([sys.executable, TOOL, "--decode", "/dev/zero"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "kamstrup_textfile.py: /dev/zero: more than 64 MiB: not a capture of M-Bus answers"
    ]


def test_meters_sharing_an_id_keep_their_labels_whichever_answers(tmp_path, fake_bus):
    """Run by run one of the two is silent: a series never gets the other meter's values,
    and once they are told apart, each keeps its labels."""
    a = sim.Meter(address=48, ident="30303030", kind="303")
    b = sim.Meter(address=49, ident="30303030", kind="303-heat")
    fake_bus.extend([a, b])
    out = tmp_path / "k.prom"
    energy = {}
    for silent in [b, a, None, b, a]:
        a.silent = silent is a
        b.silent = silent is b
        invoke(["--once", "--output", str(out), "--address", "48", "--address", "49",
                "--retries", "0", "--timeout", "0.05"])  # fmt: skip
        families = parse_prom(out.read_text())
        for labels, value in families["kamstrup_energy_joules_total"]["samples"]:
            energy.setdefault(tuple(sorted(labels.items())), set()).add(value)
    meter_a = (("meter", "30303030"),)
    assert energy.pop(meter_a) == {"554400000"}  # the first run: only one known yet
    assert energy == {
        (("address", "48"), ("meter", "30303030")): {"554400000"},
        (("address", "49"), ("meter", "30303030")): {"46800000"},
    }


def test_a_port_the_device_policy_refuses_says_what_to_do(monkeypatch):
    import errno

    import serial

    def refused(url, **kwargs):
        raise serial.SerialException(
            errno.EPERM, f"could not open port {url}: [Errno 1] Operation not permitted"
        )

    monkeypatch.setattr(serial, "serial_for_url", refused)
    with pytest.raises(kt.BusError) as caught:
        kt.open_port("/dev/ttyUSB1", 2400)
    assert str(caught.value) == (
        "port /dev/ttyUSB1: Operation not permitted: the service may open only "
        "/dev/ttymeterBus (DeviceAllow=; see kamstrup.service for other ports)"
    )
