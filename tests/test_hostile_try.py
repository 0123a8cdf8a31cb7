"""Breaks found by trying the tool as a hostile user would (issue 16's closing hour)."""

from __future__ import annotations

import os

try:
    from test_settings import hand_run, live_config
except ImportError:  # tests/ imported as a package
    from tests.test_settings import hand_run, live_config


def test_a_kmp_hand_run_blames_the_protocol_not_the_configurations_addresses(tmp_path):
    """`--protocol kmp` by hand on an M-Bus configuration said '--protocol and
    KAMSTRUP_ADDRESS in .../kamstrup are not the configuration's': the file's own
    addresses blamed as not the file's."""
    config, live = live_config(tmp_path)
    done = hand_run(config, "--protocol", "kmp", "--retries", "0")
    assert not live.exists()
    said = [line for line in done.stderr.decode().splitlines() if "configuration's" in line]
    assert len(said) == 1, done.stderr
    assert ": --protocol is not the configuration's (" in said[0], said
    assert sorted(os.listdir(live.parent)) == []
