"""promtool checks of the alerting and recording rules in rules/."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

try:
    from tools import ROOT, parse_exposition, require_tool, run_simulated_read
except ImportError:  # tests/ imported as a package
    from tests.tools import ROOT, parse_exposition, require_tool, run_simulated_read

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
    "kamstrup_host_clock_valid",
    "node_textfile_mtime_seconds",
    "node_textfile_scrape_error",
    "node_time_seconds",  # node_exporter's time collector, for the clock skew alert
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
    # staleness on Prometheus's timeline: the mtime changing between scrapes
    assert "changes(node_textfile_mtime_seconds" in exprs["KamstrupTextfileStale"]
    # absence per instance, and nowhere at all
    assert "unless on (instance) node_textfile_mtime_seconds" in exprs["KamstrupTextfileAbsent"]
    assert "absent(node_textfile_mtime_seconds" in exprs["KamstrupTextfileAbsent"]
    assert "node_textfile_scrape_error == 1" in exprs.values()
    assert "kamstrup_host_clock_valid == 0" in exprs.values()
    # MetricsGone: by the meter's serial number; by address only without one
    assert "unless on (instance, meter) kamstrup_up" in exprs["KamstrupMetricsGone"]
    assert "unless on (instance, address) kamstrup_up" in exprs["KamstrupMetricsGone"]
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


def test_no_alert_compares_the_hosts_clock_with_prometheus_but_the_skew_alert():
    """time() against a timestamp the host wrote fires on a host clock that is
    off (2 h behind: stale while fine; 2 h ahead: silent while stale)."""
    for name, expr in alert_exprs(ALERTS.read_text()).items():
        if name == "KamstrupHostClockSkew":
            assert "node_time_seconds - timestamp(node_time_seconds)" in expr
        else:
            assert "time()" not in expr and "timestamp(" not in expr, name


def test_file_matchers_take_our_files_by_name_or_path_and_no_other():
    """node_exporter 1.5 labels a file by its name, newer ones by its path; a
    second bus's kamstrup-heat.prom is ours, apt.prom or notkamstrup.prom not."""
    text = ALERTS.read_text()
    found = set(re.findall(r'node_textfile_mtime_seconds\{file=~"([^"]+)"\}', text))
    assert len(found) == 1, found
    (regex,) = found
    ours = ["kamstrup.prom", "/var/lib/prometheus/node-exporter/kamstrup.prom"]
    ours += ["kamstrup-heat.prom", "/srv/textfile/kamstrup_cooling.prom"]
    for name in ours:
        assert re.fullmatch(regex, name), name
    for name in ["apt.prom", "notkamstrup.prom", "/x/kamstrup.prom/y.prom", "kamstrup.json"]:
        assert not re.fullmatch(regex, name), name


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


# ------------------------------------------------- fed with the tool's output
# The cases below replay files that kamstrup_textfile really writes (read from
# kamstrup_sim's simulated bus), one sample a minute, through the rules with
# promtool: the label sets are the tool's, not typed by hand.

HOST = {"instance": "heat:9100", "job": "node"}
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def labels_of(text: str) -> dict[str, str]:
    """{name: value} of an exposition's '{a="b",...}' (escapes kept as written)."""
    return dict(LABEL.findall(text))


def real_read(output: Path, *addresses: str, meters=("303:48:71234567", "403:133:67434187")):
    """[(name, {labels}, value)] of the file one --once run writes at *output*."""
    output.parent.mkdir(parents=True, exist_ok=True)
    args = ["--output", str(output)]
    for address in addresses:
        args += ["--address", address]
    proc = run_simulated_read(*args, meters=meters)
    assert proc.returncode in (0, 1), proc.stderr  # 1: a meter failed, as some do here
    assert "Traceback" not in proc.stderr, proc.stderr
    return [(n, labels_of(lb), v) for n, lb, v in parse_exposition(output.read_text())]


def up(samples) -> list[dict[str, str]]:
    return [labels for name, labels, _ in samples if name == "kamstrup_up"]


def series_text(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def replay(phases) -> list[dict]:
    """promtool input series: each phase is (samples, minutes); a series is there
    (one sample a minute) in the phases whose file has it, missing ('_') in the rest.
    Samples are HOST's unless they carry an instance of their own."""
    order: list[tuple[str, tuple]] = []
    values: dict[tuple[str, tuple], list[str]] = {}
    for samples, _ in phases:
        for name, labels, _ in samples:
            key = (name, tuple(sorted({**HOST, **labels}.items())))
            if key not in values:
                order.append(key)
                values[key] = []
    for samples, minutes in phases:
        now = {(n, tuple(sorted({**HOST, **lb}.items()))): v for n, lb, v in samples}
        for key in order:
            token = repr(now[key]) if key in now else "_"
            values[key] += [token] * minutes
    return [
        {"series": series_text(name, dict(labels)), "values": " ".join(values[(name, labels)])}
        for name, labels in order
    ]


def run_case(tmp_path: Path, phases, checks) -> str:
    """promtool test rules with *phases* replayed and *checks* (alert_rule_test
    entries); the test file is JSON, which is YAML."""
    d = stage(tmp_path)
    case = {
        "rule_files": [ALERTS.name],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": replay(phases), "alert_rule_test": checks}],
    }
    (d / "real.test.yml").write_text(json.dumps(case, indent=1))
    proc = promtool("test", "rules", "real.test.yml", cwd=d)
    return proc.stdout + proc.stderr if proc.returncode else ""


def fires(alertname: str, minutes: int, *alerts: tuple[dict, dict]) -> dict:
    """An alert_rule_test entry: *alerts* are (labels, annotations) pairs."""
    return {
        "eval_time": f"{minutes}m",
        "alertname": alertname,
        "exp_alerts": [
            {"exp_labels": {"severity": "warning", **labels}, "exp_annotations": notes}
            for labels, notes in alerts
        ],
    }


def gone(meter: str) -> tuple[dict, dict]:
    """KamstrupMetricsGone for *meter* on HOST, with its annotations."""
    where = f"{HOST['instance']}"
    return {"meter": meter, **HOST}, {
        "summary": f"Kamstrup metrics for meter {meter} on {where} disappeared",
        "description": f'No kamstrup_up on {where} carries meter="{meter}" any more, at any'
        " address or bus. If the meter was removed or replaced on purpose, this resolves a"
        " day after it went; otherwise check node_textfile_scrape_error and the .prom file.",
    }


def not_read(labels: dict) -> tuple[dict, dict]:
    """KamstrupMeterNotRead for the kamstrup_up series *labels* on HOST."""
    address = labels["address"]
    return {**labels, **HOST}, {
        "summary": f"Kamstrup meter at address {address} on {HOST['instance']} is not read",
        "description": f"kamstrup_textfile got no valid answer from address {address} (kmp: the"
        " meter on the optical eye) for 30 minutes. Check the M-Bus wiring or the infrared head"
        " on the eye, KAMSTRUP_ADDRESS and `journalctl -u kamstrup.service`.",
    }


def test_real_output_address_change_is_not_a_meter_gone(tmp_path):
    """The README's first read at 254, then the real address 48: the same meter,
    read fine all along; KamstrupMetricsGone stays silent."""
    out = tmp_path / "kamstrup.prom"
    first = real_read(out, "254", meters=("303:48:71234567",))
    then = real_read(out, "48", meters=("303:48:71234567",))
    assert [lb.get("meter") for lb in up(first)] == ["71234567"], up(first)
    assert [lb.get("meter") for lb in up(then)] == ["71234567"], up(then)
    failed = run_case(
        tmp_path,
        [(first, 30), (then, 90)],
        [
            fires("KamstrupMetricsGone", 60),
            fires("KamstrupMetricsGone", 110),
            fires("KamstrupMeterNotRead", 110),
        ],
    )
    assert not failed, failed


def test_real_output_bus_rename_is_not_a_meter_gone(tmp_path):
    """KAMSTRUP_OUTPUT renamed from kamstrup.prom to heat.prom (so the bus label
    changes from kamstrup to heat): the meters are the same, nothing is gone."""
    first = real_read(tmp_path / "a" / "kamstrup.prom", "48", "133")
    then = real_read(tmp_path / "b" / "heat.prom", "48", "133")
    assert {lb.get("bus") for lb in up(first)} == {"kamstrup"}, up(first)
    assert {lb.get("bus") for lb in up(then)} == {"heat"}, up(then)
    failed = run_case(tmp_path, [(first, 30), (then, 90)], [fires("KamstrupMetricsGone", 60)])
    assert not failed, failed


def test_real_output_upgrade_adding_bus_and_meter_is_not_a_meter_gone(tmp_path):
    """Before the upgrade the per-address series had neither `bus` nor `meter`
    (the same file with them taken out); after it they do: nothing is gone, a
    meter that never answered (address 7) included."""
    out = tmp_path / "kamstrup.prom"
    after = real_read(out, "48", "133", "7")
    old_labels = ("bus", "meter")
    before = [
        (n, {k: v for k, v in lb.items() if not (k in old_labels and "address" in lb)}, v)
        for n, lb, v in after
    ]
    assert all("meter" in lb for lb in up(after) if lb["address"] != "7"), up(after)
    failed = run_case(tmp_path, [(before, 30), (after, 90)], [fires("KamstrupMetricsGone", 60)])
    assert not failed, failed


def test_real_output_meter_dropped_fires_once_by_its_serial_number(tmp_path):
    out = tmp_path / "kamstrup.prom"
    first = real_read(out, "48", "133")
    then = real_read(out, "48")
    (dropped,) = [lb for lb in up(first) if lb["address"] == "133"]
    assert dropped.get("meter") == "67434187", dropped
    failed = run_case(
        tmp_path,
        [(first, 30), (then, 90)],
        [
            fires("KamstrupMetricsGone", 30),
            fires("KamstrupMetricsGone", 60, gone("67434187")),
            fires("KamstrupMeterNotRead", 60),
        ],
    )
    assert not failed, failed


def test_real_output_meter_swapped_at_the_same_address_fires_for_the_old_one(tmp_path):
    out = tmp_path / "kamstrup.prom"
    first = real_read(out, "48", meters=("303:48:71234567",))
    then = real_read(out, "48", meters=("303:48:71234568",))
    assert [lb.get("meter") for lb in up(then)] == ["71234568"], up(then)
    failed = run_case(
        tmp_path,
        [(first, 30), (then, 90)],
        [fires("KamstrupMetricsGone", 60, gone("71234567"))],
    )
    assert not failed, failed


def test_real_output_meter_not_read_keeps_its_serial_number(tmp_path):
    """A meter read once, then silent: kamstrup_up 0 keeps meter="..." from the
    previous file, so KamstrupMeterNotRead fires with it and nothing is 'gone'."""
    out = tmp_path / "kamstrup.prom"
    first = real_read(out, "48", meters=("303:48:71234567",))
    then = real_read(out, "48", meters=("403:133:67434187",))
    (failing,) = up(then)
    assert failing.get("meter") == "71234567", failing
    failed = run_case(
        tmp_path,
        [(first, 15), (then, 60)],
        [
            fires("KamstrupMeterNotRead", 40),
            fires("KamstrupMeterNotRead", 60, not_read(failing)),
            fires("KamstrupMetricsGone", 60),
        ],
    )
    assert not failed, failed


def node_exporter_metrics(directory: Path, instance: str) -> list:
    """The textfile collector's series as prometheus-node-exporter exports
    *directory*: our metrics and node_textfile_*, labelled with *instance*."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exporter = subprocess.Popen(
        [
            require_tool("prometheus-node-exporter"),
            "--collector.disable-defaults",
            "--collector.textfile",
            f"--collector.textfile.directory={directory}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30  # a wait for it to listen, not an assertion
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as answer:
                    text = answer.read().decode()
                break
            except OSError:
                assert exporter.poll() is None and time.monotonic() < deadline, "no node_exporter"
                time.sleep(0.1)
    finally:
        exporter.terminate()
        exporter.wait()
    return [
        (name, {**labels_of(lb), "instance": instance}, v)
        for name, lb, v in parse_exposition(text)
        if name.startswith(("kamstrup_", "node_textfile_"))
    ]


def test_real_node_exporter_dropping_our_file_alerts_for_that_host_within_the_hour(tmp_path):
    """JSON written into kamstrup.prom on one of two hosts: node_exporter drops
    the file (its mtime goes, node_textfile_scrape_error is 1); that host, and
    only it, gets KamstrupTextfileScrapeError and KamstrupTextfileAbsent."""
    a, b = tmp_path / "a", tmp_path / "b"
    real_read(a / "kamstrup.prom", "48")
    real_read(b / "kamstrup.prom", "48")
    good_a = node_exporter_metrics(a, "a:9100")
    good_b = node_exporter_metrics(b, "b:9100")
    assert ("node_textfile_scrape_error", {"instance": "a:9100"}, 0.0) in good_a
    proc = run_simulated_read("--output", "-", "--format", "json", "--address", "48")
    assert proc.returncode == 0 and proc.stdout.lstrip().startswith("{"), proc.stderr
    (a / "kamstrup.prom").write_text(proc.stdout)
    broken_a = node_exporter_metrics(a, "a:9100")
    assert ("node_textfile_scrape_error", {"instance": "a:9100"}, 1.0) in broken_a
    assert not [s for s in broken_a if s[0] == "node_textfile_mtime_seconds"], broken_a
    host_a = {"instance": "a:9100", "job": "node"}
    failed = run_case(
        tmp_path,
        [(good_a + good_b, 30), (broken_a + good_b, 60)],
        [
            fires("KamstrupTextfileScrapeError", 30),
            fires("KamstrupTextfileAbsent", 30),
            fires(
                "KamstrupTextfileScrapeError",
                50,
                (
                    host_a,
                    {
                        "summary": "node_exporter on a:9100 drops a file of its textfile directory",
                        "description": "node_textfile_scrape_error is 1 on a:9100: node_exporter's"
                        " log names the file and the error (`journalctl -u"
                        " prometheus-node-exporter`). kamstrup_textfile never writes such a"
                        " file: check KAMSTRUP_FORMAT and KAMSTRUP_OUTPUT, and the other"
                        " collectors writing into that directory.",
                    },
                ),
            ),
            fires(
                "KamstrupTextfileAbsent",
                55,
                (
                    host_a,
                    {
                        "summary": "a:9100 no longer exports kamstrup.prom",
                        "description": "node_textfile_mtime_seconds for kamstrup.prom is missing"
                        " on a:9100. Is kamstrup.timer enabled, is the file in node_exporter's"
                        " --collector.textfile.directory, and is node_textfile_scrape_error 0?",
                    },
                ),
            ),
        ],
    )
    assert not failed, failed


# --- a meter read through its optical eye (KMP, issue 17) ----------------------------------


def kmp_read(output: Path, meter: str = "303::30303030"):
    """[(name, {labels}, value)] of the file one --once run writes at *output*, the meter
    read through kamstrup-sim's optical eye (--protocol kmp)."""
    import sys

    output.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "kamstrup_sim.py"), "--protocol", "kmp", "--meter", meter,
           "--", sys.executable, str(ROOT / "kamstrup_textfile.py"), "--once", "--timeout",
           "0.3", "--output", str(output)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return [(n, labels_of(lb), v) for n, lb, v in parse_exposition(output.read_text())]


@pytest.mark.slow
def test_kmp_output_passes_promtool_check_metrics(tmp_path):
    out = tmp_path / "kamstrup.prom"
    kmp_read(out)
    proc = subprocess.run([require_tool("promtool"), "check", "metrics"],
                          input=out.read_text(), capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'address="kmp"' in out.read_text()


@pytest.mark.slow
def test_kmp_meter_that_stays_down_fires_meter_not_read_with_its_serial_number(tmp_path):
    out = tmp_path / "kamstrup.prom"
    first = kmp_read(out)
    then = kmp_read(out, "303::30303030,silent=always")
    assert up(first) == [{"address": "kmp", "bus": "kamstrup", "meter": "30303030"}]
    (failing,) = up(then)
    assert failing == {"address": "kmp", "bus": "kamstrup", "meter": "30303030"}
    assert [v for n, _, v in then if n == "kamstrup_up"] == [0]
    failed = run_case(
        tmp_path,
        [(first, 15), (then, 60)],
        [
            fires("KamstrupMeterNotRead", 40),
            fires("KamstrupMeterNotRead", 60, not_read(failing)),
            fires("KamstrupMetricsGone", 60),
        ],
    )
    assert not failed, failed


@pytest.mark.slow
def test_kmp_meter_moved_from_the_eye_to_its_m_bus_module_is_not_a_meter_gone(tmp_path):
    """The same meter read through its eye (address kmp), then through the M-Bus module
    fitted later (address 48), and back: every graph goes on, no alert."""
    out = tmp_path / "kamstrup.prom"
    eye = kmp_read(out)
    wired = real_read(out, "48", meters=("303:48:30303030",))
    again = kmp_read(out)
    assert [lb.get("meter") for lb in up(eye)] == ["30303030"], up(eye)
    assert [lb.get("address") for lb in up(wired)] == ["48"], up(wired)
    assert [lb.get("meter") for lb in up(wired)] == ["30303030"], up(wired)
    checks = [fires(alert, minutes) for minutes in (60, 110, 170) for alert in
              ("KamstrupMetricsGone", "KamstrupMeterNotRead")]  # fmt: skip
    failed = run_case(tmp_path, [(eye, 30), (wired, 90), (again, 60)], checks)
    assert not failed, failed
