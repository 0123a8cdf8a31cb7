"""Tests that fail because of product bugs found while writing the bus/CLI/textfile tests.

Kept apart so the rest of the suite stays green; each test says what is wrong and
where.  Move a test to its proper file once the bug is fixed.
"""

from __future__ import annotations

import kamstrup_sim as sim
import kamstrup_textfile as kt


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
