#!/usr/bin/env bash
# Build the image with Podman on a locally made Debian base, run it, check /predict and /explain on a
# real photo, remove the container. Usage: scripts/container-test.sh   (env: W scratch dir, PORT)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${W:-/tmp/camserve-podman}
PORT=${PORT:-18080}
IMAGE=localhost/camserve:test
NAME=camserve-container-test
PY=${PY:-.venv/bin/python}

if ! command -v podman >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq podman buildah debootstrap runc fuse-overlayfs slirp4netns uidmap >/dev/null
fi
mkdir -p "$W"
cat > "$W/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
cat > "$W/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$W/storage"
runroot = "$W/run"
CONF
export CONTAINERS_CONF=$W/containers.conf CONTAINERS_STORAGE_CONF=$W/storage.conf

if ! podman image exists localhost/debian:bookworm; then
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2; exit}' || true)
  rm -rf "$W/rootfs"
  debootstrap --variant=minbase bookworm "$W/rootfs" "${mirror:-http://deb.debian.org/debian}" >/dev/null
  rm -rf "$W/rootfs/var/cache/apt/archives/"*.deb "$W/rootfs/var/lib/apt/lists/"*
  tar -C "$W/rootfs" -c . | podman import - localhost/debian:bookworm >/dev/null
fi

# Local wheel folders (see `pip config list`) are mounted read-only so the build needs no big downloads;
# the host's CA bundle is mounted too, for registries reached through this machine's TLS proxy.
volumes=()
pip_args=""
for dir in /opt/wheels /opt/pypi/files /opt/pypi-more/files; do
  if [ -d "$dir" ]; then volumes+=(-v "$dir:$dir:ro"); pip_args+=" --find-links $dir"; fi
done
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  volumes+=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro)
  pip_args+=" --cert /run/host-ca.crt"
fi
started=$(date +%s)
podman build -q --format docker -t "$IMAGE" "${volumes[@]}" \
  --build-arg BASE_IMAGE=localhost/debian:bookworm --build-arg PIP_EXTRA_ARGS="$pip_args" . >/dev/null
echo "built $IMAGE in $(( $(date +%s) - started )) s; size: $(podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "%.2f GB", $1/1e9}')"

podman rm -f "$NAME" >/dev/null 2>&1 || true
trap 'podman logs "$NAME" > "$W/container.log" 2>&1 || true; podman rm -f "$NAME" >/dev/null 2>&1 || true' EXIT
run_started=$(date +%s)
podman run -d --name "$NAME" --network host -e CAMSERVE_DEVICE=cpu -e CAMSERVE_PORT="$PORT" \
  -e CAMSERVE_HOST=127.0.0.1 "$IMAGE" >/dev/null
echo "user in container: $(podman exec "$NAME" id -u)"

# The image's prepared cache holds the embedded model's ONNX graph; a host other than the builder times eager
# against ONNX Runtime once at start-up. Wait as long as the Kubernetes startupProbe allows (300 s).
READY_WAIT_S=${READY_WAIT_S:-300}
for _ in $(seq 1 "$READY_WAIT_S"); do
  if curl -sf "http://127.0.0.1:$PORT/health/ready" >/dev/null; then break; fi
  if [ "$(podman inspect -f '{{.State.Running}}' "$NAME")" != "true" ]; then
    podman logs "$NAME"; echo "container exited"; exit 1
  fi
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health/ready" >/dev/null || { podman logs "$NAME"; echo "not ready"; exit 1; }
echo "ready $(( $(date +%s) - run_started )) s after podman run"

# ONNX Runtime must be built from the image's cache: a missing library or export would fall back to eager.
curl -sf "http://127.0.0.1:$PORT/models" > "$W/models.json"
"$PY" - "$W/models.json" <<'CHECK'
import json, sys
models = json.load(open(sys.argv[1]))["models"]
missing = {m["name"]: m["runtime"]["not_used"] for m in models if "onnxruntime" in m["runtime"]["not_used"]}
assert not missing, f"ONNX Runtime not used: {missing}"
print("runtime: " + ", ".join(f"{m['name']} {[b['backend'] for b in m['runtime']['buckets']]}" for m in models))
CHECK
podman logs "$NAME" > "$W/container.log" 2>&1
grep -q "runtime auto in" "$W/container.log" || { tail -20 "$W/container.log"; echo "no runtime line in the log"; exit 1; }

"$PY" -c "from skimage import data; from PIL import Image; Image.fromarray(data.chelsea()).save('$W/cat.jpg')"
curl -sf -H 'Content-Type: image/jpeg' --data-binary @"$W/cat.jpg" "http://127.0.0.1:$PORT/predict?top_k=3" > "$W/predict.json"
curl -sf -F image=@"$W/cat.jpg" "http://127.0.0.1:$PORT/explain?method=gradcampp&overlay=true" > "$W/explain.json"
"$PY" - "$W" <<'CHECK'
import base64, io, json, sys
from PIL import Image
w = sys.argv[1]
top = json.load(open(f"{w}/predict.json"))["results"][0]["predictions"][0]
assert "cat" in top["label"], top
explanation = json.load(open(f"{w}/explain.json"))["results"][0]["explanations"][0]
heat = Image.open(io.BytesIO(base64.b64decode(explanation["heatmap"])))
overlay = Image.open(io.BytesIO(base64.b64decode(explanation["overlay"])))
assert heat.size == overlay.size == (451, 300) and heat.mode == "L" and overlay.mode == "RGB", (heat, overlay)
print(f"predict top-1: {top['label']} {top['score']:.3f}; explain: {explanation['label']} heatmap {heat.size} {heat.mode}")
CHECK
echo "container test passed"
