"""The deployment files, checked offline (issue 12): there is no Docker
engine, no Compose plugin and no cluster on these machines.

- docker-compose.yml: Compose v1's `docker-compose config` (PyPI, in a venv
  of its own, .venv-compose, which make test makes) validates it against the
  Compose schema and resolves it; its invariants are checked here.
- deploy/kubernetes/: `kubectl kustomize` builds it, the kubernetes-validate
  package checks every resource against Kubernetes' schemas (strict), and
  the invariants the README promises are checked on the built resources.
- deploy/prometheus.yml: promtool (Debian's prometheus package) checks it;
  the Grafana dashboard's queries parse as PromQL and use the agreed names.

Not run: a real `docker compose up`, a real cluster, Grafana itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from agentlab.api.auth import load_keys
from agentlab.config import ConfigError, Settings
from agentlab.devstack import ROOT, Stack, envoy_binary, free_port
from agentlab.routing import load_routing
from tests.helpers.services import missing
from tests.helpers.stacks import StackFactory

COMPOSE_FILE = ROOT / "docker-compose.yml"
KUSTOMIZE_DIR = ROOT / "deploy" / "kubernetes"
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus.yml"
DASHBOARD_FILE = ROOT / "deploy" / "grafana" / "dashboards" / "agentlab.json"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
KUBERNETES_VERSION = "1.32.0"

# The metric names agreed for the service (OpenTelemetry GenAI conventions as
# Prometheus exports them, and the gateway's own); histograms as their series.
AGREED_METRICS = {
    "gen_ai_server_request_duration_seconds",
    "gen_ai_server_time_to_first_token_seconds",
    "gen_ai_server_time_per_output_token_seconds",
    "gen_ai_client_token_usage",
    "agentlab_node_duration_seconds",
    "agentlab_node_time_to_first_token_seconds",
    "agentlab_node_output_tokens_total",
    "agentlab_executions_total",
    "agentlab_executions_running",
    "agentlab_executions_queued",
    "agentlab_requests_rejected_total",
    "agentlab_store_write_duration_seconds",
    "agentlab_bus_lag_seconds",
    "agentlab_backend_up",
}
_HISTOGRAM_SERIES = re.compile(r"_(bucket|count|sum)$")
_LABELS = re.compile(r"\{[^}]*\}|\b(by|without) \([^)]*\)")
_METRIC_NAME = re.compile(r"\b((?:gen_ai|agentlab|envoy)_[a-z0-9_]+)\b")


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def tool(name: str, how: str) -> str:
    found = shutil.which(name)
    if found is None:
        missing(f"{name} is not installed ({how})")
    return found


def compose_v1() -> str:
    """Compose v1's docker-compose: the one make test puts in .venv-compose,
    else one on PATH."""
    local = ROOT / ".venv-compose" / "bin" / "docker-compose"
    if local.exists():
        return str(local)
    return tool("docker-compose", "Compose v1 from PyPI: make test makes .venv-compose")


def run(command: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def metric_names(query: str) -> set[str]:
    """The metrics a query reads (label matchers and groupings left out)."""
    names = set(_METRIC_NAME.findall(_LABELS.sub("", query)))
    return {_HISTOGRAM_SERIES.sub("", n) if not n.startswith("envoy_") else n for n in names}


# --- Compose ----------------------------------------------------------------


@pytest.mark.e2e
def test_compose_v1_validates_and_resolves_the_file(tmp_path: Path) -> None:
    """`docker-compose config` checks the file against the Compose schema
    and resolves it (YAML merges, interpolation, profiles); an invalid copy
    is refused, so the check is real."""
    docker_compose = compose_v1()
    checked = run([docker_compose, "config", "--services"])
    assert checked.returncode == 0, checked.stderr
    assert set(checked.stdout.split()) == {
        "envoy", "service", "service-2", "postgres", "redis", "prometheus", "grafana", "lab"
    }  # fmt: skip
    resolved = yaml.safe_load(run([docker_compose, "config"]).stdout)
    replica = resolved["services"]["service-2"]
    # The anchors resolved into a whole second replica on its own ports.
    assert replica["environment"]["AGENTLAB_GRPC_ADDRESS"] == "127.0.0.1:50052"
    assert replica["healthcheck"]["test"] == resolved["services"]["service"]["healthcheck"]["test"]
    assert replica["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert resolved["services"]["lab"]["profiles"] == ["lab"]

    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("service_healthy", "service_happy", 1))
    refused = run([docker_compose, "-f", str(broken), "--project-directory", str(ROOT), "config"])
    assert refused.returncode != 0
    assert "service_happy" in refused.stderr


def test_compose_runs_the_whole_stack_with_healthchecks() -> None:
    """Every long-running container has a healthcheck, and whatever waits
    for another waits for it to be healthy."""
    services = compose()["services"]
    assert set(services) == {
        "service", "service-2", "envoy", "lab", "postgres", "redis", "prometheus", "grafana"
    }  # fmt: skip
    assert services["lab"]["profiles"] == ["lab"]
    for name, service in services.items():
        assert "healthcheck" in service, name
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, (name, dependency)
            assert condition == {"condition": "service_healthy"}, (name, dependency)
    for replica in ("service", "service-2"):
        assert set(services[replica]["depends_on"]) == {"postgres", "redis"}
    assert set(services["envoy"]["depends_on"]) == {"service", "service-2"}


def test_compose_replicas_get_every_setting_and_their_own_addresses() -> None:
    """Both replicas receive every AGENTLAB_* setting the service reads, on
    addresses of their own; Envoy is told of the second replica and
    Prometheus scrapes both, and Envoy's admin."""
    services = compose()["services"]
    known = set(Settings.variables())
    addresses = []
    for name in ("service", "service-2"):
        environment = services[name]["environment"]
        # The image fixes the data directory (unused with PostgreSQL).
        assert known - {"AGENTLAB_DATA_DIR"} <= set(environment), name
        # Beside them only OpenTelemetry's own OTEL_* (test_tracing checks those).
        settings = {n for n in environment if not n.startswith("OTEL_")}
        assert settings <= known, name
        addresses.append(
            (environment["AGENTLAB_GRPC_ADDRESS"], environment["AGENTLAB_METRICS_ADDRESS"])
        )
        # Both share compose's own PostgreSQL and Redis unless told otherwise.
        assert "127.0.0.1:15432" in environment["AGENTLAB_DATABASE_URL"]
        assert "127.0.0.1:16379" in environment["AGENTLAB_REDIS_URL"]
    [(grpc_1, metrics_1), (grpc_2, metrics_2)] = addresses
    assert len({grpc_1, grpc_2, metrics_1, metrics_2}) == 4
    command = services["envoy"]["command"]
    assert command[command.index("--replica-port") + 1] == grpc_2.rsplit(":", 1)[1]
    assert grpc_1 == "127.0.0.1:50051"  # gateway/envoy.yaml's own service port

    prometheus = yaml.safe_load(PROMETHEUS_FILE.read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    [agentlab] = jobs["agentlab"]["static_configs"]
    assert sorted(agentlab["targets"]) == sorted([metrics_1, metrics_2])
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert jobs["envoy"]["static_configs"][0]["targets"] == ["127.0.0.1:9901"]
    mounted = services["prometheus"]["volumes"][0].split(":")[0]
    assert (ROOT / mounted).resolve() == PROMETHEUS_FILE


def test_grafana_is_provisioned_with_the_dashboard_and_its_data_source() -> None:
    volumes = {
        inside: outside
        for outside, inside, *_ in (
            v.split(":") for v in compose()["services"]["grafana"]["volumes"]
        )
    }
    assert (ROOT / volumes["/etc/grafana/provisioning"]).resolve() == GRAFANA_PROVISIONING
    dashboards_dir = (ROOT / volumes["/var/lib/grafana/dashboards"]).resolve()
    assert DASHBOARD_FILE.parent == dashboards_dir
    [provider] = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "agentlab.yml").read_text())[
        "providers"
    ]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    [source] = yaml.safe_load(
        (GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    assert source["url"] == "http://127.0.0.1:9090"
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    used = {
        target["datasource"]["uid"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }
    assert used == {source["uid"]}


@pytest.mark.e2e
def test_start_envoy_renders_the_second_replica(tmp_path: Path) -> None:
    """Compose's Envoy (scripts/start_envoy.py --replica-port) balances over
    both replicas, and Envoy accepts the result; a bad port stops it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLAB_")}

    def start_envoy(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "scripts/start_envoy.py", *args],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    printed = start_envoy("--replica-port", "50052", "--print")
    assert printed.returncode == 0, printed.stderr
    config = yaml.safe_load(printed.stdout)
    [cluster] = [
        c for c in config["static_resources"]["clusters"] if c["name"] == "agentlab_service"
    ]
    ports = [
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert ports == [50051, 50052]
    rendered = tmp_path / "envoy.yaml"
    rendered.write_text(printed.stdout)
    checked = run([envoy_binary(), "--mode", "validate", "-c", str(rendered)])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    refused = start_envoy("--replica-port", "fifty")
    assert refused.returncode == 2
    assert "--replica-port needs a port number" in refused.stderr


# --- Prometheus and Grafana -------------------------------------------------


@pytest.mark.e2e
def test_promtool_accepts_the_prometheus_config_and_the_dashboards_queries(
    tmp_path: Path,
) -> None:
    """promtool checks the scrape configuration, and parses every dashboard
    query as PromQL (as recording rules; Grafana's $__rate_interval as 1m).
    A query that does not parse is refused, so the check is real."""
    promtool = tool("promtool", "Debian's prometheus package: apt-get install prometheus")
    checked = run([promtool, "check", "config", "--syntax-only", str(PROMETHEUS_FILE)])
    assert checked.returncode == 0, checked.stdout + checked.stderr

    def rules(queries: list[str]) -> Path:
        path = tmp_path / f"rules-{len(list(tmp_path.iterdir()))}.yml"
        group = {
            "name": "dashboard",
            "rules": [
                {"record": f"dashboard:query_{i}", "expr": q.replace("$__rate_interval", "1m")}
                for i, q in enumerate(queries)
            ],
        }
        path.write_text(yaml.safe_dump({"groups": [group]}))
        return path

    queries = dashboard_queries()
    parsed = run([promtool, "check", "rules", str(rules(queries))])
    assert parsed.returncode == 0, parsed.stdout + parsed.stderr
    broken = run([promtool, "check", "rules", str(rules([queries[0] + ")"]))])
    assert broken.returncode != 0


def test_dashboard_covers_the_agreed_metrics() -> None:
    """Each query names only the agreed metric names (or Envoy's), and every
    agreed metric has a panel: TTFT, tokens, per node, per state, queue
    depth, 429s by reason, store latency, bus lag, backend health."""
    used: set[str] = set()
    for query in dashboard_queries():
        names = metric_names(query)
        assert names, query
        used |= names
    service_names = {n for n in used if not n.startswith("envoy_")}
    assert service_names <= AGREED_METRICS, service_names - AGREED_METRICS
    assert service_names == AGREED_METRICS, AGREED_METRICS - service_names


@pytest.mark.e2e
def test_dashboards_envoy_series_are_what_envoy_exports(start_stack: StackFactory) -> None:
    """The Envoy panels' series exist in a real Envoy's /stats/prometheus for
    the service cluster and the rate limit (on, as in production), after a
    request through it."""
    stack: Stack = start_stack({"AGENTLAB_DEFAULT_BACKEND": "echo", "AGENTLAB_RATE_LIMIT": "100"})
    answer = httpx.post(
        f"{stack.url}/api/v1/execute", json={"prompt": "hi", "model": "echo"}, timeout=30
    )
    assert answer.status_code == 200, answer.text
    stats = httpx.get(
        f"http://127.0.0.1:{stack.envoy.ports.admin}/stats/prometheus", timeout=10
    ).text
    exported = {
        line.split("{")[0]
        for line in stats.splitlines()
        if 'envoy_cluster_name="agentlab_service"' in line
        or 'envoy_local_http_ratelimit_prefix="lab_rate_limit"' in line
    }
    envoy_names = {
        n for q in dashboard_queries() for n in metric_names(q) if n.startswith("envoy_")
    }
    assert envoy_names, "the dashboard has no Envoy panel"
    assert envoy_names <= exported, envoy_names - exported


# --- Kubernetes -------------------------------------------------------------


@pytest.fixture(scope="module")
def kustomized() -> list[dict[str, Any]]:
    kubectl = tool("kubectl", "the machine image's kubectl; kustomize needs no cluster")
    built = run([kubectl, "kustomize", str(KUSTOMIZE_DIR)])
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


def one(resources: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def generated(resources: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    """A ConfigMap kustomize generated (its name gets a hash suffix)."""
    [found] = [
        r
        for r in resources
        if r["kind"] == "ConfigMap" and r["metadata"]["name"].startswith(prefix + "-")
    ]
    return found


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [only] = deployment["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = only
    return found


def sleeps_s(command: list[str]) -> float:
    """Seconds a preStop command sleeps (python -c "...time.sleep(N)...")."""
    return sum(float(s) for s in re.findall(r"time\.sleep\(([0-9.]+)\)", " ".join(command)))


@pytest.mark.e2e
def test_kustomize_output_is_valid_kubernetes(kustomized: list[dict[str, Any]]) -> None:
    """Every resource passes kubernetes-validate's strict schema check; a
    probe with a malformed gRPC port is refused, so the check is real."""
    kinds = sorted(r["kind"] for r in kustomized)
    assert kinds == sorted(
        ["ConfigMap"] * 3
        + ["Deployment"] * 2
        + ["Service"] * 2
        + ["PodDisruptionBudget"] * 2
        + ["HorizontalPodAutoscaler", "Secret"]
    )
    for resource in kustomized:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    service = one(kustomized, "Deployment", "agentlab-service")
    broken = json.loads(json.dumps(service))
    container(broken)["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.e2e
def test_kubernetes_service_pods_probe_grpc_health_and_drain(
    kustomized: list[dict[str, Any]],
) -> None:
    deployment = one(kustomized, "Deployment", "agentlab-service")
    service = container(deployment)
    [grpc_port] = [p["containerPort"] for p in service["ports"] if p["name"] == "grpc"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(service[probe]) & {"grpc", "httpGet", "exec", "tcpSocket"} == {"grpc"}
        assert service[probe]["grpc"]["port"] == grpc_port, probe
    # Ready means the whole server SERVING (grpc.health.v1's "").
    assert "service" not in service["readinessProbe"]["grpc"]
    settings = generated(kustomized, "agentlab-settings")["data"]
    assert settings["AGENTLAB_GRPC_ADDRESS"] == f"0.0.0.0:{grpc_port}"
    # A cluster's log collector parses lines: one JSON object each.
    assert settings["AGENTLAB_LOG_FORMAT"] == "json"
    grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain_s = sleeps_s(service["lifecycle"]["preStop"]["exec"]["command"]) + float(
        settings["AGENTLAB_SHUTDOWN_GRACE_S"]
    )
    assert grace_s > drain_s


@pytest.mark.e2e
def test_kubernetes_service_is_headless_and_envoy_balances_over_it(
    kustomized: list[dict[str, Any]],
) -> None:
    headless = one(kustomized, "Service", "agentlab-service")
    assert headless["spec"]["clusterIP"] == "None"
    pods = one(kustomized, "Deployment", "agentlab-service")["spec"]["template"]["metadata"]
    assert headless["spec"]["selector"].items() <= pods["labels"].items()
    [grpc] = [p for p in headless["spec"]["ports"] if p["name"] == "grpc"]

    envoy_config = yaml.safe_load(generated(kustomized, "agentlab-envoy")["data"]["envoy.yaml"])
    [cluster] = [
        c for c in envoy_config["static_resources"]["clusters"] if c["name"] == "agentlab_service"
    ]
    assert cluster["type"] == "STRICT_DNS"
    assert cluster["health_checks"][0]["grpc_health_check"] == {}
    assert cluster["outlier_detection"]
    [endpoint] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert (address["address"], address["port_value"]) == ("agentlab-service", grpc["port"])


@pytest.mark.e2e
def test_kubernetes_envoy_drains_within_its_grace(kustomized: list[dict[str, Any]]) -> None:
    deployment = one(kustomized, "Deployment", "agentlab-envoy")
    envoy = container(deployment)
    command = envoy["command"]
    drain_time_s = float(command[command.index("--drain-time-s") + 1])
    pre_stop = envoy["lifecycle"]["preStop"]["exec"]["command"]
    assert "/drain_listeners?graceful" in " ".join(pre_stop)
    # The preStop waits out the drain, and the grace outlasts the preStop.
    assert sleeps_s(pre_stop) >= drain_time_s
    grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_s > sleeps_s(pre_stop)
    # Ready when Envoy is: its admin's /ready, through the stats listener.
    [stats] = [p["containerPort"] for p in envoy["ports"] if p["name"] == "stats"]
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "stats"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(stats)
    [mount] = envoy["volumeMounts"]
    [volume] = deployment["spec"]["template"]["spec"]["volumes"]
    assert (
        volume["configMap"]["name"] == generated(kustomized, "agentlab-envoy")["metadata"]["name"]
    )
    assert f"{mount['mountPath']}/envoy.yaml" in command


@pytest.mark.e2e
def test_kubernetes_disruption_budgets_and_autoscaler_target_the_pods(
    kustomized: list[dict[str, Any]],
) -> None:
    for name in ("agentlab-service", "agentlab-envoy"):
        labels = one(kustomized, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        budget = one(kustomized, "PodDisruptionBudget", name)["spec"]
        assert budget["selector"]["matchLabels"].items() <= labels.items()
        assert budget["minAvailable"] >= 1
    autoscaler = one(kustomized, "HorizontalPodAutoscaler", "agentlab-service")["spec"]
    assert autoscaler["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": "agentlab-service"
    }  # fmt: skip
    # Two at least: a PodDisruptionBudget of one then still lets a node drain.
    assert autoscaler["minReplicas"] >= 2
    service = container(one(kustomized, "Deployment", "agentlab-service"))
    assert service["resources"]["requests"]["cpu"]  # what utilisation is relative to


@pytest.mark.e2e
def test_kubernetes_settings_routing_and_keys_are_what_the_service_accepts(
    kustomized: list[dict[str, Any]], tmp_path: Path
) -> None:
    """The settings ConfigMap names only real settings, and they parse; the
    routing ConfigMap loads; the Secret's keys file is a placeholder that
    the service refuses, so the API is never served open by mistake."""
    settings = dict(generated(kustomized, "agentlab-settings")["data"])
    deployment = one(kustomized, "Deployment", "agentlab-service")
    service = container(deployment)
    for variable in service["env"]:
        settings[variable["name"]] = (
            "postgresql://x@db/x" if "DATABASE" in variable["name"] else ("redis://redis:6379/0")
        )
    known = set(Settings.variables())
    assert set(settings) <= known, set(settings) - known
    Settings.from_env(settings)

    mounts = {m["name"]: m["mountPath"] for m in service["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    routing = generated(kustomized, "agentlab-routing")
    assert volumes["routing"]["configMap"]["name"] == routing["metadata"]["name"]
    assert settings["AGENTLAB_MODELS_FILE"] == f"{mounts['routing']}/models.yaml"
    models = tmp_path / "models.yaml"
    models.write_text(routing["data"]["models.yaml"])
    assert load_routing(models).models

    secret = one(kustomized, "Secret", "agentlab-secrets")
    assert volumes["keys"]["secret"]["secretName"] == "agentlab-secrets"
    assert settings["AGENTLAB_API_KEYS_FILE"] == f"{mounts['keys']}/keys.yaml"
    keys = tmp_path / "keys.yaml"
    keys.write_text(secret["stringData"]["keys.yaml"])
    with pytest.raises(ConfigError, match="sha256 must be 64 hex digits"):
        load_keys(keys)


@pytest.mark.e2e
def test_kubernetes_envoy_config_is_gateway_envoy_yaml_rendered(tmp_path: Path) -> None:
    """deploy/kubernetes/envoy.yaml is up to date with gateway/envoy.yaml
    (scripts/render_k8s_envoy.py --check), and Envoy accepts it (with this
    checkout's descriptor in place of the image's)."""
    checked = run([sys.executable, "scripts/render_k8s_envoy.py", "--check"])
    assert checked.returncode == 0, checked.stderr
    text = (KUSTOMIZE_DIR / "envoy.yaml").read_text()
    assert "/app/build/agentlab.pb" in text
    local = tmp_path / "envoy.yaml"
    local.write_text(text.replace("/app/build/agentlab.pb", str(ROOT / "build" / "agentlab.pb")))
    validated = run([envoy_binary(), "--mode", "validate", "-c", str(local)])
    assert validated.returncode == 0, validated.stdout + validated.stderr


@pytest.mark.e2e
def test_kubernetes_envoy_config_serves_and_exposes_only_two_admin_pages(
    tmp_path: Path, start_stack: StackFactory
) -> None:
    """deploy/kubernetes/envoy.yaml run for real (its ports moved to free
    ones, the headless Service's name to a running service): REST calls go
    through, and the stats listener answers GET /ready and
    /stats/prometheus from the admin, and nothing else of it."""
    stack: Stack = start_stack({"AGENTLAB_DEFAULT_BACKEND": "echo"})
    config: Any = yaml.safe_load((KUSTOMIZE_DIR / "envoy.yaml").read_text())
    gateway, admin, stats = free_port(), free_port(), free_port()
    moved = {8000: gateway, 9901: admin, 9902: stats, 50051: stack.service.port}

    def move(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                key: moved.get(value, value) if key == "port_value" else move(value)
                for key, value in node.items()
            }
        if isinstance(node, list):
            return [move(item) for item in node]
        if node == "agentlab-service":
            return "127.0.0.1"
        if node == "/app/build/agentlab.pb":
            return str(ROOT / "build" / "agentlab.pb")
        return node

    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(move(config)))
    with (tmp_path / "envoy.log").open("wb") as log:
        envoy = subprocess.Popen(
            [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--log-level", "warn"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            with httpx.Client(timeout=10) as client:
                for _ in range(100):
                    try:
                        if client.get(f"http://127.0.0.1:{stats}/ready").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.1)
                answer = client.post(
                    f"http://127.0.0.1:{gateway}/api/v1/execute",
                    json={"prompt": "hi there", "model": "echo"},
                )
                assert answer.status_code == 200, answer.text
                assert answer.json()["output"] == "hi there"
                assert client.get(f"http://127.0.0.1:{stats}/ready").text.strip() == "LIVE"
                metrics = client.get(f"http://127.0.0.1:{stats}/stats/prometheus").text
                assert 'envoy_cluster_upstream_rq{envoy_response_code="200"' in metrics
                for method, page in (("GET", "/config_dump"), ("POST", "/quitquitquit"),
                                     ("POST", "/ready"), ("GET", "/stats")):  # fmt: skip
                    refused = client.request(method, f"http://127.0.0.1:{stats}{page}")
                    assert refused.status_code == 404, (method, page)
                assert envoy.poll() is None
        finally:
            envoy.terminate()
            envoy.wait(timeout=10)
