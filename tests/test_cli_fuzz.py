"""The command line under hypothesis: options and environment a user (or a typo, or an
EnvironmentFile in the wrong encoding) can give, and outputs that cannot be written.

One invariant for every run:

- exit 2 with one usage line on stderr, and nothing written; or
- exit 0 and a file node_exporter accepts (our strict parser here; promtool check
  metrics as well in the slow group); or
- exit 1 with one line on stderr, and the old file untouched, no temporary left.

The meter is a healthy simulated one in simulated time, so a run costs milliseconds.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_textfile import parse_prom
from tools import SimTime, invoke, require_tool

import kamstrup_mbus as mbus
import kamstrup_sim as sim
import kamstrup_textfile as kt

OLD = b'# HELP kamstrup_up old\n# TYPE kamstrup_up gauge\nkamstrup_up{address="48"} 1\n'

label_names = st.one_of(
    st.sampled_from(["site", "location", "building_2", "_x"]),  # fine
    st.sampled_from(sorted(kt.RESERVED_LABELS)),  # the tool's own
    st.sampled_from(["9bad", "", "__name__", "a-b", "ü", "a b"]),  # not label names
    st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,8}", fullmatch=True),
)
# any bytes, as they arrive from argv or an EnvironmentFile (surrogates when not UTF-8);
# no NUL, which neither argv nor the environment can carry
label_values = (st.binary(max_size=12).map(os.fsdecode) | st.text(max_size=12)).map(
    lambda text: text.replace("\x00", "")
)
labels = st.lists(st.tuples(label_names, label_values), max_size=3)

addresses = st.one_of(
    st.sampled_from(["48", "254", "30303030", "048"]),  # the meter answers these
    st.sampled_from(["251", "255", "-1", "1234567", "x", "", "4 8"]),  # usage errors
)
OUTPUTS = ("new", "old", "directory", "dangling link", "read-only", "/dev/full", "fifo",
           "missing directory", "stdout")  # fmt: skip


@pytest.fixture(scope="module")
def read_only_dir(tmp_path_factory):
    """A read-only file system holding an old .prom (root may write anywhere else)."""
    path = tmp_path_factory.mktemp("ro")
    mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.fail("cannot mount a tmpfs: the tests run as root (see README)")
    try:
        (path / "kamstrup.prom").write_bytes(OLD)
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def prepare(kind: str, base: Path, read_only: Path) -> tuple:
    """(the --output argument, the path whose bytes must stay as they were on failure)."""
    if kind == "stdout":
        return "-", None
    if kind == "new":
        return str(base / "kamstrup.prom"), base / "kamstrup.prom"
    if kind == "old":
        (base / "kamstrup.prom").write_bytes(OLD)
        return str(base / "kamstrup.prom"), base / "kamstrup.prom"
    if kind == "directory":
        (base / "kamstrup.prom").mkdir()
        return str(base / "kamstrup.prom"), base / "kamstrup.prom"
    if kind == "dangling link":
        (base / "kamstrup.prom").symlink_to(base / "target.prom")
        return str(base / "kamstrup.prom"), base / "target.prom"
    if kind == "read-only":
        return str(read_only / "kamstrup.prom"), read_only / "kamstrup.prom"
    if kind == "/dev/full":
        return "/dev/full", Path("/dev/full")
    if kind == "fifo":
        os.mkfifo(base / "kamstrup.prom")
        return str(base / "kamstrup.prom"), base / "kamstrup.prom"
    if kind == "missing directory":
        return str(base / "nowhere" / "kamstrup.prom"), base / "nowhere"
    raise AssertionError(kind)


def snapshot(path: Path | None):
    if path is None or not os.path.lexists(path):
        return None
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_dir():
        return ("dir", sorted(p.name for p in path.iterdir()))
    if path.is_file():
        return ("file", path.read_bytes())
    return ("node", path.stat().st_mode, path.stat().st_rdev)


def fuzz_run(monkeypatch, base, read_only, label_list, via_env, address, fmt, output_kind):
    clock = sim.SimClock()
    meter = sim.Meter(address=48)
    monkeypatch.setattr(kt, "time", SimTime(clock))
    monkeypatch.setattr(mbus, "time", SimTime(clock))
    monkeypatch.setattr(
        kt,
        "open_port",
        lambda url, baudrate: sim.FakePort(
            sim.SimulatedBus([meter]), timeout=mbus.READ_SLICE, clock=clock
        ),
    )
    output, watched = prepare(output_kind, base, read_only)
    before = snapshot(watched)
    args = ["--once", "--output", output, "--format", fmt, "--address", address]
    env = {}
    pairs = [f"{name}={value}" for name, value in label_list]
    if via_env:
        env["KAMSTRUP_LABEL"] = " ".join(pairs)
    else:
        for pair in pairs:
            args += ["--label", pair]
    result = invoke(args, env=env)
    leftovers = [p for p in base.rglob("*.tmp")]
    return result, output, watched, before, leftovers


def check(result, output, watched, before, leftovers, fmt) -> str | None:
    """The invariant; returns the text written (for promtool), if any."""
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert leftovers == []
    if result.exit_code == 2:
        assert len(lines) == 1, result.stderr
        assert lines[0].endswith("--help)")
        assert snapshot(watched) == before
        assert result.stdout == ""
        return None
    if result.exit_code == 1:
        assert len(lines) == 1, result.stderr
        assert snapshot(watched) == before
        return None
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    if output == "-":
        text = result.stdout
    else:  # as bytes: read_text would turn a \r in a label value into a line break
        text = Path(os.path.realpath(output)).read_bytes().decode("utf-8")
    if fmt == "json":
        assert json.loads(text)["meters"][0]["id"] == "30303030"
        return None
    families = parse_prom(text)
    assert families["kamstrup_up"]["samples"][0][1] == "1"
    return text


FUZZ = dict(
    label_list=labels,
    via_env=st.booleans(),
    address=addresses,
    fmt=st.sampled_from(["prom", "json"]),
    output_kind=st.sampled_from(OUTPUTS),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(**FUZZ)
def test_cli_fuzz(label_list, via_env, address, fmt, output_kind, monkeypatch,
                  tmp_path_factory, read_only_dir):  # fmt: skip
    base = tmp_path_factory.mktemp("fuzz")
    with monkeypatch.context() as m:
        outcome = fuzz_run(m, base, read_only_dir, label_list, via_env, address, fmt,
                           output_kind)  # fmt: skip
    check(*outcome, fmt)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(**FUZZ)
def test_cli_fuzz_files_pass_promtool(label_list, via_env, address, fmt, output_kind,
                                      monkeypatch, tmp_path_factory, read_only_dir):  # fmt: skip
    promtool = require_tool("promtool")
    base = tmp_path_factory.mktemp("fuzz")
    with monkeypatch.context() as m:
        outcome = fuzz_run(m, base, read_only_dir, label_list, via_env, address, "prom",
                           output_kind)  # fmt: skip
    text = check(*outcome, "prom")
    if text is not None:
        checked = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True
        )
        report = checked.stdout + checked.stderr
        if checked.returncode == 3:  # lint only: a user's label name that is not snake_case
            assert any(name != name.lower() for name, _ in label_list), report
            for line in report.splitlines():
                assert line.endswith("label names should be written in 'snake_case' not "
                                     "'camelCase'"), report  # fmt: skip
        else:
            assert checked.returncode == 0, report  # 1 would be a file node_exporter drops


def test_the_fuzz_reaches_each_outcome(monkeypatch, tmp_path, read_only_dir):
    """The three outcomes are all reachable (so the invariant is not vacuous)."""
    seen = {}
    for i, (label_list, output_kind) in enumerate(
        [([("site", "a")], "new"), ([("site", "a"), ("site", "b")], "new"),
         ([("site", "a")], "directory"), ([("site", "\udcf8")], "old"),
         ([], "read-only"), ([], "/dev/full"), ([], "fifo"), ([], "dangling link")]
    ):  # fmt: skip
        base = tmp_path / str(i)
        base.mkdir()
        with monkeypatch.context() as m:
            outcome = fuzz_run(m, base, read_only_dir, label_list, False, "48", "prom",
                               output_kind)  # fmt: skip
        check(*outcome, "prom")
        seen[(tuple(label_list), output_kind)] = outcome[0].exit_code
    assert sorted(set(seen.values())) == [0, 1, 2]
    assert seen[((("site", "a"),), "directory")] == 1
    assert seen[((), "read-only")] == 1
    assert seen[((("site", "\udcf8"),), "old")] == 2
    assert seen[((), "dangling link")] == 0
