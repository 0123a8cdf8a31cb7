"""The benchmark script still runs and prints its six tables (figures are not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tools import require_tool

TOP = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_quick_run_prints_every_table():
    require_tool("/usr/bin/time")
    done = subprocess.run(
        [
            sys.executable,
            str(TOP / "bench" / "run.py"),
            "--quick",
            "--seconds",
            "0.2",
            "--without-pymeterbus",
            "--without-pykmp",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for heading in ("## 1. One read", "## 2. CPU and memory", "## 3. Decoding", "## 4. Many",
                    "## 5. Finding meters", "## 6. One read through the optical eye"):  # fmt: skip
        assert heading in out
    rows = [line for line in out.splitlines() if line.startswith("| kamstrup")]
    assert len(rows) == 4, out
    many = [line for line in out.splitlines() if line.startswith("| 3 |")]
    assert len(many) == 1, out
    secondary = [line for line in out.splitlines() if line.startswith("| --scan-secondary")]
    assert len(secondary) == 1 and "| 9600 |" in secondary[0], out
    eye = table_6(out)
    assert [name.split(":")[0] for name in eye] == [
        "wire floor",
        "kamstrup_textfile.py --once --protocol kmp",
    ], out


def table_6(out: str) -> dict:
    """Table 6's rows, name -> cells, each row checked for its form: the floors have a
    read time and no wall time, the reads both; every ratio ends in x; 2 requests."""
    lines = out.split("## 6. One read through the optical eye (KMP)")[1].splitlines()
    table = [line for line in lines if line.startswith("| ")]
    assert table[0] == ("| what | wall s | read s | read / wire floor | requests |"), out
    assert table[1] == "| --- | ---: | ---: | ---: | ---: |", out
    rows = {}
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 5, line
        name, wall, read, to_wire, requests = cells
        assert (wall == "") == ("floor" in name), line
        for figure in (wall, read):
            assert figure == "" or float(figure) > 0, line
        assert to_wire.endswith("x") and float(to_wire[:-1]) > 0, line
        assert requests == "2", line
        rows[name] = cells
    assert "kamstrup_read_duration_seconds" in out
    return rows


@pytest.mark.slow
def test_bench_runs_table_6_alone_with_pykmp_beside_ours():
    """--table 6: only the optical eye's table, PyKMP's read of the same registers in it
    (PyKMP is installed into bench/.venv-pykmp if missing, as test_kmp_pykmp does)."""
    done = subprocess.run(
        [sys.executable, str(TOP / "bench" / "run.py"), "--quick", "--table", "6"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert [line for line in out.splitlines() if line.startswith("## ")] == [
        "## 6. One read through the optical eye (KMP) over a pty at 1200 baud, median of 1"
    ], out
    names = list(table_6(out))
    assert names[1:] == [
        "kamstrup_textfile.py --once --protocol kmp",
        "PyKMP 0.0.2, GetRegister of the same 8 + 2 registers",
    ], out
