"""The bundle's Prometheus files, checked offline by promtool (Debian's prometheus package,
installed by scripts/setup.sh): the rules' unit tests, the scrape config, the dashboard's queries."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from scripts.serve import ROOT

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
    assert alerts == {"ModelErrorRatioHigh", "ModelP99LatencyHigh", "ModelWorkerRestarted", "ModelNoReadyWorker",
                      "ModelQueueTimeGrowing"}
    cases = [c for t in yaml.safe_load((MONITORING / "rules_test.yml").read_text())["tests"] for c in t.get("alert_rule_test", [])]
    for alert in alerts:
        assert any(c["alertname"] == alert and c["exp_alerts"] for c in cases), f"{alert} never tested firing"
        assert any(c["alertname"] == alert and not c["exp_alerts"] for c in cases), f"{alert} never tested silent"


def test_scrape_config_is_valid_and_loads_the_rules():
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rules.yml" in r.stdout and "SUCCESS" in r.stdout
