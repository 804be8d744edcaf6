# speciesid: `make test` sets up .venv (pip) and runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the releases this project is tested with (pip finds them on the dev machines' disk).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# The shared assets (demo photos and weights): $SPECIESID_SHARED when set, as the tests and scripts read it.
SHARED ?= $(or $(SPECIESID_SHARED),../shared)
INDEX ?= runs/ph-snakes-mobilenet

.PHONY: setup test lint bench bench-quick demo serve clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev,onnx,openvino,ray]'
	touch $@

test: setup
	$(PY) -m pytest -q

# ruff alone: lint needs neither torch nor the extras (a .venv made by `make setup` already has it).
lint:
	test -x $(VENV)/bin/ruff || { test -x $(PY) || $(PYTHON) -m venv $(VENV); $(PY) -m pip install --quiet 'ruff>=0.5'; }
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/bench_build.py
	$(PY) benchmarks/bench_identify.py
	$(PY) benchmarks/bench_search.py

bench-quick: setup
	$(PY) benchmarks/bench_build.py --quick
	$(PY) benchmarks/bench_identify.py --quick

# Quick start on the shared ph-snakes photos with the real MobileNetV1 weights.
demo: setup
	$(VENV)/bin/speciesid index build --dataset folder --root $(SHARED)/data/ph-snakes/train \
		--encoder timm:local-dir:$(SHARED)/models/mobilenetv1_100.coral_in1k --index $(INDEX)
	$(VENV)/bin/speciesid identify --index $(INDEX) "$(SHARED)/data/ph-snakes/val/Samar Cobra (Naja samarensis)" --k 3 | head -20

# The HTTP API + web page on the demo gallery (http://127.0.0.1:8000/); writes need SPECIESID_API_KEYS.
serve: setup
	test -f $(INDEX)/gallery.json || $(MAKE) demo
	$(VENV)/bin/speciesid serve --index $(INDEX) --host 127.0.0.1 --port 8000

clean:
	rm -rf $(VENV) runs .pytest_cache
