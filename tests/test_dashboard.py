"""Checks of the Grafana dashboard dashboards/kamstrup.json."""

from __future__ import annotations

import json
import re
import subprocess

try:
    from tools import ROOT, parse_exposition, require_tool, run_simulated_read
except ImportError:  # tests/ imported as a package
    from tests.tools import ROOT, parse_exposition, require_tool, run_simulated_read

DASHBOARD = ROOT / "dashboards" / "kamstrup.json"
DS = "${DS_PROMETHEUS}"

# A plausible value for every Grafana variable the queries may use.
VARIABLES = {
    "meter": "71234567",
    "__interval": "15m",
    "__rate_interval": "1h",
    "__range": "1d",
    "__range_s": "86400",
    "__range_ms": "86400000",
    "__interval_ms": "900000",
    "DS_PROMETHEUS": "prometheus",
}


def load() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(panels: list) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(all_panels(p.get("panels", [])))
    return out


def targets(dash: dict) -> list[tuple[dict, dict]]:
    return [(p, t) for p in all_panels(dash["panels"]) for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        assert name in VARIABLES, f"unknown Grafana variable {m.group(0)} in {expr!r}"
        return VARIABLES[name]

    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)
    assert "$" not in out, out
    return out


def exprs(dash: dict) -> list[str]:
    return [substitute(t["expr"]) for _, t in targets(dash)]


def rules_file(rules: list[str]) -> str:
    # JSON strings are YAML strings too, so no quoting worries
    body = "".join(f"      - {r}\n" for r in rules)
    return f"groups:\n  - name: dashboard\n    rules:\n{body}"


def check_rules(tmp_path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(text)
    return subprocess.run(
        [require_tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True
    )


# --------------------------------------------------------------------------


def test_dashboard_is_grafana_json():
    dash = load()
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["title"] and dash["uid"]
    panels = all_panels(dash["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert set(p["gridPos"]) == {"x", "y", "w", "h"}
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24


def test_every_query_uses_the_templated_datasource():
    dash = load()
    ds_vars = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert [(v["name"], v["query"]) for v in ds_vars] == [("DS_PROMETHEUS", "prometheus")]
    found = targets(dash)
    assert found
    for panel, target in found:
        assert panel["datasource"] == {"type": "prometheus", "uid": DS}, panel["title"]
        assert target["datasource"] == {"type": "prometheus", "uid": DS}, panel["title"]


def test_meter_variable_lists_the_meters():
    dash = load()
    (meter,) = [v for v in dash["templating"]["list"] if v["name"] == "meter"]
    assert meter["type"] == "query"
    assert meter["definition"] == "label_values(kamstrup_meter_info, meter)"
    assert meter["query"]["query"] == "label_values(kamstrup_meter_info, meter)"
    assert meter["datasource"]["uid"] == DS
    # the per-meter panels filter on it
    filtered = [t["expr"] for _, t in targets(dash) if 'meter=~"$meter"' in t["expr"]]
    assert len(filtered) >= 8


def test_every_expression_parses(tmp_path):
    found = exprs(load())
    assert len(found) >= 10
    rules = [json.dumps({"record": f"dashboard:expr_{i}", "expr": e}) for i, e in enumerate(found)]
    proc = check_rules(tmp_path, rules_file(rules))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(found)} rules found" in proc.stdout


def test_the_parse_check_rejects_a_broken_expression(tmp_path):
    rules = [json.dumps({"record": "dashboard:expr_0", "expr": "increase(kamstrup_up[1d]"})]
    proc = check_rules(tmp_path, rules_file(rules))
    assert proc.returncode != 0


def test_unsubstituted_variables_are_caught():
    try:
        substitute('kamstrup_up{instance=~"$host"}')
    except AssertionError:
        pass
    else:
        raise AssertionError("an unknown variable must not pass")


def test_panels_cover_the_required_subjects():
    dash = load()
    titled = [(p["title"], t["expr"], p) for p, t in targets(dash)]

    def find(pattern: str) -> list[tuple[str, str, dict]]:
        return [x for x in titled if re.search(pattern, x[1])]

    (energy,) = find(r"increase\(kamstrup_energy_joules_total\{[^}]*\}\[1d\]\)")
    assert "/ 3.6e6" in energy[1] and energy[2]["fieldConfig"]["defaults"]["unit"] == "kwatth"
    assert find(r"^kamstrup_power_watts\{")
    (flow,) = find(r"kamstrup_volume_flow_cubic_meters_per_second\{")
    assert "* 3600" in flow[1] and "m³/h" in flow[2]["fieldConfig"]["defaults"]["unit"]
    temps = find(r"kamstrup_temperature_celsius\{")
    assert {re.search(r'sensor="(\w+)"', e).group(1) for _, e, _ in temps} == {"flow", "return"}
    assert find(r"kamstrup_temperature_difference_kelvin")
    assert find(r"kamstrup_info_flag")
    (last,) = find(r"time\(\) - kamstrup_last_success_timestamp_seconds")
    assert last[2]["fieldConfig"]["defaults"]["unit"] == "s"
    assert find(r"^kamstrup_up$|^kamstrup_up\{")


def test_per_address_legends_tell_two_buses_apart():
    """Two buses on one host may both have a meter at address 48: every legend of
    a per-address series names the bus as well."""
    found = [t for _, t in targets(load()) if "{{address}}" in t.get("legendFormat", "")]
    assert len(found) >= 3
    for target in found:
        assert "{{bus}}" in target["legendFormat"], target["expr"]


def test_textfile_panel_takes_the_files_the_alerts_take():
    """The same file matcher as rules/kamstrup.rules.yml (a second bus's
    kamstrup-heat.prom too), one line per file."""
    rules = (ROOT / "rules" / "kamstrup.rules.yml").read_text()
    (matcher,) = set(re.findall(r'node_textfile_mtime_seconds\{file=~"[^"]+"\}', rules))
    (target,) = [t for _, t in targets(load()) if "node_textfile_mtime_seconds" in t["expr"]]
    assert matcher in target["expr"]
    assert "{{file}}" in target["legendFormat"]


def test_every_query_returns_data_for_the_real_tool_output(tmp_path):
    """Evaluate each query with promtool on what kamstrup_textfile writes.

    The tool reads a simulated MULTICAL 303 (address 48, meter 71234567) and
    403 (address 133); its output is replayed as one sample a minute for a
    day and a bit, with one info flag set, and every query must return at
    least one series: a misspelt metric or label matches nothing.
    """
    proc = run_simulated_read("--output", "-", "--address", "48", "--address", "133")
    assert proc.returncode == 0, proc.stderr
    samples = parse_exposition(proc.stdout)
    assert any(n == "kamstrup_meter_info" and 'meter="71234567"' in lb for n, lb, _ in samples)
    series = []
    for name, labels, value in samples:
        if name == "kamstrup_info_flag" and 'flag="low_battery"' in labels:
            value = 1.0
        if name.endswith("_total"):
            values = f"{value}+1x1500"  # a counter that moves
        elif name == "kamstrup_last_success_timestamp_seconds":
            values = "0+60x1500"
        else:
            values = f"{value}x1500"
        series.append(f"      - series: {json.dumps(name + labels)}\n        values: '{values}'\n")
    series.append(
        '      - series: \'node_textfile_mtime_seconds{file="kamstrup.prom",instance="h:9100"}\'\n'
        "        values: '0+60x1500'\n"
    )
    found = exprs(load())
    alerts = [
        json.dumps({"alert": f"Q{i}", "expr": f"count({e}) > 0"}) for i, e in enumerate(found)
    ]
    (tmp_path / "q.rules.yml").write_text(rules_file(alerts))
    checks = "".join(
        f"      - eval_time: 1450m\n        alertname: Q{i}\n        exp_alerts:\n"
        "          - exp_labels: {}\n"
        for i in range(len(found))
    )
    (tmp_path / "q.test.yml").write_text(
        "rule_files: [q.rules.yml]\nevaluation_interval: 1m\ntests:\n"
        "  - interval: 1m\n    input_series:\n"
        + "".join(series)
        + "    alert_rule_test:\n"
        + checks
    )
    proc = subprocess.run(
        [require_tool("promtool"), "test", "rules", "q.test.yml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    failed = sorted({int(n) for n in re.findall(r"alertname: Q(\d+),", out)})
    assert proc.returncode == 0 and "SUCCESS" in out, [found[i] for i in failed] or out[-3000:]
