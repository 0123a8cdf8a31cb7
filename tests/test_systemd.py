"""Offline checks of kamstrup.service and kamstrup.timer with systemd-analyze."""

from __future__ import annotations

import datetime as dt
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

try:
    from tools import ROOT, parse_exposition, require_tool, run_simulated_read
except ImportError:  # tests/ imported as a package
    from tests.tools import ROOT, parse_exposition, require_tool, run_simulated_read

SERVICE = ROOT / "kamstrup.service"
TIMER = ROOT / "kamstrup.timer"
DEFAULT = ROOT / "kamstrup.default"
EXEC = "/usr/local/bin/kamstrup-textfile"
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
MAX_EXPOSURE = 2.0

Unit = dict[str, list[tuple[str, str]]]


# --------------------------------------------------------------------------
# helpers


def parse_unit(text: str) -> Unit:
    """{section: [(key, value), ...]} in file order; keys may repeat."""
    sections: Unit = {}
    current = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        assert current is not None and "=" in line, f"not a unit file line: {raw!r}"
        key, value = line.split("=", 1)
        sections[current].append((key.strip(), value.strip()))
    return sections


def raw_values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def effective(unit: Unit, section: str, key: str) -> list[str]:
    """Values of a list setting after systemd's `Key=` (empty) resets."""
    values: list[str] = []
    for v in raw_values(unit, section, key):
        values = [] if v == "" else values + [v]
    return values


def single(unit: Unit, section: str, key: str) -> str:
    values = raw_values(unit, section, key)
    assert len(values) == 1, f"{key}= should be set exactly once in [{section}], got {values}"
    return values[0]


def commented_dropins(text: str) -> list[str]:
    """Drop-in examples written in the comments: `#   [Section]` + `#   Key=...` lines."""
    blocks: list[str] = []
    block: list[str] | None = None
    for line in text.splitlines():
        header = re.match(r"^#\s+(\[[A-Za-z]+\])\s*$", line)
        setting = re.match(r"^#\s+([A-Za-z]+=.*)$", line)
        if header:
            if block:
                blocks.append("\n".join(block) + "\n")
            block = [header.group(1)]
        elif setting and block is not None:
            block.append(setting.group(1).rstrip())
        else:
            if block:
                blocks.append("\n".join(block) + "\n")
            block = None
    if block:
        blocks.append("\n".join(block) + "\n")
    return blocks


def stage_units(tmp_path: Path, service_text: str | None = None) -> Path:
    """Copy the units into tmp_path, ExecStart pointed at a dummy executable.

    `systemd-analyze verify` insists that ExecStart's binary exists; the real
    one (/usr/local/bin/kamstrup-textfile) is not installed on a test machine,
    so the copy runs a stand-in at the same relative place under tmp_path.
    """
    text = SERVICE.read_text() if service_text is None else service_text
    dummy = tmp_path / "bin" / "kamstrup-textfile"
    dummy.parent.mkdir(parents=True, exist_ok=True)
    dummy.write_text("#!/bin/sh\nexit 0\n")
    dummy.chmod(0o755)
    assert f"ExecStart={EXEC} " in text
    (tmp_path / "kamstrup.service").write_text(
        text.replace(f"ExecStart={EXEC} ", f"ExecStart={dummy} ")
    )
    shutil.copy(TIMER, tmp_path / "kamstrup.timer")
    return tmp_path


def verify(directory: Path, *units: str) -> subprocess.CompletedProcess:
    tool = require_tool("systemd-analyze")
    return subprocess.run(
        [tool, "verify", *units],
        cwd=directory,
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"},
    )


def exposure(directory: Path, unit: str = "kamstrup.service") -> tuple[float, str]:
    tool = require_tool("systemd-analyze")
    proc = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", unit],
        cwd=directory,
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"},
    )
    out = proc.stdout + proc.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out)
    assert m, f"no overall exposure in systemd-analyze security output:\n{out}"
    return float(m.group(1)), out


def calendar_interval(spec: str) -> set[float]:
    """Seconds between consecutive elapses of an OnCalendar= spec."""
    tool = require_tool("systemd-analyze")
    proc = subprocess.run(
        [tool, "calendar", "--iterations=6", "--base-time=2024-01-01 00:07:30 UTC", spec],
        capture_output=True,
        text=True,
        env={**os.environ, "TZ": "UTC", "SYSTEMD_COLORS": "0"},
    )
    assert proc.returncode == 0, proc.stderr
    stamps = re.findall(
        r"(?:Next elapse|Iter\. #\d+): \w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", proc.stdout
    )
    assert len(stamps) == 6, proc.stdout
    times = [dt.datetime.strptime(s, "%Y-%m-%d %H:%M:%S") for s in stamps]
    return {(b - a).total_seconds() for a, b in zip(times, times[1:])}


# --------------------------------------------------------------------------
# systemd-analyze verify


def test_verify_service_and_timer_is_clean(tmp_path):
    d = stage_units(tmp_path)
    proc = verify(d, "kamstrup.service", "kamstrup.timer")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout == ""


def test_verify_would_report_a_broken_unit(tmp_path):
    """The clean verdict above means something: a misspelt key is reported."""
    text = SERVICE.read_text().replace("DevicePolicy=closed", "DevicePolcy=closed")
    d = stage_units(tmp_path, text)
    proc = verify(d, "kamstrup.service", "kamstrup.timer")
    assert "DevicePolcy" in proc.stderr


def test_verify_with_each_documented_dropin(tmp_path):
    """The drop-ins shown in the service's comments are valid settings."""
    blocks = commented_dropins(SERVICE.read_text())
    assert len(blocks) >= 3, blocks
    for i, block in enumerate(blocks):
        d = stage_units(tmp_path / f"case{i}")
        if "kamstrup_textfile.py" in block:
            # the single-file install's binary: stand in for it as well
            script = d / "bin" / "kamstrup_textfile.py"
            shutil.copy(d / "bin" / "kamstrup-textfile", script)
            block = block.replace("/usr/local/bin/kamstrup_textfile.py", str(script))
        dropin = d / "kamstrup.service.d" / "override.conf"
        dropin.parent.mkdir()
        dropin.write_text(block)
        proc = verify(d, "kamstrup.service", "kamstrup.timer")
        assert (proc.returncode, proc.stderr) == (0, ""), block


# --------------------------------------------------------------------------
# systemd-analyze security


def test_security_exposure_at_most_2(tmp_path):
    d = stage_units(tmp_path)
    score, out = exposure(d)
    assert score <= MAX_EXPOSURE, out


def test_security_score_parser_sees_a_bare_unit_as_unsafe(tmp_path):
    (tmp_path / "kamstrup.service").write_text("[Service]\nType=oneshot\nExecStart=/bin/true\n")
    score, out = exposure(tmp_path)
    assert score > MAX_EXPOSURE, out


def test_gateway_dropin_keeps_exposure_low(tmp_path):
    blocks = [b for b in commented_dropins(SERVICE.read_text()) if "AF_INET" in b]
    assert len(blocks) == 1, blocks
    d = stage_units(tmp_path)
    (d / "kamstrup.service.d").mkdir()
    (d / "kamstrup.service.d" / "gateway.conf").write_text(blocks[0])
    score, out = exposure(d)
    assert score <= MAX_EXPOSURE + 0.5, out
    unit = parse_unit(SERVICE.read_text() + "\n" + blocks[0])
    assert effective(unit, "Service", "IPAddressDeny") == ["any"]
    assert effective(unit, "Service", "IPAddressAllow"), (
        "the gateway drop-in must allow one address"
    )


# --------------------------------------------------------------------------
# the settings themselves


def test_service_runs_the_tool_once_with_its_environment_file():
    unit = parse_unit(SERVICE.read_text())
    assert single(unit, "Service", "Type") == "oneshot"
    assert single(unit, "Service", "ExecStart") == f"{EXEC} --once"
    assert "-/etc/default/kamstrup" in raw_values(unit, "Service", "EnvironmentFile")


def test_service_is_root_without_any_capability():
    unit = parse_unit(SERVICE.read_text())
    assert raw_values(unit, "Service", "User") in ([], ["root"])
    assert raw_values(unit, "Service", "CapabilityBoundingSet") == [""]
    assert raw_values(unit, "Service", "AmbientCapabilities") == [""]
    assert single(unit, "Service", "NoNewPrivileges") == "yes"


def test_service_may_write_only_the_textfile_directory():
    unit = parse_unit(SERVICE.read_text())
    assert single(unit, "Service", "ProtectSystem") == "strict"
    assert effective(unit, "Service", "ReadWritePaths") == [TEXTFILE_DIR]
    # node_exporter (user prometheus) must be able to read what is written
    umask = int(single(unit, "Service", "UMask"), 8)
    assert umask & 0o004 == 0


def test_service_sees_only_the_meter_bus_port():
    unit = parse_unit(SERVICE.read_text())
    assert single(unit, "Service", "DevicePolicy") == "closed"
    assert "/dev/ttymeterBus rw" in effective(unit, "Service", "DeviceAllow")
    # PrivateDevices=yes would hide the adapter altogether
    assert raw_values(unit, "Service", "PrivateDevices") in ([], ["no"])


def test_service_has_no_network_by_default():
    unit = parse_unit(SERVICE.read_text())
    assert effective(unit, "Service", "RestrictAddressFamilies") == ["AF_UNIX"]
    assert effective(unit, "Service", "IPAddressDeny") == ["any"]


def test_single_file_install_is_documented():
    blocks = [b for b in commented_dropins(SERVICE.read_text()) if "kamstrup_textfile.py" in b]
    assert len(blocks) == 1, blocks
    unit = parse_unit(SERVICE.read_text() + "\n" + blocks[0])
    assert effective(unit, "Service", "ExecStart") == ["/usr/local/bin/kamstrup_textfile.py --once"]


# --------------------------------------------------------------------------
# the timer


def test_timer_starts_the_service_every_15_minutes():
    unit = parse_unit(TIMER.read_text())
    assert raw_values(unit, "Timer", "Unit") in ([], ["kamstrup.service"])
    specs = effective(unit, "Timer", "OnCalendar")
    assert len(specs) == 1, specs
    assert calendar_interval(specs[0]) == {15 * 60.0}
    for key in ("OnUnitActiveSec", "OnUnitInactiveSec", "OnActiveSec"):
        assert raw_values(unit, "Timer", key) == []


def test_timer_interval_check_tells_other_intervals_apart():
    assert calendar_interval("hourly") == {3600.0}
    assert calendar_interval("*:0/5") == {300.0}


def test_timer_is_accurate_to_the_second():
    unit = parse_unit(TIMER.read_text())
    assert single(unit, "Timer", "AccuracySec") in ("1s", "1", "1sec")
    assert "timers.target" in raw_values(unit, "Install", "WantedBy")


def test_timer_comment_shows_a_every_minute_dropin():
    blocks = commented_dropins(TIMER.read_text())
    assert len(blocks) == 1, blocks
    assert blocks[0].splitlines()[:2] == ["[Timer]", "OnCalendar="]
    unit = parse_unit(TIMER.read_text() + "\n" + blocks[0])
    specs = effective(unit, "Timer", "OnCalendar")
    assert len(specs) == 1, specs
    assert calendar_interval(specs[0]) == {60.0}


# --------------------------------------------------------------------------
# /etc/default/kamstrup

VARIABLES = ["PORT", "BAUDRATE", "ADDRESS", "TIMEOUT", "RETRIES", "OUTPUT", "BUS", "LABEL",
             "FORMAT", "CAPTURE", "PROTOCOL"]  # fmt: skip


def environment_file(text: str) -> dict[str, str]:
    """NAME=VALUE lines as systemd's EnvironmentFile= reads them (quotes removed): a value
    whole in double quotes, whole in single quotes (taken as it is), or one word."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        m = re.fullmatch(r"""([A-Za-z_][A-Za-z0-9_]*)=(?:"([^"\\]*)"|'([^']*)'|(\S*))""", line)
        assert m, f"not an EnvironmentFile line: {line!r}"
        env[m.group(1)] = next(g for g in m.groups()[1:] if g is not None)
    return env


def test_default_file_sets_nothing_but_shows_every_variable():
    text = DEFAULT.read_text()
    assert environment_file(text) == {}
    for name in VARIABLES:
        lines = [line for line in text.splitlines() if line.startswith(f"#KAMSTRUP_{name}=")]
        assert len(lines) == 1, name
        # and a comment above it explains it
        before = text.split(lines[0])[0].rstrip().splitlines()[-1]
        assert before.startswith("# ") and len(before) > 10, name


def test_default_file_uncommented_drives_the_tool(tmp_path):
    """Uncomment every example and run the real tool with it on a simulated bus."""
    uncommented = re.sub(r"^#(KAMSTRUP_\w+=)", r"\1", DEFAULT.read_text(), flags=re.M)
    env = environment_file(uncommented)
    assert sorted(env) == sorted(f"KAMSTRUP_{n}" for n in VARIABLES)
    out = tmp_path / "kamstrup.prom"
    env["KAMSTRUP_OUTPUT"] = str(out)
    env["KAMSTRUP_CAPTURE"] = str(tmp_path / "capture.hex")
    del env["KAMSTRUP_PORT"]  # the simulator sets it to its pty
    addresses = env["KAMSTRUP_ADDRESS"].split()
    meters = [f"303:{a}:{71234560 + i}" for i, a in enumerate(addresses)]
    proc = run_simulated_read(meters=meters, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # every name in the file is one the tool reads: no warning
    samples = parse_exposition(out.read_text())
    up = {lb for n, lb, v in samples if n == "kamstrup_up" and v == 1}
    labels = "".join(
        f',{k}="{v}"' for k, v in (kv.split("=", 1) for kv in shlex.split(env["KAMSTRUP_LABEL"]))
    )
    bus = env["KAMSTRUP_BUS"]
    assert up == {
        f'{{address="{a}",bus="{bus}",meter="{71234560 + i}"{labels}}}'
        for i, a in enumerate(addresses)
    }
    assert "boiler room" in labels  # the example's quoted blank survived both parsers
    comments = [line for line in (tmp_path / "capture.hex").read_text().splitlines()
                if line.startswith("# ")]  # fmt: skip
    assert [re.search(r" address (\d+) ", c).group(1) for c in comments] == addresses
