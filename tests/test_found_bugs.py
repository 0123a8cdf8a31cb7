"""Tests that fail because of product bugs found while writing the bus/CLI/textfile tests.

Kept apart so the rest of the suite stays green; each test says what is wrong and
where.  Move a test to its proper file once the bug is fixed.
"""

from __future__ import annotations

import os

import kamstrup_sim as sim
import kamstrup_textfile as kt


def test_secondary_address_read_when_no_meter_is_selected_yet():
    """kamstrup_textfile.Bus.read: SND_NKE to 253 is answered only by a *selected* slave
    (EN 13757-2/-3; libmbus sends it without waiting for E5).  Bus.read requires an E5,
    so a secondary read on a bus where no meter is selected yet (every first read, e.g.
    after a power cycle) fails with "SND_NKE: no answer" before the select frame is
    even sent.  It should send SND_NKE to 253, tolerate silence, then select.
    """
    meter = sim.Meter(address=48, ident="30303030")
    port = sim.FakePort(sim.SimulatedBus([meter]), timeout=0.001)
    bus = kt.Bus(port, timeout=0.05, retries=0, pause=0)
    telegram = bus.read("30303030")
    assert telegram.id == "30303030"
    assert kt.select_secondary("30303030") in bytes(port.written)


def test_temporary_left_with_our_own_pid_does_not_block_the_write(tmp_path):
    """kamstrup_textfile.write_atomic / _remove_stale_temporaries: the temporary file is
    ``.NAME.<pid>.tmp`` opened with O_EXCL, and the stale-file sweep skips our own pid.
    When a SIGKILLed run's leftover has the pid this run got (pids are reused, e.g. after
    a reboot or in a container), the run fails with "cannot write into DIR: File exists"
    and leaves the stale file.  A file with our own pid cannot belong to a live writer:
    it should be removed (or opened with O_TRUNC) and the write succeed.
    """
    out = tmp_path / "kamstrup.prom"
    (tmp_path / f".kamstrup.prom.{os.getpid()}.tmp").write_text("left by a killed run")
    kt._emit("kamstrup_up 1\n", str(out))
    assert out.read_text() == "kamstrup_up 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["kamstrup.prom"]


def test_last_success_kept_when_a_label_value_has_a_brace(tmp_path):
    """kamstrup_textfile.previous_last_success: the regex ``address="..."[^}]*\\}`` stops at
    the first ``}``, so with ``--label 'note=a}b'`` (a legal label value) the previous
    last-success timestamps are never found and a failed run drops them.  It should parse
    label values (quoted, with escapes) instead of scanning for ``}``.
    """
    reading = kt.Reading(74, kt.decode_telegram(bytes.fromhex(sim.FRAMES["403"])))
    text = kt.exposition([reading], (("note", "a}b"),))
    out = tmp_path / "kamstrup.prom"
    out.write_text(text)
    assert 'kamstrup_last_success_timestamp_seconds{address="74",note="a}b"}' in text
    assert set(kt.previous_last_success(str(out))) == {"74"}
