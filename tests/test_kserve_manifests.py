"""The KServe InferenceService (deploy/kserve): valid YAML, the predictor's pod validates against the Kubernetes
schemas, and it agrees with the service (probe routes, port, drain budget) and with the Kubernetes manifests."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from camserve.api import create_app
from camserve.settings import Settings
from tests.k8shelpers import K8S_VERSION

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
# Fields of KServe's predictor spec that are not PodSpec fields (ComponentExtensionSpec and the model specs).
KSERVE_ONLY = {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "containerConcurrency", "timeout",
    "canaryTrafficPercent", "logger", "batcher", "labels", "annotations", "deploymentStrategy", "autoScaling",
    "model", "workerSpec",
}  # fmt: skip


def documents() -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc}


def predictor() -> dict:
    return documents()["InferenceService"]["spec"]["predictor"]


def test_inference_service_is_a_custom_predictor_of_the_same_image():
    docs = documents()
    assert sorted(docs) == ["InferenceService", "ScaledObject"]
    isvc = docs["InferenceService"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert annotations["serving.kserve.io/autoscalerClass"] == "external"  # the ScaledObject owns the replicas
    spec = predictor()
    (camserve,) = spec["containers"]
    assert camserve["name"] == "kserve-container"
    cpu_overlay = yaml.safe_load((ROOT / "deploy/kubernetes/overlays/cpu/kustomization.yaml").read_text())
    (image,) = cpu_overlay["images"]
    assert camserve["image"] == f"{image['newName']}:{image['newTag']}"
    deployment = yaml.safe_load((ROOT / "deploy/kubernetes/base/deployment.yaml").read_text())
    (base,) = deployment["spec"]["template"]["spec"]["containers"]
    assert camserve["args"] == base["args"] == ["serve"]


def test_predictor_pod_validates_against_the_kubernetes_schemas():
    import kubernetes_validate

    spec = predictor()
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "camserve-predictor", "annotations": spec.get("annotations", {})},
        "spec": {k: v for k, v in spec.items() if k not in KSERVE_ONLY},
    }
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    broken = {**pod, "spec": {**pod["spec"], "container": pod["spec"]["containers"]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_probes_port_and_shutdown_agree_with_the_service():
    spec = predictor()
    (camserve,) = spec["containers"]
    env = {e["name"]: e for e in camserve["env"]}
    (port,) = camserve["ports"]
    assert port["containerPort"] == int(env["CAMSERVE_PORT"]["value"]) == 8080
    assert env["CAMSERVE_TORCH_THREADS"]["valueFrom"]["resourceFieldRef"]["containerName"] == camserve["name"]
    routes = {path for path, item in create_app(Settings()).openapi()["paths"].items() if "get" in item}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert camserve[probe]["httpGet"]["path"] in routes
        assert camserve[probe]["httpGet"]["port"] == port["containerPort"]
    assert camserve["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert camserve["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    drain = float(env["CAMSERVE_DRAIN_S"]["value"])
    timeout = float(env["CAMSERVE_REQUEST_TIMEOUT_S"]["value"])
    assert spec["timeout"] == timeout
    assert spec["terminationGracePeriodSeconds"] > drain + timeout + 5
    assert spec["annotations"]["prometheus.io/port"] == str(port["containerPort"])
    assert camserve["securityContext"]["readOnlyRootFilesystem"] is True and env["HOME"]["value"] == "/tmp"


def test_scaled_object_scales_the_predictor_deployment_on_the_backlog():
    docs = documents()
    scaled = docs["ScaledObject"]
    name = docs["InferenceService"]["metadata"]["name"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == f"{name}-predictor"
    spec = predictor()
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (
        spec["minReplicas"],
        spec["maxReplicas"],
    )
    (trigger,) = scaled["spec"]["triggers"]
    keda = yaml.safe_load((ROOT / "deploy/kubernetes/components/keda/scaledobject.yaml").read_text())
    (reference,) = keda["spec"]["triggers"]
    assert trigger["metadata"]["threshold"] == reference["metadata"]["threshold"]
    query = trigger["metadata"]["query"]
    assert sorted(set(re.findall(r"camserve_\w+", query))) == ["camserve_pending_forwards"]
    assert query.count(f'pod=~"{name}-predictor-.*"') == 1
