"""The configs checked by their own tools: `promtool check rules|config` and `promtool test rules`
(Debian's `prometheus` package) on the alert rules (both copies), the Prometheus config and the
Grafana dashboard's queries; `nginx -t` on deploy/nginx/hope.conf. Skipped, saying why, when a
tool is not installed; .ci/run installs both."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.support import DEPLOY, Nginx, nginx_binary, nginx_main_conf, render_nginx_conf


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus; .ci/run installs it)")
    return path


def run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout}\n{out.stderr}"
    return out


def test_promtool_checks_the_alert_rules_and_config(tmp_path: Path) -> None:
    tool = promtool()
    print(run(tool, "check", "rules", str(DEPLOY / "prometheus/alerts.yml")).stdout)
    # the PrometheusRule's groups, as the operator hands them to Prometheus
    spec = yaml.safe_load((DEPLOY / "k8s/prometheus-rule.yaml").read_text())["spec"]
    (tmp_path / "prometheus-rule.yml").write_text(yaml.safe_dump(spec))
    run(tool, "check", "rules", str(tmp_path / "prometheus-rule.yml"))
    run(tool, "check", "config", str(DEPLOY / "prometheus/prometheus.yml"))


def test_promtool_unit_tests_of_the_alerts() -> None:
    """Synthetic series that must and must not fire each alert (deploy/prometheus/alerts.test.yml)."""
    out = run(promtool(), "test", "rules", "alerts.test.yml", cwd=DEPLOY / "prometheus")
    assert "SUCCESS" in out.stdout + out.stderr


def test_grafana_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every dashboard query, with Grafana's variables filled in, parsed by promtool (as the
    expression of a recording rule)."""
    dashboard = json.loads((DEPLOY / "grafana/dashboards/hope.json").read_text())
    rules = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
            rules.append({"record": f"dashboard:panel{panel['id']}:{target['refId'].lower()}", "expr": expr})
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run(promtool(), "check", "rules", str(tmp_path / "dashboard.yml"))
    assert f"{len(rules)} rules found" in out.stdout


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    """`nginx -t` on deploy/nginx/hope.conf inside the http{} block the nginx image provides. Only
    the replicas' compose names are mapped to an address (nothing resolves hope-a here); ports,
    listen and log lines stay as in the file."""
    if nginx_binary() is None:
        pytest.skip("nginx is not installed (Debian: apt-get install nginx; .ci/run installs it)")
    text = (DEPLOY / "nginx/hope.conf").read_text()
    mapped = text.replace("server hope-a:8000", "server 127.0.0.1:8000").replace(
        "server hope-b:8000", "server 127.0.0.2:8000")
    assert mapped.count("127.0.0.") == 2
    site = tmp_path / "hope.conf"
    site.write_text(mapped)
    out = subprocess.run([nginx_binary(), "-t", "-p", str(tmp_path), "-c", str(nginx_main_conf(tmp_path, site))],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "test is successful" in out.stderr
    # and the rendering the live tests use is accepted too
    live = Nginx(tmp_path / "live", {"hope-a": 18001, "hope-b": 18002})
    assert "127.0.0.1:18001" in render_nginx_conf({"hope-a": 18001, "hope-b": 18002}, live.port, live.access_log)
    check = live.test_config()
    assert check.returncode == 0, check.stderr
