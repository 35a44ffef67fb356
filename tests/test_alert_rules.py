"""The alert and recording rules (deploy/prometheus/rules.yml) pass `promtool check rules`
and their unit tests (`promtool test rules`: every alert fires in at least one case of
rules_test.yml / slo_rules_test.yml and stays silent in another). promtool comes with
Debian's `prometheus`, which scripts/install.sh installs: missing, it is a failure."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from deploy.prometheus import RULES, RULES_DIR, find_tool

RULE_TESTS = (RULES_DIR / "rules_test.yml", RULES_DIR / "slo_rules_test.yml")


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([find_tool("promtool"), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=RULES_DIR)


def test_rules_check() -> None:
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS: \d+ rules found", result.stdout + result.stderr)


def test_rules_unit_tests_pass() -> None:
    result = promtool("test", "rules", *RULE_TESTS)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert output.count("SUCCESS") == len(RULE_TESTS), output


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"]
              for r in g["rules"] if "alert" in r}
    firing: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert alerts, "no alert rules found"
    assert alerts - firing == set(), f"alerts never shown firing: {sorted(alerts - firing)}"
    assert alerts - silent == set(), f"alerts never shown silent: {sorted(alerts - silent)}"
