"""deploy/: the Kubernetes manifests are valid against the API schemas (kubernetes-validate bundles them: offline),
and what they say agrees with the server: gRPC probes on the health service at the serving port, every RAG_*
variable a real setting with a valid value, resources, a headless Service, a budget and an autoscaler that select
the pods, and a termination grace that outlasts the server's drain."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import kubernetes_validate  # the test extra installs it; its schemas are bundled, so this runs offline
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
# The oldest release the manifests need (apps.kubernetes.io/pod-index for shards; gRPC probes are GA since 1.27),
# and the newest the validator knows.
VERSIONS = ("1.32.0", kubernetes_validate.latest_version())


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((str(path.relative_to(DEPLOY)), doc))
    return docs


DOCS = _documents()


def _of(kind: str) -> list[dict]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def _by_name(kind: str, name: str) -> dict:
    (doc,) = [d for d in _of(kind) if d["metadata"]["name"] == name]
    return doc


def _workloads() -> list[dict]:
    return _of("Deployment") + _of("StatefulSet")


def _env(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version):
    assert {d["kind"] for _, d in DOCS} >= {
        "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "StatefulSet",
        "PersistentVolumeClaim", "Job"}
    for name, doc in DOCS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {error.message} at {list(error.path)}")


def test_the_validator_rejects_a_broken_manifest():
    deployment = copy.deepcopy(_by_name("Deployment", "rag-serve"))
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["grpc"]["port"] = "grpc"  # gRPC probes take a number, not a port name
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)
    deployment = copy.deepcopy(_by_name("Deployment", "rag-serve"))
    deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["request"] = {}  # a typo: strict refuses
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)


def test_kustomizations_list_every_manifest():
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        listed = yaml.safe_load(kustomization.read_text())["resources"]
        for resource in listed:
            assert (kustomization.parent / resource).is_file(), (kustomization, resource)
    top = set(yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["resources"])
    assert top == {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml", "index-build-job.yaml"}


def test_pods_probe_grpc_health_on_the_serving_port_with_resources():
    for workload in _workloads():
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        port = int(_flag(container["args"], "--port"))
        assert {"name": "grpc", "containerPort": port, "protocol": "TCP"} in container["ports"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            assert probe["grpc"]["port"] == port, (workload["metadata"]["name"], kind)
            # the names the server registers with the health service (server.py)
            assert probe["grpc"]["service"] in ("", "rag.v1.Retriever")
        assert container["readinessProbe"]["grpc"]["service"] == "rag.v1.Retriever"
        resources = container["resources"]
        assert resources["requests"] == resources["limits"]  # Guaranteed QoS: no throttling, last to be evicted
        assert {"cpu", "memory"} <= set(resources["requests"])
        # The index volume is mounted read-only, from a claim opened read-only.
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["index"]["readOnly"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["index"]["persistentVolumeClaim"]["readOnly"] is True
        assert _flag(container["args"], "--index").startswith(mounts["index"]["mountPath"] + "/")
        assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_environment_is_a_valid_server_configuration(monkeypatch):
    """Every RAG_* variable names a setting (RAG_SECTION__NAME for a section's; an unknown variable would be
    silently ignored) and its value passes the setting's validation."""
    from rag_service.core.config import env_name, load_config, settings

    known = {env_name(name) for name, _ in settings()}

    for workload in _workloads():
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        env = {k: v for k, v in _env(container).items() if k.startswith("RAG_")}
        for name in env:
            assert name in known, name
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value if value is not None else "from-the-downward-api")
            args = container["args"]
            config = load_config(None, index=Path(_flag(args, "--index")), host=_flag(args, "--host"),
                                 port=int(_flag(args, "--port")), metrics={"port": int(_flag(args, "--metrics-port"))})
        assert config.host == "0.0.0.0" and config.metrics.host == "0.0.0.0"
        # The pod gets SIGKILL after terminationGracePeriodSeconds: the notice and the drain must fit in it.
        grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert config.shutdown_notice_seconds + config.grace_seconds + 5 <= grace, workload["metadata"]["name"]


def test_services_are_headless_and_select_the_pods():
    for workload in _workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        name = workload["metadata"]["name"]
        service = _by_name("Service", name)
        assert service["spec"]["clusterIP"] == "None"  # DNS answers with every pod: client-side round_robin
        assert service["spec"]["selector"].items() <= labels.items()
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in container["ports"]}
        budget = _by_name("PodDisruptionBudget", name)
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (hpa,) = _of("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "rag-serve")
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in _by_name("Deployment", "rag-serve")["spec"]  # the autoscaler owns the count
    # Clients only find the pods it adds when they re-resolve: connections must age out.
    (container,) = _by_name("Deployment", "rag-serve")["spec"]["template"]["spec"]["containers"]
    assert float(_env(container)["RAG_MAX_CONNECTION_AGE_SECONDS"]) > 0


def test_router_lists_every_shard_of_the_statefulset():
    shards = _by_name("StatefulSet", "rag-shard")
    (router,) = _by_name("Deployment", "rag-router")["spec"]["template"]["spec"]["containers"]
    (shard,) = shards["spec"]["template"]["spec"]["containers"]
    port = _flag(shard["args"], "--port")
    listed = _flag(router["args"], "--shards").split(",")
    service = shards["spec"]["serviceName"]
    assert listed == [f"{shards['metadata']['name']}-{i}.{service}:{port}" for i in range(shards["spec"]["replicas"])]
    assert _by_name("Service", service)["spec"]["publishNotReadyAddresses"] is True


def test_rolling_reload_script_parses():
    done = subprocess.run(["bash", "-n", str(DEPLOY / "rolling-reload.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
