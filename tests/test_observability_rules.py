"""The bundle's Prometheus files, checked offline by promtool (Debian's prometheus package,
installed by scripts/setup.sh): the rules' unit tests, the scrape config, the dashboard's queries."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from scripts.ops.serve import ROOT

pytestmark = pytest.mark.unit

MONITORING = ROOT / "monitoring"


def promtool(*args: str, cwd=MONITORING) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.fail("promtool not found: run scripts/setup.sh (installs Debian's prometheus package)")
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_alert_and_recording_rules_pass_their_unit_tests():
    """rules_test.yml has each alert firing on one series and silent on another."""
    r = promtool("test", "rules", "rules_test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_is_unit_tested_firing_and_silent():
    import yaml

    rules = yaml.safe_load((MONITORING / "rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {
        "ModelErrorRatioHigh",
        "ModelP99LatencyHigh",
        "ModelWorkerRestarted",
        "ModelNoReadyWorker",
        "ModelQueueTimeGrowing",
    }
    cases = [
        c
        for t in yaml.safe_load((MONITORING / "rules_test.yml").read_text())["tests"]
        for c in t.get("alert_rule_test", [])
    ]
    for alert in alerts:
        assert any(c["alertname"] == alert and c["exp_alerts"] for c in cases), f"{alert} never tested firing"
        assert any(c["alertname"] == alert and not c["exp_alerts"] for c in cases), f"{alert} never tested silent"


def test_scrape_config_is_valid_and_loads_the_rules():
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rules.yml" in r.stdout and "SUCCESS" in r.stdout


# -- the Grafana dashboard -------------------------------------------------------------------

GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$model": "digits", "$version": ".*"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables replaced by values) of every panel."""
    import json

    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, val in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, val)
            out.append((panel["title"], expr))
    return out


def test_dashboard_has_a_row_per_model_and_a_version_variable():
    import json

    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"datasource", "model", "version"} <= set(variables)
    assert variables["version"]["multi"] and "$model" in variables["version"]["definition"]
    rows = [p for p in dash["panels"] if p["type"] == "row"]
    assert len(rows) == 1 and rows[0]["repeat"] == "model"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 8 and all(p["description"] and p["targets"] for p in panels)
    for p in panels:
        for t in p["targets"]:
            assert '$model"' in t["expr"], p["title"]  # every panel is about its row's model
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_dashboard_queries_parse_and_name_only_exported_or_recorded_series(tmp_path):
    import re

    import yaml

    queries = dashboard_queries()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:panel_{i}", "expr": expr} for i, (_, expr) in enumerate(queries)],
            }
        ]
    }
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump(rules))
    r = promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)  # promtool parses each PromQL expression
    assert r.returncode == 0, r.stdout + r.stderr

    declared = set()
    metrics = yaml.safe_load((MONITORING / "metrics.yaml").read_text())
    for section in ("ts_metrics", "model_metrics"):
        for kind, specs in metrics[section].items():
            for spec in specs:
                names = (
                    [spec["name"] + s for s in ("_bucket", "_sum", "_count")] if kind == "histogram" else [spec["name"]]
                )
                declared.update(names)
    recorded = {
        r["record"]
        for g in yaml.safe_load((MONITORING / "rules.yml").read_text())["groups"]
        for r in g["rules"]
        if "record" in r
    }
    for title, expr in queries:
        for name in re.findall(r"\b((?:handler_|ts_|model_version:)[\w:]+)\s*[{\[]", expr):
            assert name in declared | recorded, f"panel {title!r}: {name} is neither exported nor recorded"


def test_a_broken_dashboard_query_is_caught(tmp_path):
    """The check above can fail: promtool refuses a query that does not parse."""
    (tmp_path / "bad.yml").write_text(
        "groups:\n- name: x\n  rules:\n  - record: x:y\n    expr: sum by (model_version (rate(x[5m]))\n"
    )
    assert promtool("check", "rules", "bad.yml", cwd=tmp_path).returncode != 0
