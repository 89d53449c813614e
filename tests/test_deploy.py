"""The deployment files, checked without a docker daemon, a cluster or a GPU (docs/deployment.md).

docker/compose.yaml, docker/Dockerfile.gateway, docker/prometheus, docker/grafana and docker/k8s are
parsed and cross-checked against the code they run: the variables the entrypoint and the gateway read,
the gateway's metrics registry, and the metric names a real (CPU) tritonserver exposes. Real tools
validate where they are installed, and a check skips, saying which tool is missing, only where it
is: `docker compose config`, `promtool check config` / `check rules` (Debian's prometheus package,
`make setup`), `kubectl kustomize`, redis-server. The Kubernetes schemas come with the
kubernetes-validate package (the dev extra), so that check never needs the network.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import redis
import yaml

from birdgen import entrypoint
from birdgen.cli import build_parser
from birdgen.client.cache import cache_metrics
from birdgen.contracts import TARGET_FILE
from birdgen.engines import ENGINE_KINDS
from birdgen.gateway.metrics import gateway_metrics
from birdgen.gateway.settings import ENV_PREFIX, GatewaySettings
from birdgen.server import TritonServer, free_port
from tests.processes import stop

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
PROMETHEUS_FILE = DOCKER / "prometheus" / "prometheus.yml"
GRAFANA = DOCKER / "grafana" / "provisioning"
DASHBOARD_FILE = GRAFANA / "dashboards" / "birdgen.json"
K8S = DOCKER / "k8s"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
SECRET_TEMPLATE = K8S / "gateway-secret.example.yaml"
TRITON_SECRET_TEMPLATE = K8S / "triton-secret.example.yaml"
GATEWAY_DOCKERFILE = DOCKER / "Dockerfile.gateway"
SERVER_DOCKERFILE = DOCKER / "Dockerfile.server"

COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
TRITONS = ("triton", "triton-cpu")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
pins = runpy.run_path(str(DOCKER / "pins.py"))

# Every variable the gateway reads: its settings model's fields, and the port `birdgen gateway` reads.
GATEWAY_ENV = {ENV_PREFIX + name.upper() for name in GatewaySettings.model_fields} | {"BIRDGEN_GATEWAY_PORT"}
# What the deployment must set for it (the rest keep the model's defaults).
GATEWAY_ENV_SET = {
    "BIRDGEN_TRITON_URL",
    "BIRDGEN_REDIS_URL",
    "BIRDGEN_RATE_LIMIT_PER_MINUTE",
    "BIRDGEN_CORS_ORIGINS",
    "BIRDGEN_API_KEYS",
    "BIRDGEN_GATEWAY_PORT",
}
# Triton's GPU metrics (DCGM), absent from a CPU-only server, so not in the scrape below. Checked by
# hand against Triton 2.51's docs (server v2.51.0 docs/user_guide/metrics.md, "GPU Metrics") and the
# names registered in core r24.10 src/metrics.cc.
TRITON_GPU_METRICS = {
    "nv_gpu_utilization",
    "nv_gpu_memory_total_bytes",
    "nv_gpu_memory_used_bytes",
    "nv_gpu_power_usage",
    "nv_gpu_power_limit",
    "nv_energy_consumption",
}
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|ADMIN_KEY|CREDENTIAL", re.IGNORECASE)


# -- helpers -------------------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, environ: dict[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, from `environ` or the defaults."""
    environ = environ or {}

    def one(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        if environ.get(name):
            return environ[name]
        if operator in (":-", "-"):
            return argument
        raise KeyError(f"{name} is required: {argument}")

    return _VARIABLE.sub(one, value)


def compose_variables() -> dict[str, tuple[str | None, str]]:
    """Every ${VAR...} in compose.yaml: name -> (operator, argument)."""
    return {m.group(1): (m.group(2), m.group(3) or "") for m in _VARIABLE.finditer(COMPOSE_FILE.read_text())}


def env_example() -> tuple[dict[str, str], set[str]]:
    """docker/.env.example's assignments, and every variable it names (commented examples too)."""
    assigned, named = {}, set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if match:
            named.add(match.group(2))
            if not match.group(1):
                assigned[match.group(2)] = match.group(3)
    return assigned, named


def healthcheck_url(test: list[str]) -> str:
    (url,) = re.findall(r"https?://[^'\" ]+", " ".join(test))
    return url


_PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (labels, functions, numbers and durations aside)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = re.findall(r"(?<![\w.:$])([A-Za-z_:][\w:]*)\b(?!\s*\()", expr)
    return {name for name in names if name.lower() not in _PROMQL_WORDS}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p["targets"]]


def adapter_rule() -> dict[str, Any]:
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rule


def adapter_query() -> str:
    """The adapter rule's metricsQuery with its template filled in as the adapter would for one pod."""
    query = adapter_rule()["metricsQuery"]
    query = query.replace("<<.GroupBy>>", "pod").replace("<<.LabelMatchers>>", 'namespace="birdgen",pod="a"')
    assert "<<" not in query, query
    return query


def gateway_metric_names() -> set[str]:
    """Every sample name the gateway's /metrics can expose (its registry plus the Redis cache's)."""
    metrics = gateway_metrics()
    cache_metrics(metrics.registry)
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
    }
    return {family.name + s for family in metrics.registry.collect() for s in suffixes[family.type]}


def k8s_files() -> list[Path]:
    """Every manifest under docker/k8s (not kustomizations, not the adapter's helm values)."""
    return sorted(
        p
        for p in K8S.rglob("*.yaml")
        if p.name != "kustomization.yaml" and "prometheus-adapter" not in p.parts
    )


def k8s_docs(*paths: Path) -> list[dict[str, Any]]:
    return [doc for path in paths for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomized_docs(folder: Path) -> list[dict[str, Any]]:
    resources = yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"]
    return k8s_docs(*(folder / name for name in resources))


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def container_env(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def entrypoint_variables() -> str:
    parser = argparse.ArgumentParser()
    entrypoint.add_arguments(parser, ENGINE_KINDS)
    return parser.format_help()


def promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (`make setup` installs Debian's prometheus package)")
    return binary


# -- the PromQL helper itself --------------------------------------------------------------------------


def test_promql_metrics_finds_only_metric_names() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(a_bucket{route=~"x|y"}[$__rate_interval])))'
        " / clamp_min(sum without (pod) (rate(b_total[5m] offset 1h)), 1e-3) / 1e6 and on(model) c"
    )
    assert promql_metrics(expr) == {"a_bucket", "b_total", "c"}


# -- docker compose ------------------------------------------------------------------------------------


def _compose(args: list[str], environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = ["docker", "compose", "-f", str(COMPOSE_FILE), "--env-file", str(ENV_EXAMPLE), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env=environ, check=False)


def test_docker_compose_config_validates() -> None:
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed")
    version = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
    if version.returncode != 0:
        pytest.skip(
            f"the docker compose plugin is not installed ({version.stderr.strip() or version.stdout})"
        )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "GRAFANA_", "BIRDGEN_"))}
    secrets = {"GRAFANA_ADMIN_PASSWORD": "test-only", "BIRDGEN_API_KEYS": "k1,k2"}
    for profile, triton in (("gpu", "triton"), ("cpu", "triton-cpu")):
        done = _compose(["--profile", profile, "config", "--format", "json"], base | secrets)
        assert done.returncode == 0, done.stderr
        services = json.loads(done.stdout)["services"]
        assert set(services) == {triton, "gateway", "redis", "prometheus", "grafana"}
        assert services["gateway"]["environment"]["BIRDGEN_API_KEYS"] == "k1,k2"
    # .env.example's default profile is the GPU one; --profile cpu overrides it on the command line.
    done = _compose(["config", "--services"], base | secrets)
    assert done.returncode == 0, done.stderr
    assert "triton" in done.stdout.split() and "triton-cpu" not in done.stdout.split()
    # No password, no stack: compose refuses, naming the variable.
    refused = _compose(["--profile", "cpu", "config"], base)
    assert refused.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in refused.stderr


def test_compose_services_profiles_and_network() -> None:
    assert COMPOSE["name"] == "birdgen"
    assert set(SERVICES) == {*TRITONS, "gateway", "redis", "prometheus", "grafana"}
    assert SERVICES["triton"]["profiles"] == ["gpu"]
    assert SERVICES["triton-cpu"]["profiles"] == ["cpu"]
    assert all("profiles" not in SERVICES[name] for name in SERVICES if name not in TRITONS)
    # One network; both Triton variants answer as `triton` on it.
    assert list(COMPOSE["networks"]) == ["birdgen"]
    for name, service in SERVICES.items():
        networks = service["networks"]
        assert list(networks) == ["birdgen"], name
        if name in TRITONS:
            assert networks["birdgen"]["aliases"] == ["triton"]
    # Storage: named volumes, the SDXL weights read-only, and the config files read-only.
    declared = set(COMPOSE["volumes"])
    used = set()
    for name, service in SERVICES.items():
        for mount in service.get("volumes", []):
            source, _, *mode = mount.split(":") if not mount.startswith("$") else _split_env_mount(mount)
            if source in declared:
                used.add(source)
            else:
                assert mode == ["ro"], f"{name}: host path {source} must be read-only"
                assert source.startswith(("./", "${")), f"{name}: {source}"
                if source.startswith("./"):
                    assert (DOCKER / source).exists(), source
    assert used == declared
    assert SERVICES["triton"]["volumes"][0].startswith("model-repository-gpu:")
    assert SERVICES["triton-cpu"]["volumes"][0].startswith("model-repository-cpu:")


def _split_env_mount(mount: str) -> list[str]:
    variable, rest = mount[: mount.index("}") + 1], mount[mount.index("}") + 2 :]
    return [variable, *rest.split(":")]


def test_compose_gpu_reservation_and_cpu_variant() -> None:
    (device,) = SERVICES["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] >= 1
    assert "deploy" not in SERVICES["triton-cpu"]  # starts on a machine without GPU or toolkit
    gpu, cpu = (SERVICES[name]["environment"] for name in TRITONS)
    assert interpolate(gpu["BIRDGEN_ENGINE"]) in ENGINE_KINDS and gpu["BIRDGEN_DEVICE"] == "cuda"
    assert cpu["BIRDGEN_ENGINE"] == "onnxruntime" and cpu["BIRDGEN_DEVICE"] == "cpu"
    for name in ("gateway", "redis", "prometheus", "grafana"):
        assert "deploy" not in SERVICES[name]


def test_compose_triton_runs_the_server_image_as_the_entrypoint_reads_it() -> None:
    help_text = entrypoint_variables()
    server_env = " ".join(
        line for line in (DOCKER / "Dockerfile.server").read_text().splitlines() if "BIRDGEN_" in line
    )
    for name in TRITONS:
        service = SERVICES[name]
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.server"}
        assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        for variable in service["environment"]:
            assert f"[{variable}]" in help_text, f"{name}: the entrypoint does not read {variable}"
        # The repository volume is mounted where the image's BIRDGEN_MODEL_REPOSITORY points.
        assert "BIRDGEN_MODEL_REPOSITORY=/models/repository" in server_env
        assert any(v.endswith(":/models/repository") for v in service["volumes"])
        assert service["environment"]["BIRDGEN_MODEL_DIR"] == "/models/sdxl-turbo"
        assert any(v.endswith(":/models/sdxl-turbo:ro") for v in service["volumes"])
        # Internal ports only (the image's defaults); readiness is Triton's own.
        assert service["expose"] == ["8000", "8001", "8002"] and "ports" not in service
        assert healthcheck_url(service["healthcheck"]["test"]) == "http://127.0.0.1:8000/v2/health/ready"
        assert service["shm_size"] == "2g"


def test_compose_gateway_reaches_triton_and_redis() -> None:
    gateway = SERVICES["gateway"]
    assert gateway["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.gateway"}
    environment = gateway["environment"]
    assert set(environment) == GATEWAY_ENV_SET
    assert GATEWAY_ENV_SET <= GATEWAY_ENV, GATEWAY_ENV_SET - GATEWAY_ENV  # the gateway reads all of them
    host, port = environment["BIRDGEN_TRITON_URL"].split(":")
    assert host == "triton" and port == "8001"
    assert environment["BIRDGEN_REDIS_URL"] == "redis://redis:6379/0"
    assert interpolate(environment["BIRDGEN_RATE_LIMIT_PER_MINUTE"]) == "60"
    gateway_port = environment["BIRDGEN_GATEWAY_PORT"]
    (published,) = gateway["ports"]
    assert interpolate(published).split(":")[-1] == gateway_port
    assert healthcheck_url(gateway["healthcheck"]["test"]) == f"http://127.0.0.1:{gateway_port}/health"
    # Waits for whichever Triton the profile runs (the other is not required) and for Redis.
    assert gateway["depends_on"] == {
        "triton": {"condition": "service_healthy", "required": False},
        "triton-cpu": {"condition": "service_healthy", "required": False},
        "redis": {"condition": "service_healthy"},
    }


def test_every_compose_service_has_a_healthcheck() -> None:
    for name, service in SERVICES.items():
        test = service["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    # A dead python-backend stub makes Triton unhealthy (its own endpoints stay 200).
    for name in ("triton", "triton-cpu"):
        assert SERVICES[name]["healthcheck"]["test"][1].startswith("birdgen check-stubs &&"), name
    assert SERVICES["triton"]["healthcheck"]["start_period"] == "3600s"  # a first start exports


def test_compose_holds_no_secret_value() -> None:
    variables = compose_variables()
    for name, service in SERVICES.items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key):
                match = _VARIABLE.fullmatch(str(value))
                assert match, f"{name}.{key} must come from the environment, not the file"
                operator, default = variables[match.group(1)]
                assert operator in (":?", None) or default == "", f"{name}.{key} has a default value"
    assert SERVICES["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith(
        "${GRAFANA_ADMIN_PASSWORD:?"
    )
    # The example env file names the secrets but holds none.
    assigned, _ = env_example()
    for key, value in assigned.items():
        if SECRET_NAME.search(key):
            assert value == "", f"docker/.env.example must leave {key} empty"


def test_env_example_names_every_variable() -> None:
    assigned, named = env_example()
    for variable, (operator, _) in compose_variables().items():
        assert variable in named, f"{variable} is not in docker/.env.example"
        if operator == ":?":
            assert variable in assigned, f"{variable} is required: .env.example must list it uncommented"
    assert assigned["COMPOSE_PROFILES"] == "gpu"


def test_the_local_env_file_is_never_committed() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT, check=False)
    assert ignored.returncode == 0, "docker/.env (the secrets) must be in .gitignore"


def test_redis_settings_on_a_real_redis(tmp_path: Path) -> None:
    """compose's Redis command line (the same as the StatefulSet's) is accepted by a real redis-server
    and gives an LRU cache with append-only persistence in /data."""
    command = [interpolate(arg) for arg in SERVICES["redis"]["command"]]
    statefulset = find(k8s_docs(K8S / "redis.yaml"), "StatefulSet", "redis")
    assert containers(statefulset)[0]["args"] == command
    assert command[0] == "redis-server" and command[command.index("--dir") + 1] == "/data"
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert containers(statefulset)[0]["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(
            "redis-server is not installed (`make setup` installs it: apt-get install -y redis-server)"
        )
    port, log = free_port(), tmp_path / "redis.log"
    command[command.index("--dir") + 1] = str(tmp_path)
    argv = [binary, *command[1:], "--port", str(port), "--bind", "127.0.0.1", "--logfile", str(log)]
    with _running(argv) as process:
        client = redis.Redis(port=port, socket_timeout=5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, f"redis-server refused the settings: {log.read_text()}"
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        config = client.config_get("*")
        client.close()
    assert config["maxmemory-policy"] == "allkeys-lru"
    assert int(config["maxmemory"]) == 2**30
    assert config["appendonly"] == "yes" and config["appendfsync"] == "everysec"
    assert config["save"] == ""  # the append-only file alone, no RDB snapshots on top
    assert (tmp_path / "appendonlydir").is_dir()


@contextlib.contextmanager
def _running(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        yield process
    finally:
        stop(process)


# -- Prometheus ----------------------------------------------------------------------------------------


def test_prometheus_config_passes_promtool() -> None:
    done = subprocess.run(
        [promtool(), "check", "config", str(PROMETHEUS_FILE)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_scrapes_triton_and_the_gateway() -> None:
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {name: [t for s in job["static_configs"] for t in s["targets"]] for name, job in jobs.items()}
    assert targets["triton"] == ["triton:8002"] and jobs["triton"]["metrics_path"] == "/metrics"
    assert targets["gateway"] == ["gateway:8080"] and jobs["gateway"]["metrics_path"] == "/metrics"
    # Those are the compose names and ports: Triton's metrics port, the gateway's own port.
    for name in TRITONS:
        assert "8002" in SERVICES[name]["expose"]
    assert SERVICES["gateway"]["environment"]["BIRDGEN_GATEWAY_PORT"] == "8080"
    mounts = SERVICES["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert "--config.file=/etc/prometheus/prometheus.yml" in SERVICES["prometheus"]["command"]


# -- Grafana -------------------------------------------------------------------------------------------


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    grafana = SERVICES["grafana"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    (datasource,) = yaml.safe_load((GRAFANA / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    assert datasource["url"] == "http://prometheus:9090"  # the compose service, its published port's target
    assert SERVICES["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    (provider,) = yaml.safe_load((GRAFANA / "dashboards" / "birdgen.yaml").read_text())["providers"]
    folder = Path(provider["options"]["path"])
    assert folder == Path("/etc/grafana/provisioning/dashboards")
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == str(
        folder / DASHBOARD_FILE.name
    )
    # The dashboard picks its Prometheus through a variable whose default is the provisioned one, so
    # it also imports into another Grafana (Kubernetes) as is.
    board = dashboard()
    (variable,) = board["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    assert variable["current"]["value"] == datasource["uid"]
    for panel in dashboard_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])


def test_dashboard_layout() -> None:
    board = dashboard()
    assert board["uid"] == "birdgen"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
    for panel in dashboard_panels():
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert promql_metrics(target["expr"]), f"{panel['title']}: {target['expr']}"


def test_dashboard_has_the_panels_operators_need() -> None:
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard_panels()}

    def panel(*words: str) -> str:
        (title,) = [t for t in exprs if all(w.lower() in t.lower() for w in words)]
        return exprs[title]

    latency = panel("latency", "p50")
    bucket = "birdgen_gateway_request_duration_seconds_bucket"
    for quantile in ("0.50", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate({bucket}" in latency
    assert "birdgen_gateway_requests_total" in panel("throughput")
    assert "nv_inference_queue_duration_us" in panel("queue time")
    hit_rate = panel("cache hit rate")
    assert {"birdgen_cache_hits_total", "birdgen_cache_misses_total"} <= promql_metrics(hit_rate)
    assert {"nv_cache_num_hits_per_model", "nv_cache_num_misses_per_model"} <= promql_metrics(hit_rate)
    assert promql_metrics(panel("gpu utilisation")) == {"nv_gpu_utilization"}
    assert promql_metrics(panel("gpu memory")) == {"nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"}
    assert "birdgen_gateway_rate_limited_total" in panel("rate-limit")


def test_dashboard_and_adapter_queries_parse_with_promtool(tmp_path: Path) -> None:
    """Each PromQL expression as a recording rule: promtool parses every one of them."""
    exprs = [e.replace("$__rate_interval", "5m") for e in dashboard_exprs()]
    assert not any("$" in e for e in exprs)
    rules = [{"record": f"birdgen:dashboard:{i}", "expr": e} for i, e in enumerate(exprs)]
    rules.append({"record": "birdgen:adapter:triton_queue", "expr": adapter_query()})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "birdgen", "rules": rules}]}))
    done = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_dashboard_gateway_metrics_are_the_gateways() -> None:
    """Every metric the dashboard reads that is not Triton's (nv_*) is one the gateway exposes."""
    exposed = gateway_metric_names()
    used = {name for expr in dashboard_exprs() for name in promql_metrics(expr) if not name.startswith("nv_")}
    assert used and used <= exposed, used - exposed
    assert {
        "birdgen_gateway_requests_total",
        "birdgen_gateway_request_duration_seconds_bucket",
        "birdgen_gateway_rate_limited_total",
        "birdgen_gateway_batch_items_total",
        "birdgen_gateway_batch_jobs_running",
        "birdgen_cache_hits_total",
        "birdgen_cache_misses_total",
        "birdgen_cache_errors_total",
    } <= used


def _scrape(url: str) -> dict[str, list[str]]:
    """Metric name -> its sample lines (families declared by # TYPE with no sample yet included)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            samples.setdefault(line.split()[2], [])
        elif line and not line.startswith("#"):
            name = re.match(r"[A-Za-z_:][\w:]*", line)
            assert name, line
            samples.setdefault(name.group(0), []).append(line)
    return samples


@pytest.mark.triton
def test_triton_metrics_the_dashboard_and_the_autoscaler_read_exist(server: TritonServer) -> None:
    """The nv_* names in the dashboard and the adapter rule are ones Triton exposes: scraped from a real
    CPU tritonserver serving the exported repository, plus the GPU-only ones (TRITON_GPU_METRICS)."""
    scraped = _scrape(server.metrics_url)
    used = {name for expr in dashboard_exprs() for name in promql_metrics(expr) if name.startswith("nv_")}
    adapter = promql_metrics(adapter_query())
    assert adapter == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    used |= adapter
    unknown = used - set(scraped) - TRITON_GPU_METRICS
    assert not unknown, f"not exposed by Triton: {sorted(unknown)}"
    assert TRITON_GPU_METRICS.isdisjoint(scraped) or shutil.which("nvidia-smi"), (
        "a CPU server with GPU metrics?"
    )
    # The labels the queries and legends use: per-model series, bird_image among them.
    for name in ("nv_inference_queue_duration_us", "nv_inference_request_success", "nv_inference_count"):
        assert any('model="bird_image"' in line for line in scraped[name]), name
    assert any('model="bird_image"' in line for line in scraped["nv_cache_num_hits_per_model"])
    # The adapter's series query selects bird_image's queue time series.
    assert 'model="bird_image"' in adapter_rule()["seriesQuery"]


# -- Kubernetes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_kubernetes_manifests_match_the_schemas(path: Path, version: str) -> None:
    """Strict: an unknown or misspelt field fails, as does a wrong type (schemas bundled, no network)."""
    docs = k8s_docs(path)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_kustomizations_list_every_manifest() -> None:
    listed = {
        folder / name
        for folder in (K8S, K8S / "export")
        for name in yaml.safe_load((folder / "kustomization.yaml").read_text())["resources"]
    }
    # The Secrets are templates, never applied.
    assert listed == set(k8s_files()) - {SECRET_TEMPLATE, TRITON_SECRET_TEMPLATE}
    for folder in (K8S, K8S / "export"):
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        assert kustomization["namespace"] == "birdgen"


def test_kubectl_kustomize_builds() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (its kustomize builds the manifests offline)")
    for folder in (K8S, K8S / "export"):
        done = subprocess.run(
            ["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        docs = [d for d in yaml.safe_load_all(done.stdout) if d]
        assert len(docs) == len(kustomized_docs(folder))
        for doc in docs:
            kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == "birdgen", doc["metadata"]["name"]
            assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "birdgen"
            if "template" in doc.get("spec", {}):
                for container in containers(doc):
                    image = container["image"]
                    assert image.startswith("redis:") or image.endswith(":0.1.0"), image


BASE = kustomized_docs(K8S) if (K8S / "kustomization.yaml").is_file() else []


def test_kubernetes_selectors_ports_and_claims_connect() -> None:
    workloads = [d for d in BASE + kustomized_docs(K8S / "export") if "template" in d.get("spec", {})]
    for service in (d for d in BASE if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        (pod,) = [
            w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        ports = {p["name"] for c in containers(pod) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: {port}"
    for workload in workloads:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        if "selector" in workload["spec"]:
            assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                find(BASE, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        for container in containers(workload):
            resources = container["resources"]
            assert resources["requests"]["memory"] and resources["limits"]["memory"], container["name"]
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            volumes = {v["name"] for v in workload["spec"]["template"]["spec"].get("volumes", [])}
            claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
            assert mounts <= volumes | claims, container["name"]
    for budget in (d for d in BASE if d["kind"] == "PodDisruptionBudget"):
        selector = budget["spec"]["selector"]["matchLabels"]
        (target,) = [
            w for w in workloads if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert target["kind"] == "Deployment"
    for autoscaler in (d for d in BASE if d["kind"] == "HorizontalPodAutoscaler"):
        target = autoscaler["spec"]["scaleTargetRef"]
        find(BASE, target["kind"], target["name"])
    assert {d["metadata"]["name"] for d in BASE if d["kind"] == "PodDisruptionBudget"} == {
        "triton",
        "gateway",
    }


def test_kubernetes_triton() -> None:
    deployment = find(BASE, "Deployment", "triton")
    wait, triton = containers(deployment)
    assert triton["image"] == wait["image"] == "birdgen-server"
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert triton["resources"]["requests"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    # Live: no python-backend stub died (Triton neither restarts one nor says so) and Triton answers.
    (shell, flag, script) = triton["livenessProbe"]["exec"]["command"]
    assert (shell, flag) == ("sh", "-c") and script.startswith("birdgen check-stubs &&")
    assert healthcheck_url([script]) == f"http://127.0.0.1:{ports['http']}/v2/health/live"
    startup = triton["startupProbe"]
    assert (
        startup["httpGet"]["path"] == "/v2/health/ready"
        and startup["failureThreshold"] * startup["periodSeconds"] >= 600
    )
    # Every variable is one the entrypoint reads; replicas serve what the export job wrote.
    help_text = entrypoint_variables()
    env = container_env(triton)
    job_env = container_env(containers(find(kustomized_docs(K8S / "export"), "Job", "birdgen-export"))[0])
    for variable in {*env, *job_env}:
        assert f"[{variable}]" in help_text, variable
    assert env["BIRDGEN_EXPORT"] == "never" and env["BIRDGEN_ENGINE"] == job_env["BIRDGEN_ENGINE"]
    assert env["BIRDGEN_ENGINE"] in ENGINE_KINDS
    assert env["BIRDGEN_MODEL_REPOSITORY"] == job_env["BIRDGEN_MODEL_REPOSITORY"] == "/models/repository"
    mounts = {m["mountPath"]: m for m in triton["volumeMounts"]}
    assert mounts["/models/repository"]["readOnly"] and "/dev/shm" in mounts
    # The init container waits for the file the entrypoint writes after a complete export.
    assert TARGET_FILE in wait["command"][-1]
    assert find(BASE, "PersistentVolumeClaim", "model-repository")["spec"]["accessModes"] == ["ReadWriteMany"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ports["metrics"])
    # The export job runs the same image's entrypoint, export only.
    job = find(kustomized_docs(K8S / "export"), "Job", "birdgen-export")
    (exporter,) = containers(job)
    assert exporter["image"] == "birdgen-server" and exporter["args"] == ["--export-only"]
    assert build_parser().parse_args(["entrypoint", *exporter["args"]]).export_only
    assert exporter["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_kubernetes_triton_autoscales_on_the_adapters_queue_metric() -> None:
    autoscaler = find(BASE, "HorizontalPodAutoscaler", "triton")
    (metric,) = autoscaler["spec"]["metrics"]
    assert metric["type"] == "Pods"
    rule = adapter_rule()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert re.fullmatch(r"\^?nv_inference_queue_duration_us\$?", rule["name"]["matches"])
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    assert autoscaler["spec"]["minReplicas"] >= 1 and autoscaler["spec"]["maxReplicas"] > 1
    gateway = find(BASE, "HorizontalPodAutoscaler", "gateway")
    (cpu,) = gateway["spec"]["metrics"]
    assert cpu["type"] == "Resource" and cpu["resource"]["name"] == "cpu"


def test_kubernetes_gateway() -> None:
    deployment = find(BASE, "Deployment", "gateway")
    (gateway,) = containers(deployment)
    assert gateway["image"] == "birdgen-gateway"
    config = find(BASE, "ConfigMap", "birdgen-gateway")["data"]
    assert [e["configMapRef"]["name"] for e in gateway["envFrom"]] == ["birdgen-gateway"]
    env = {**config, **container_env(gateway)}
    assert set(env) == GATEWAY_ENV_SET and set(env) <= GATEWAY_ENV
    # Triton and Redis by their Services and ports.
    host, port = env["BIRDGEN_TRITON_URL"].split(":")
    triton_ports = {p["name"]: p["port"] for p in find(BASE, "Service", host)["spec"]["ports"]}
    assert triton_ports["grpc"] == int(port)
    assert env["BIRDGEN_REDIS_URL"] == "redis://redis:6379/0"
    assert find(BASE, "Service", "redis")["spec"]["ports"][0]["port"] == 6379
    # The API keys only from a Secret, which the repository holds as a template.
    secret_ref = env["BIRDGEN_API_KEYS"]["secretKeyRef"]
    (template,) = k8s_docs(SECRET_TEMPLATE)
    assert template["kind"] == "Secret" and template["metadata"]["name"] == secret_ref["name"]
    assert template["stringData"][secret_ref["key"]].startswith("<")  # a placeholder, not a key
    assert not [d for d in BASE if d["kind"] == "Secret"]
    assert all(isinstance(v, str) and not SECRET_NAME.search(k) for k, v in config.items())
    # Port, probes: ready only while Triton and Redis answer; alive as long as the process answers.
    (container_port,) = gateway["ports"]
    assert container_port["containerPort"] == int(env["BIRDGEN_GATEWAY_PORT"])
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert "httpGet" not in gateway["livenessProbe"]
    # Non-root, as the image's numeric USER.
    security = deployment["spec"]["template"]["spec"]["securityContext"]
    (user,) = _instructions(GATEWAY_DOCKERFILE, "USER")
    assert security["runAsNonRoot"] and f"{security['runAsUser']}:{security['runAsGroup']}" == user


def test_kubernetes_containers_run_as_non_root_without_privileges() -> None:
    """Every pod non-root (its image's numeric user for ours), no container may gain privileges, keep
    a capability or write its root filesystem; what each writes is a volume."""
    server_user = _instructions(SERVER_DOCKERFILE, "USER")[-1]
    (home,) = re.findall(r"HOME=(\S+)", " ".join(_instructions(SERVER_DOCKERFILE, "ENV")))
    workloads = [d for d in BASE + kustomized_docs(K8S / "export") if "template" in d.get("spec", {})]
    assert {w["metadata"]["name"] for w in workloads} == {"triton", "gateway", "redis", "birdgen-export"}
    for workload in workloads:
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0 and pod["runAsGroup"] > 0, name
        for container in containers(workload):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, container["name"]
            assert security["readOnlyRootFilesystem"] is True, container["name"]
            assert security["capabilities"]["drop"] == ["ALL"], container["name"]
        if name in ("triton", "birdgen-export"):  # the server image
            assert f"{pod['runAsUser']}:{pod['runAsGroup']}" == server_user, name
            served = containers(workload)[-1]
            mounts = {m["mountPath"] for m in served["volumeMounts"]}
            assert {"/tmp", home, "/dev/shm", "/models/repository"} <= mounts, name
    job = find(kustomized_docs(K8S / "export"), "Job", "birdgen-export")
    assert job["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 10001  # writes the volume


def test_kubernetes_secrets_come_from_secrets_never_literal_values() -> None:
    """BIRDGEN_ADMIN_KEY (Triton) and BIRDGEN_API_KEYS (gateway) from secretKeyRefs of Secrets the
    repository holds only as templates with placeholders; no secret-named variable has a value."""
    workloads = [d for d in BASE + kustomized_docs(K8S / "export") if "template" in d.get("spec", {})]
    for container in (c for w in workloads for c in containers(w)):
        for item in container.get("env", []):
            if SECRET_NAME.search(item["name"]):
                assert "value" not in item and "secretKeyRef" in item["valueFrom"], item["name"]
    triton = containers(find(BASE, "Deployment", "triton"))[-1]
    refs = {"BIRDGEN_ADMIN_KEY": (triton, TRITON_SECRET_TEMPLATE)}
    refs["BIRDGEN_API_KEYS"] = (containers(find(BASE, "Deployment", "gateway"))[0], SECRET_TEMPLATE)
    for variable, (container, template_path) in refs.items():
        ref = container_env(container)[variable]["secretKeyRef"]
        (template,) = k8s_docs(template_path)
        assert template["kind"] == "Secret" and template["metadata"]["name"] == ref["name"]
        assert template["stringData"][ref["key"]].startswith("<")  # a placeholder, not a key
        assert ref.get("optional") is not True, variable  # no pod starts without it
    assert "[BIRDGEN_ADMIN_KEY]" in entrypoint_variables()


def test_compose_services_run_without_privileges_and_triton_gets_its_keys_from_the_env() -> None:
    for name, service in SERVICES.items():
        assert service["security_opt"] == ["no-new-privileges:true"], name
        assert str(service.get("user", "")).split(":")[0] not in ("0", "root"), name
    assert SERVICES["redis"]["user"] == "999:999"  # as in redis.yaml, not the image's root start
    # Read-only where a service writes only its volume (and the gateway's /tmp).
    for name in ("gateway", "redis", "prometheus"):
        assert SERVICES[name]["read_only"] is True, name
    assert SERVICES["gateway"]["tmpfs"] == ["/tmp"]
    variables = compose_variables()
    for name in TRITONS:
        environment = SERVICES[name]["environment"]
        for variable in ("BIRDGEN_ADMIN_KEY", "BIRDGEN_MANIFEST_PUBLIC_KEY"):
            match = _VARIABLE.fullmatch(environment[variable])
            assert match and match.group(1) == variable, (name, variable)
            assert variables[variable][1] == "", f"{variable} has a default"
    assigned, named = env_example()
    assert assigned["BIRDGEN_ADMIN_KEY"] == "" and "BIRDGEN_MANIFEST_PUBLIC_KEY" in named


# -- the gateway image ---------------------------------------------------------------------------------


def _instructions(path: Path, keyword: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", path.read_text())
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(keyword + " ")]


def test_gateway_image_base_and_pins() -> None:
    assert _instructions(GATEWAY_DOCKERFILE, "FROM") == ["python:${PYTHON_VERSION}-slim"]
    (version,) = [
        a.split("=", 1)[1] for a in _instructions(GATEWAY_DOCKERFILE, "ARG") if a.startswith("PYTHON_")
    ]
    assert version == f"{sys.version_info.major}.{sys.version_info.minor}"  # the Python the tests run
    text = GATEWAY_DOCKERFILE.read_text()
    assert not re.search(r"==\s*\d", text), "pins belong in pyproject.toml (docker/pins.py reads them)"
    extras = [
        e.split()
        for run in _instructions(GATEWAY_DOCKERFILE, "RUN")
        for e in re.findall(r"pins\.py ([a-z ]+?) >", run)
    ]
    assert extras == [["gateway"]]
    requirements = pins["requirements"](["gateway"])
    project = PYPROJECT["project"]
    assert requirements == [*project["dependencies"], *project["optional-dependencies"]["gateway"]]
    names = {re.split(r"[\[=<>]", r)[0].lower() for r in requirements}
    assert {"fastapi", "uvicorn", "tritonclient", "redis"} <= names
    assert names.isdisjoint({"torch", "diffusers", "transformers", "onnxruntime", "nvidia-pytriton"})


def test_gateway_image_copies_every_package_folder() -> None:
    copied = {a.split()[0] for a in _instructions(GATEWAY_DOCKERFILE, "COPY")}
    folders = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    assert "gateway" in folders and folders <= copied
    ignored = [
        ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")
    ]
    for path in copied:
        assert (ROOT / path).exists(), path
        assert not any(Path(path).match(pattern.removeprefix("**/")) for pattern in ignored), path


def test_gateway_image_runs_the_gateway_command_without_torch() -> None:
    (entry,) = _instructions(GATEWAY_DOCKERFILE, "ENTRYPOINT")
    argv = json.loads(entry)
    assert argv == ["birdgen", "gateway"]
    assert build_parser().parse_args(argv[1:]).run.__name__ == "_gateway"
    assert _instructions(GATEWAY_DOCKERFILE, "EXPOSE") == ["8080"]
    assert "BIRDGEN_GATEWAY_PORT=8080" in _instructions(GATEWAY_DOCKERFILE, "ENV")
    assert not any("API_KEYS=" in e for e in _instructions(GATEWAY_DOCKERFILE, "ENV"))
    # What the image imports at build time loads no model library.
    heavy = "{'torch', 'diffusers', 'transformers', 'onnxruntime'}"
    code = f"import sys, birdgen.gateway.app; print(sorted({heavy} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"
