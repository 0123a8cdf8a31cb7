"""The benchmark script still runs and prints its four tables (figures are not asserted)."""

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
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for heading in ("## 1. One read", "## 2. CPU and memory", "## 3. Decoding", "## 4. Many",
                    "## 5. Finding meters"):  # fmt: skip
        assert heading in out
    rows = [line for line in out.splitlines() if line.startswith("| kamstrup")]
    assert len(rows) == 3, out
    many = [line for line in out.splitlines() if line.startswith("| 3 |")]
    assert len(many) == 1, out
    secondary = [line for line in out.splitlines() if line.startswith("| --scan-secondary")]
    assert len(secondary) == 1 and "| 9600 |" in secondary[0], out
