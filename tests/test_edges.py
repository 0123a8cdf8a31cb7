"""Edges of what goes in and out: labels, stdout, identifiers, meters that share an id,
and a bit field sent as a real number.  Each was a traceback or a bad file once."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest
from corpus import KAMSTRUP
from test_textfile import fake_bus, parse_prom, series  # noqa: F401 (fixture)
from tools import TOOL, invoke

import kamstrup_sim as sim

# --- labels --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "how",
    [
        {"env": {"KAMSTRUP_LABEL": "site=a site=b"}},
        {"args": ["--label", "site=a", "--label", "site=b"]},
        {"args": ["--label", "site=a", "--label", "site=a"]},
    ],
)
def test_a_label_given_twice_is_a_usage_error(how, tmp_path, fake_bus):  # noqa: F811
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


def test_a_utf8_label_value_is_kept(tmp_path, fake_bus):  # noqa: F811
    fake_bus.append(sim.Meter(address=48))
    out = tmp_path / "k.prom"
    result = invoke(["--once", "--output", str(out), "--label", "site=København"])
    assert result.exit_code == 0, result.stderr
    assert 'kamstrup_up{address="254",site="København"} 1\n' in out.read_text("utf-8")


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
    proc = subprocess.Popen(
        [sys.executable, TOOL, "--decode", str(KAMSTRUP / "multical603.hex")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # the reader went away before a byte was read
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


def test_two_meters_with_one_id_are_both_exported(tmp_path, fake_bus):  # noqa: F811
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


def test_one_meter_at_two_addresses_is_still_exported_once(tmp_path, fake_bus):  # noqa: F811
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
