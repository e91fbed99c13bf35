# camserve: the two quick-start targets are `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-test serve prepare test lint openapi screenshot bench bench-methods bench-transformers bench-load bench-runtime evaluate container-test container-lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch/torchvision are pinned here so pip takes the exact builds instead of resolving the newest.
install: $(PY)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e .

install-test: $(PY)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev]'

serve: install
	$(VENV)/bin/camserve serve --host $(HOST) --port $(PORT)

# builds every cache for the models file (CAMSERVE_MODELS_FILE; embedded model when unset) so `serve` starts warm
prepare: install
	$(VENV)/bin/camserve prepare

test: install-test
	$(VENV)/bin/ruff check service tests bench
	$(VENV)/bin/python -m pytest -q

lint:
	$(VENV)/bin/ruff check service tests bench

openapi:
	$(PY) -m camserve.openapi_export openapi/openapi.json

# the README's picture of the explorer page, taken by its browser test (needs chromium: apt-get install chromium)
screenshot: install-test
	CAMSERVE_SCREENSHOT=docs/images/explorer.png $(PY) -m pytest -q tests/test_explorer.py -k real_browser

bench: install-test
	$(PY) -m bench.bench_engine --batches 1 8 32 --json docs/bench_engine_cpu.json

bench-methods: install-test
	$(PY) -m bench.bench_methods --batches 1 8 --repeats 3 1 --json docs/bench_methods_cpu.json

bench-transformers: install-test
	$(PY) -m bench.bench_transformers --batches 1 8 --repeats 15 7 --json docs/bench_transformers_cpu.json

bench-load: install-test
	$(PY) -m bench.bench_load --spawn --concurrency 1 4 16 64 --json docs/bench_load_cpu.json

# OpenVINO XAI is the anchor only: it pins an old OpenVINO, so it gets a venv of its own
bench-runtime: install-test
	test -x .venv-ovxai/bin/python || ($(PYTHON) -m venv .venv-ovxai && .venv-ovxai/bin/pip install -q openvino-xai==1.1.0)
	$(PY) -m bench.bench_runtime --openvino-xai-python .venv-ovxai/bin/python --json docs/bench_runtime_cpu.json

evaluate: install-test
	$(PIP) install -q --no-deps imgaug  # only its quokka photo and box are read
	$(PY) -m bench.evaluate --out docs/evaluation.json

container-lint: install-test
	bash scripts/lint-container.sh

container-test: install-test
	bash scripts/container-test.sh

clean:
	rm -rf $(VENV) .venv-ovxai .pytest_cache
