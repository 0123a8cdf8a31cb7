"""An independent KMP client reads our simulated meter, so that our reader and our
simulator cannot share a misunderstanding of the protocol: PyKMP 0.0.2 (PyPI, test-only,
in a venv of its own: it needs Python >= 3.10, and CI also runs on 3.9).  Where PyKMP gets
the protocol wrong, the tests say so rather than follow it."""

from __future__ import annotations

import json
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest

import kamstrup_kmp as kmp

pytestmark = pytest.mark.slow

TOP = Path(__file__).resolve().parent.parent
CLIENT = str(TOP / "tests" / "pykmp_client.py")


@pytest.fixture(scope="module")
def pykmp() -> str:
    """The python of bench/.venv-pykmp, as the benchmark makes it (bench/run.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", TOP / "bench" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    python = bench.pykmp_python()
    if python is None:
        pytest.fail("pykmp 0.0.2 could not be installed (its pip said why, above)")
    return python


def client(python: str, what: str, answer: bytes, ids) -> dict:
    done = subprocess.run([python, CLIENT, what, answer.hex(), *map(str, ids)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_pykmp_decodes_what_our_meter_sends(pykmp):
    meter = kmp.SimulatedKmpMeter()
    for ids in kmp.read_plan():
        answer = meter.answer(kmp.get_register_request(ids))
        got = client(pykmp, "decode", answer, ids)
        ours = {str(r.id): [r.unit_code, str(r.exact)] for r in meter.registers(ids)}
        assert got == {"registers": ours}
    assert client(pykmp, "decode", meter.answer(kmp.get_register_request([60])), [60]) == {
        "registers": {"60": [2, "154"]}
    }


def test_pykmp_undoes_stuffing_wrongly_where_we_do_not(pykmp):
    """A value whose bytes are 1B F2 is sent 1B E4 F2.  PyKMP 0.0.2 undoes stuffing with
    one replace() per stuffed byte: 1B E4 -> 1B first, then 1B F2 -> 0D, and reports a
    CRC error on a good frame.  We undo it in one pass."""
    meter = kmp.SimulatedKmpMeter({kmp.ENERGY_E1: (0x02, str(0x00001BF2))})
    answer = meter.answer(kmp.get_register_request([60]))
    assert bytes.fromhex("1BE4F2") in answer
    assert kmp.parse_registers(kmp.parse_frame(answer))[60].exact == 0x1BF2
    got = client(pykmp, "decode", answer, [60])
    assert got["error"] == "CrcChecksumInvalidError"


def test_pykmp_takes_the_echo_for_the_answer_where_we_skip_it(pykmp):
    """Many IR heads reflect the request.  PyKMP 0.0.2 reads to the first 0D, which is the
    echo's, and fails on its start byte 80; we skip what comes before the 40."""
    meter = kmp.SimulatedKmpMeter()
    answer = meter.answer(kmp.get_register_request([60]))
    got = client(pykmp, "echo", answer, [60])
    assert got["error"] == "BoundaryByteInvalidError"
    assert "got 128 (hex: 80)" in got["message"]
    # the same line for our reader: the echo, then the answer
    echoed = kmp.get_register_request([60]) + answer
    assert kmp.find_answer(echoed) == (answer, len(echoed))
    assert kmp.parse_registers(kmp.parse_frame(answer))[60].exact == Decimal(154)
