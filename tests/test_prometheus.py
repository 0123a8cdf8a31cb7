"""The .prom files against Prometheus' own tools: promtool's linter and node_exporter 1.5.0.

Both tools are required (tests/install-tools.sh installs them); a missing tool fails.
"""

from __future__ import annotations

import http.client
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from corpus import KAMSTRUP, LIBMBUS
from tools import require_tool

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TOOL = str(ROOT / "kamstrup_textfile.py")
SIM = str(ROOT / "kamstrup_sim.py")
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
CORPUS = sorted(KAMSTRUP.glob("*.hex"))

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def decode(out: Path, *frames: Path, labels=()) -> Path:
    args = [sys.executable, TOOL, "--decode", "-", "--output", str(out)]
    for label in labels:
        args += ["--label", label]
    text = "\n".join(f.read_text() for f in frames)
    result = subprocess.run(args, input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return out


def promtool_check(path: Path) -> subprocess.CompletedProcess:
    promtool = require_tool("promtool")
    with open(path, "rb") as f:
        return subprocess.run(
            [promtool, "check", "metrics"], stdin=f, capture_output=True, text=True, timeout=60
        )


def samples(text: str) -> dict:
    """(name, frozenset of label pairs) -> float, from an exposition text."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, line
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(found: dict, name: str, **labels) -> float:
    return found[(name, frozenset(labels.items()))]


# --- promtool --------------------------------------------------------------------------


@pytest.mark.parametrize("frame", CORPUS, ids=[f.stem for f in CORPUS])
def test_promtool_accepts_each_corpus_meter(tmp_path, frame):
    result = promtool_check(decode(tmp_path / "k.prom", frame))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def test_promtool_accepts_all_corpus_meters_in_one_file(tmp_path):
    path = decode(tmp_path / "k.prom", *CORPUS, labels=["location=x"])
    assert path.read_text().count("kamstrup_up{") == len(CORPUS)
    result = promtool_check(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_every_libmbus_meter_in_one_file(tmp_path):
    """The generic rule on 76 other meters' records: names promtool's lint accepts
    (units, _total only on counters, no 'counter' in a name), no clashing series."""
    frames = sorted((LIBMBUS / "test-frames").glob("*.hex"))
    path = decode(tmp_path / "k.prom", *frames, labels=["location=x"])
    text = path.read_text()
    assert "kamstrup_resets_total{" in text  # FD 60, the EMU meter's reset counter
    result = promtool_check(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def test_promtool_accepts_a_run_with_a_failed_meter(tmp_path):
    out = tmp_path / "k.prom"
    cmd = [sys.executable, SIM, "--meter", "303:48", "--meter", "403:74:77447744", "--"]
    cmd += [sys.executable, TOOL, "--once", "--address", "48", "--address", "5"]
    cmd += ["--address", "74", "--timeout", "0.2", "--retries", "0", "--label", "location=x"]
    cmd += ["--output", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    text = out.read_text()
    assert 'kamstrup_up{address="5",bus="k",location="x"} 0\n' in text
    assert 'kamstrup_up{address="74",bus="k",meter="77447744",location="x"} 1\n' in text
    result = promtool_check(out)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rejects_a_repeated_help(tmp_path):
    """The check above can fail: promtool refuses the original exporter's README output."""
    bad = tmp_path / "bad.prom"
    bad.write_text(
        "# HELP kamstrup_temperature_celcius t1\n# TYPE kamstrup_temperature_celcius gauge\n"
        "kamstrup_temperature_celcius 29.3\n"
        "# HELP kamstrup_temperature_celcius t2\n# TYPE kamstrup_temperature_celcius gauge\n"
        "kamstrup_temperature_celcius 28.2\n"
    )
    assert promtool_check(bad).returncode != 0


# --- node_exporter's textfile collector ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode("utf-8")


def wait_for(url: str, proc: subprocess.Popen) -> str:
    for _ in range(200):  # bounded: at most ~10 s
        if proc.poll() is not None:
            raise AssertionError(f"node_exporter exited with {proc.returncode}")
        try:
            return scrape(url)
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            time.sleep(0.05)
    raise AssertionError("node_exporter did not answer within 10 s")


def test_node_exporter_serves_our_file(tmp_path):
    exporter = require_tool(NODE_EXPORTER)
    directory = tmp_path / "textfile"
    directory.mkdir()
    prom = decode(directory / "kamstrup.prom", *CORPUS, labels=["location=cellar"])
    (directory / ".kamstrup.prom.999999.tmp").write_text("half a file {{{\n")  # ignored
    for _ in range(3):  # the port found free may be taken before node_exporter binds it
        port = free_port()
        url = f"http://127.0.0.1:{port}/metrics"
        proc = subprocess.Popen(
            [
                exporter,
                f"--web.listen-address=127.0.0.1:{port}",
                "--collector.disable-defaults",
                "--collector.textfile",
                f"--collector.textfile.directory={directory}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            first = wait_for(url, proc)
            break
        except AssertionError:
            if proc.poll() is None or "address already in use" not in proc.stderr.read():
                proc.kill()
                proc.wait(timeout=10)
                raise
    else:  # three ports taken in a row: say so, not UnboundLocalError on `first`
        raise AssertionError("node_exporter found its port taken 3 times")
    try:
        found = samples(first)
        where = {"location": "cellar"}
        meter = {"meter": "30303030", **where}
        assert value(found, "node_textfile_scrape_error") == 0
        mtimes = [k for k in found if k[0] == "node_textfile_mtime_seconds"]
        assert len(mtimes) == 1
        assert dict(mtimes[0][1])["file"].endswith("/kamstrup.prom")
        assert found[mtimes[0]] == int(prom.stat().st_mtime)
        assert value(found, "kamstrup_energy_joules_total", **meter) == 554400000
        assert value(found, "kamstrup_volume_cubic_meters_total", **meter) == 39.49
        assert value(found, "kamstrup_on_time_seconds_total", **meter) == 9709200
        assert value(found, "kamstrup_temperature_celsius", sensor="flow", **meter) == 29.3
        assert value(found, "kamstrup_temperature_celsius", sensor="return", **meter) == 28.2
        assert value(found, "kamstrup_temperature_difference_kelvin", **meter) == 1.1
        assert value(found, "kamstrup_power_watts", **meter) == 1400
        flow = value(found, "kamstrup_volume_flow_cubic_meters_per_second", **meter)
        assert flow == 1128 / 3600000
        assert value(found, "kamstrup_info_code", **meter) == 0
        heat = {"meter": "82937133", **where}
        assert value(found, "kamstrup_info_flag", flag="v1_air", **heat) == 1
        serials = {"48": "30303030", "133": "82937133", "74": "77447744", "230": "32323232",
                   "183": "67211183"}  # fmt: skip
        for address, serial in serials.items():
            up = {"address": address, "bus": "kamstrup", "meter": serial, **where}
            assert value(found, "kamstrup_up", **up) == 1
        ours = [k for k in found if k[0].startswith("kamstrup_")]
        assert len(ours) == len(samples(prom.read_text()))  # nothing dropped as a duplicate

        # a broken file next to ours: node_exporter says so, and still serves ours
        (directory / "broken.prom").write_text("kamstrup_x 1 2 3\n")
        found = samples(scrape(url))
        assert value(found, "node_textfile_scrape_error") == 1
        assert value(found, "kamstrup_energy_joules_total", **meter) == 554400000
    finally:
        proc.terminate()
        proc.wait(timeout=10)
