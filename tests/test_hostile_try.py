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


def test_an_output_node_exporter_never_reads_is_said(tmp_path):
    """KAMSTRUP_OUTPUT=/var/lib/prometheus/node-exporter/kamstrup (no .prom, or .txt):
    written every 15 minutes, exit 0, and node_exporter never reads it (it takes *.prom
    only): the trailing-space case of issue 16 item 5 in another form."""
    config, live = live_config(tmp_path)
    other = live.parent / "kamstrup"
    config.write_text(config.read_text().replace(str(live), str(other)))
    done = hand_run(config)
    assert done.returncode == 0, done.stderr
    assert other.exists()
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert f"KAMSTRUP_OUTPUT in {config}: {other} does not end in .prom" in lines[0], lines
    assert "node_exporter" in lines[0]
