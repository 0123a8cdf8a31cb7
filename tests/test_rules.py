"""promtool checks of the alerting and recording rules in rules/."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

try:
    from tools import ROOT, require_tool
except ImportError:  # tests/ imported as a package
    from tests.tools import ROOT, require_tool

RULES_DIR = ROOT / "rules"
ALERTS = RULES_DIR / "kamstrup.rules.yml"
LEGACY = RULES_DIR / "kamstrup-legacy.rules.yml"
RULE_FILES = [ALERTS, LEGACY]
TEST_FILES = [RULES_DIR / "kamstrup.rules.test.yml", RULES_DIR / "kamstrup-legacy.rules.test.yml"]

# What kamstrup_textfile writes (plus node_exporter's own textfile metrics).
OUR_METRICS = {
    "kamstrup_energy_joules_total",
    "kamstrup_volume_cubic_meters_total",
    "kamstrup_on_time_seconds_total",
    "kamstrup_temperature_celsius",
    "kamstrup_temperature_difference_kelvin",
    "kamstrup_power_watts",
    "kamstrup_volume_flow_cubic_meters_per_second",
    "kamstrup_info_code",
    "kamstrup_info_flag",
    "kamstrup_cooling_energy_joules_total",
    "kamstrup_e8_cubic_meters_celsius_total",
    "kamstrup_e9_cubic_meters_celsius_total",
    "kamstrup_error_on_time_seconds_total",
    "kamstrup_max_power_watts",
    "kamstrup_max_volume_flow_cubic_meters_per_second",
    "kamstrup_up",
    "kamstrup_read_duration_seconds",
    "kamstrup_meter_info",
    "kamstrup_last_success_timestamp_seconds",
    "node_textfile_mtime_seconds",
    "node_textfile_scrape_error",
}

# The old prometheus-mbus-exporter's names (see rules/kamstrup-legacy.rules.yml).
OLD_NAMES = {
    "kamstrup_energy_kwh_total",
    "kamstrup_volume_m3_total",
    "kamstrup_on_time_hours_total",
    "kamstrup_temperature_celcius",
    "kamstrup_power_w",
    "kamstrup_volume_flow_l_h",
}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_tool("promtool"), *args], capture_output=True, text=True, cwd=cwd
    )


def alert_exprs(text: str) -> dict[str, str]:
    """{alert name: expr} of a rules file (single-line exprs, as ours are)."""
    found = dict(re.findall(r"- alert: (\w+)\n(?:\s+#.*\n)*\s+expr: (.+)\n", text))
    assert len(found) == text.count("- alert:"), "every alert's expr must follow its name"
    return found


def all_exprs(text: str) -> list[str]:
    """Every expr: of a rules file, block scalars (>-) included."""
    exprs: list[str] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)(?:- )?expr: (.*)$", line)
        if not m:
            continue
        indent, value = len(m.group(1)), m.group(2)
        if value in (">-", ">", "|", "|-"):
            body = []
            for more in lines[i + 1 :]:
                if more.strip() and len(more) - len(more.lstrip()) <= indent:
                    break
                body.append(more.strip())
            value = " ".join(body)
        exprs.append(value)
    return exprs


def records(text: str) -> list[str]:
    return re.findall(r"- record: (\w+)", text)


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b((?:kamstrup|node)_[a-z0-9_]+)\b", expr))
    return names


def stage(tmp_path: Path) -> Path:
    d = tmp_path / "rules"
    shutil.copytree(RULES_DIR, d)
    return d


# --------------------------------------------------------------------------


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_promtool_check_rules(path):
    proc = promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_check_rules_rejects_a_bad_expression(tmp_path):
    d = stage(tmp_path)
    text = ALERTS.read_text().replace("kamstrup_up == 0", "kamstrup_up == == 0")
    (d / ALERTS.name).write_text(text)
    proc = promtool("check", "rules", str(d / ALERTS.name))
    assert proc.returncode != 0


@pytest.mark.parametrize("path", TEST_FILES, ids=lambda p: p.name)
def test_promtool_test_rules(path):
    proc = promtool("test", "rules", path.name, cwd=path.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_case_where_it_fires(tmp_path):
    """An alert that never fires makes the unit tests fail."""
    names = alert_exprs(ALERTS.read_text())
    for name, expr in names.items():
        d = stage(tmp_path / name)
        mutant = ALERTS.read_text().replace(f"expr: {expr}\n", "expr: vector(1) == 0\n", 1)
        assert mutant != ALERTS.read_text()
        (d / ALERTS.name).write_text(mutant)
        proc = promtool("test", "rules", "kamstrup.rules.test.yml", cwd=d)
        assert proc.returncode != 0, f"{name} never fires and yet the tests pass"
        assert f"alertname: {name}," in proc.stdout + proc.stderr


def test_every_alert_has_a_case_where_it_stays_quiet(tmp_path):
    """An alert that fires on everything makes the unit tests fail."""
    everything = '{__name__=~"kamstrup_.+|node_.+"} or vector(1)'
    names = alert_exprs(ALERTS.read_text())
    for name, expr in names.items():
        d = stage(tmp_path / name)
        text = ALERTS.read_text().replace(f"expr: {expr}\n", f"expr: '{everything}'\n", 1)
        # without its `for:` as well, so that the alert fires at once
        text = re.sub(rf"(- alert: {name}\n(?:.*\n)*?)\s+for: \w+\n", r"\1", text, count=1)
        (d / ALERTS.name).write_text(text)
        proc = promtool("test", "rules", "kamstrup.rules.test.yml", cwd=d)
        assert proc.returncode != 0, f"{name} firing on anything goes unnoticed"
        assert f"alertname: {name}," in proc.stdout + proc.stderr


def test_alerts_cover_the_required_subjects():
    exprs = alert_exprs(ALERTS.read_text())
    joined = "\n".join(exprs.values())
    assert "kamstrup_up == 0" in exprs.values()
    assert any(
        "time() - node_textfile_mtime_seconds" in e and "kamstrup.prom" in e for e in exprs.values()
    )
    assert any(e.startswith("absent(node_textfile_mtime_seconds") for e in exprs.values())
    for flag in ('flag=~".*leak.*"', 'flag=~".*burst.*"', 'flag=~".*air.*"', 'flag="low_battery"'):
        assert flag in joined, flag
    (temperature,) = [e for e in exprs.values() if "t1_above_range" in e]
    for flag in (
        "t2_above_range",
        "t1_below_range",
        "t2_below_range",
        "invalid_temperature_difference",
    ):
        assert flag in temperature


def test_rules_use_only_metrics_the_tool_writes():
    for path in RULE_FILES:
        exprs = all_exprs(path.read_text())
        assert len(exprs) == path.read_text().count("expr:")
        used = set().union(*map(metric_names, exprs))
        used -= OLD_NAMES | {"kamstrump_" + n[len("kamstrup_") :] for n in OLD_NAMES}
        assert used <= OUR_METRICS, f"{path.name}: {sorted(used - OUR_METRICS)}"
        assert used, path.name


def test_legacy_rules_record_every_old_name():
    recorded = set(records(LEGACY.read_text()))
    assert OLD_NAMES <= recorded
    assert "kamstrup_temperature_celcius" in recorded  # the old typo, on purpose
    assert not recorded & OUR_METRICS
