"""deploy/: the Kubernetes manifests validate against the API schemas (kubernetes-validate, strict),
the alert rules pass ``promtool check rules`` and their unit tests, the Dockerfile and compose
file keep the promises in their headers, and every metric the dashboard and the alerts use is in
the ``/metrics`` of a real running service."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy.settings import _PARSERS, load_settings
from tests.support.app import REPO_ROOT, start_service_process

DEPLOY = REPO_ROOT / "deploy"
K8S_VERSION = "1.30"
# Series Prometheus makes itself, not the service.
PROMETHEUS_OWN = {"up"}


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in manifests() if d["kind"] == kind]
    return doc


def test_kubernetes_manifests_are_valid_and_complete() -> None:
    docs = manifests()
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    kinds = {d["kind"] for d in docs}
    assert kinds == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Secret",
        "ConfigMap",
        "NetworkPolicy",
    }
    # The validator does catch mistakes: a port given as a word fails.
    broken = copy.deepcopy(by_kind("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    unknown = copy.deepcopy(by_kind("Service"))
    unknown["spec"]["bogus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, K8S_VERSION, strict=True)


def test_deployment_probes_termination_and_wiring() -> None:
    dep = by_kind("Deployment")
    pod = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    # serve needs up to ~22 s after SIGTERM, plus the preStop pause.
    assert pod["terminationGracePeriodSeconds"] >= 22 + 5
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    for kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
        doc = by_kind(kind)
        selector = doc["spec"].get("selector") or doc["spec"]["podSelector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), kind
    assert by_kind("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    # Every variable the pod gets names a real setting (unknown PROXY_* would be silently ignored).
    env_names = set(by_kind("ConfigMap")["data"]) | {e["name"] for e in container["env"]}
    for name in env_names:
        assert name.startswith("PROXY_") and name[6:].lower() in _PARSERS, name
    secret_keys = set(by_kind("Secret")["stringData"])
    referenced = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e}
    referenced |= {i["key"] for v in pod["volumes"] if "secret" in v for i in v["secret"]["items"]}
    assert referenced <= secret_keys
    assert container["image"] == yaml.safe_load((DEPLOY / "compose.yaml").read_text())["x-proxy"]["image"]


def test_dockerfile_is_slim_non_root_with_a_healthcheck_and_no_secret() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    # FROM ${BASE}: the default (the official slim image) is what a plain build uses.
    defaults = dict(re.findall(r"(?m)^ARG (\w+)=(\S+)", text))
    froms = [
        re.sub(r"\$\{(\w+)\}", lambda m: defaults[m[1]], f) for f in re.findall(r"(?m)^FROM (\S+)", text)
    ]
    assert froms and all(f.startswith("python:3.11-slim") for f in froms)
    user = re.findall(r"(?m)^USER (\S+)", text)
    assert user and not user[-1].startswith(("0", "root"))
    assert re.search(r"(?m)^HEALTHCHECK .*", text) and "/healthz" in text
    env_and_args = " ".join(re.findall(r"(?m)^(?:ENV|ARG) .*(?:\n .*)*", text))
    for secret in ("PROXY_MASTER_KEY=", "PROXY_ADMIN_TOKEN", "PROXY_JWT_HS256_SECRET", "PROXY_REDIS_URL"):
        assert secret not in env_and_args
    assert not re.search(r"(?m)^COPY .*(var|\.key|\.env)\b", text)
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".venv", "var", ".git"} <= set(ignored)


def test_compose_has_redis_two_replicas_an_upstream_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "proxy-1", "proxy-2", "upstream", "prometheus", "grafana"} <= set(services)
    for name in ("proxy-1", "proxy-2"):
        env = services[name]["environment"]
        assert env["PROXY_REDIS_URL"].startswith("redis://redis:")
        # Secrets come from .env at run time, never written here.
        assert env["PROXY_MASTER_KEY"].startswith("${") and env["PROXY_ADMIN_TOKEN"].startswith("${")
        for key in env:
            assert key[6:].lower() in _PARSERS, key
    mounts = " ".join(services["grafana"]["volumes"])
    assert "dashboard.json" in mounts and "provisioning" in mounts
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert {t.split(":")[0] for t in targets} == {"proxy-1", "proxy-2"}


def _promtool() -> str:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: apt-get install prometheus (make check-system does it as root)"
    return tool


@pytest.mark.system
def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    tool = _promtool()
    rules = DEPLOY / "prometheus" / "alerts.yaml"
    checked = subprocess.run([tool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [tool, "test", "rules", "alerts.test.yaml"],
        cwd=rules.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    # Every alert has a unit test.
    alerts = {r["alert"] for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"]}
    tests = yaml.safe_load((rules.parent / "alerts.test.yaml").read_text())["tests"]
    covered = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert alerts == covered


_NAME = re.compile(r"\b([a-z_][a-z0-9_]*)\s*(?:\{|\[)")
_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def _metric_names(expr: str) -> set[str]:
    return {n for n in _NAME.findall(expr) if n.startswith("proxy_") or n in PROMETHEUS_OWN} | {
        n for n in re.findall(r"\bproxy_[a-z0-9_]+", expr)
    }


def _family(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def used_metrics() -> set[str]:
    names: set[str] = set()
    dashboard = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            names |= _metric_names(target["expr"])
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            names |= _metric_names(rule["expr"])
    return names


@pytest.mark.system
def test_every_metric_of_the_dashboard_and_alerts_is_served(tmp_path: Path) -> None:
    used = used_metrics()
    assert len(used) >= 10 and "proxy_upstream_latency_seconds_bucket" in used
    with (
        start_service_process(tmp_path / "data") as sp,
        urllib.request.urlopen(sp.url + "/metrics", timeout=10) as r,
    ):
        text = r.read().decode()
    families = {f.name for f in text_string_to_metric_families(text)}
    missing = sorted(n for n in used - PROMETHEUS_OWN if _family(n) not in families)
    assert not missing, f"used by deploy/ but not in a live /metrics: {missing}"
    # The check can fail: a made-up name is not served.
    assert _family("proxy_no_such_metric_total") not in families


def test_the_systemd_unit_sets_a_production_configuration_that_loads() -> None:
    unit = (REPO_ROOT / "deploy" / "connection-proxy.service").read_text()
    env = dict(
        line.removeprefix("Environment=").split("=", 1)
        for line in unit.splitlines()
        if line.startswith("Environment=")
    )
    # The admin token comes from the EnvironmentFile, which the unit names.
    assert "EnvironmentFile=-/etc/connection-proxy/env" in unit
    settings = load_settings(env={**env, "PROXY_ADMIN_TOKEN": "t" * 32})
    assert settings.dev_mode is False
    assert settings.public_url == env["PROXY_PUBLIC_URL"]
    assert settings.public_url.startswith(
        "https://"
    )  # links and the OAuth callback are not the listen address
    assert settings.master_key_file is not None
