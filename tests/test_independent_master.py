"""An independent master reads our simulator, so that our tool and our simulator cannot
share a misunderstanding of the protocol: pyMeterBus (PyPI, test-only, in a venv of its
own) by primary and by secondary address, through a pty."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

import kamstrup_sim as sim
import kamstrup_textfile as kt

pytestmark = pytest.mark.slow

TOP = Path(__file__).resolve().parent.parent
MASTER = str(TOP / "tests" / "pymeterbus_master.py")


@pytest.fixture(scope="module")
def pymeterbus() -> str:
    """The python of bench/.venv-pymeterbus (made with pyMeterBus 0.8.5 if missing)."""
    spec = importlib.util.spec_from_file_location("bench_run", TOP / "bench" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    python = bench.pymeterbus_python()
    if python is None:
        pytest.fail("pyMeterBus 0.8.5 could not be installed from PyPI into bench/")
    return python


def master(python: str, line, how: str, address: str) -> dict:
    done = subprocess.run([python, MASTER, line.path, how, address], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def our_values(kind: str, ident: str) -> list:
    """What our decoder makes of the same answer: the raw numbers pyMeterBus reports."""
    frame = sim.rewrite(bytes.fromhex(sim.FRAMES[kind]), None, ident)
    return kt.decode_telegram(frame)


@pytest.mark.parametrize("how", ["primary", "secondary"])
def test_pymeterbus_reads_the_simulator(pymeterbus, how):
    meters = [
        sim.Meter(address=48, ident="82937133", kind="303"),
        sim.Meter(address=74, ident="77447744", kind="403"),
    ]
    bus = sim.SimulatedBus(meters)
    line = sim.PtyLine(bus, pace=True)
    try:
        address = "48" if how == "primary" else "82937133FFFFFFFF"
        got = master(pymeterbus, line, how, address)
    finally:
        line.close()
    assert got["ack"] == "e5"
    assert got["id"] == "82937133"
    assert got["manufacturer"] == "KAM"
    ours = our_values("303", "82937133").records
    # pyMeterBus keeps the meter's units: energy in Wh, volume in m3, hours, 0.01 degC ...
    assert got["values"][0] == ours[0].value / 3600  # 154 kWh
    assert abs(got["values"][2] - ours[2].value) < 1e-9  # 39.49 m3
    if how == "secondary":
        select = [frame for frame in bus.log if frame[0] == 0x68][0]
        assert select[4] == 0x73  # SND_UD with the FCB set: the simulator takes it
        assert meters[0].selected and not meters[1].selected
    else:
        assert [frame.hex() for frame in bus.log] == ["1040307016", "105b308b16"]
