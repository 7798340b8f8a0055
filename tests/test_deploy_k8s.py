"""deploy/: the Kubernetes manifests pass Kubernetes' own schemas, strictly (an unknown or misplaced field fails,
as kubectl apply would refuse it), and agree with each other, with the server and with the image they run."""
import copy
import fnmatch
import json
import os
import re

import kubernetes_validate
import pytest
import yaml

from telemetry.prometheus import WAITING

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "deploy", "k8s")
KUBERNETES_VERSIONS = ("1.30", "1.37")  # a cluster some releases old, and the newest schemas the package ships
MARGIN_S = 10  # what the workers and the engine process need to exit once the drain is over


def manifest_paths() -> list[str]:
    return sorted(os.path.join(K8S, name) for name in os.listdir(K8S) if name.endswith((".yaml", ".yml")))


def documents() -> list[dict]:
    docs = []
    for path in manifest_paths():
        with open(path) as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    return docs


def name(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def one(kind: str) -> dict:
    [doc] = [d for d in documents() if d["kind"] == kind]
    return doc


def server_container() -> dict:
    [container] = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def container_port(container: dict, port: int | str) -> int:
    """A port as a number: named ports resolve through the container's ports."""
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return number


def prestop_sleep_s(container: dict) -> int:
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    return int(command[1])


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("doc", documents(), ids=name)
def test_every_manifest_passes_the_kubernetes_schemas(doc, version):
    kubernetes_validate.validate(doc, version, strict=True)  # raises on any error, and on a kind it has no schema for


def test_the_manifests_have_a_deployment_its_service_and_its_autoscaler():
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= {d["kind"] for d in documents()}


def test_strict_validation_refuses_an_unknown_field():
    deployment = copy.deepcopy(one("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["graceful_timeout"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_server_runs_dynamic_on_the_port_it_is_told():
    container = server_container()
    assert container["command"] == ["./server.sh", "dynamic"]
    settings = env(container)
    assert settings["HOST"] == "0.0.0.0"
    assert [p["containerPort"] for p in container["ports"]] == [int(settings["PORT"])]


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_probes_ask_health_on_the_servers_port(probe):
    container = server_container()
    get = container[probe]["httpGet"]
    assert get["path"] == "/health"
    assert container_port(container, get["port"]) == int(env(container)["PORT"])


def test_liveness_outlasts_prestop_and_the_drain():
    """/health answers 503 while the server drains: a kubelet that probes a terminating pod must not kill it
    for that before the drain is over."""
    container = server_container()
    live = container["livenessProbe"]
    tolerated_s = live["periodSeconds"] * live["failureThreshold"]
    assert tolerated_s > prestop_sleep_s(container) + float(env(container)["GRACEFUL_TIMEOUT_S"])


def test_grace_period_covers_prestop_the_drain_and_a_margin():
    pod = one("Deployment")["spec"]["template"]["spec"]
    container = server_container()
    drain_s = float(env(container)["GRACEFUL_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= prestop_sleep_s(container) + drain_s + MARGIN_S


def test_one_gpu_per_pod():
    assert server_container()["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_prometheus_scrapes_the_servers_metrics():
    annotations = one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == int(env(server_container())["PORT"])


def test_service_selects_the_pods_and_targets_the_servers_port():
    deployment, service = one("Deployment"), one("Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container = server_container()
    [port] = service["spec"]["ports"]
    assert container_port(container, port["targetPort"]) == int(env(container)["PORT"])


def adapter_rule() -> dict:
    """The prometheus-adapter rule written in hpa.yaml's comments (the lines indented "#   ")."""
    with open(os.path.join(K8S, "hpa.yaml")) as f:
        lines = [line.removeprefix("#   ") for line in f if line.startswith("#   ")]
    [rule] = yaml.safe_load("".join(lines))
    return rule


def test_hpa_scales_the_deployment_on_the_waiting_queue():
    hpa, deployment = one("HorizontalPodAutoscaler"), one("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"]  # the HPA's to set
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    rule = adapter_rule()
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    series = WAITING._name  # the gauge GET /metrics exports
    assert rule["seriesQuery"].startswith(series + "{")
    assert re.fullmatch(rule["name"]["matches"], series)
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined."""
    with open(os.path.join(ROOT, "deploy", "Dockerfile")) as f:
        text = re.sub(r"\\\n", " ", f.read())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_image_runs_server_sh_on_the_manifests_port():
    instructions = dockerfile_instructions()
    [cmd] = [json.loads(args) for op, args in instructions if op == "CMD"]
    assert cmd == server_container()["command"]
    assert os.access(os.path.join(ROOT, cmd[0]), os.X_OK)
    [exposed] = [int(args) for op, args in instructions if op == "EXPOSE"]
    assert exposed == int(env(server_container())["PORT"])


def test_the_image_copies_files_that_exist():
    copies = [args.split()[:-1] for op, args in dockerfile_instructions() if op == "COPY"]
    assert copies
    for sources in copies:
        for source in sources:
            assert os.path.exists(os.path.join(ROOT, source)), source


def test_the_image_installs_every_requirement_but_the_cpu_torch():
    runs = " ".join(args for op, args in dockerfile_instructions() if op == "RUN")
    [pattern] = re.findall(r"grep -v '([^']+)' requirements\.txt", runs)
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        dropped = [line.strip() for line in f if re.search(pattern, line)]
    assert len(dropped) == 1 and dropped[0].startswith("torch=="), dropped


def test_dockerignore_keeps_what_the_server_needs_and_drops_the_local_venv():
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        patterns = [line.strip() for line in f if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatch(p, pattern) for p in prefixes for pattern in patterns)

    for needed in ("server.sh", "gunicorn_conf.py", "app.py", "requirements.txt", "assets/gpt2.tiktoken",
                   "static/index.html", "engine/config.py"):
        assert not ignored(needed), needed
    assert ignored(".venv/bin/python")  # server.sh would prefer it to the image's Python
