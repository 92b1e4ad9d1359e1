# Two commands do all the set-up on a fresh machine:
#   make demo   install, train the registered tasks on the demo data, evaluate, export, predict
#   make test   install, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := work_dirs/demo

.PHONY: install demo test runtime-check lint bench clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[train,dev,scan,release]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) tools/train.py registry.yaml --work-dir $(RUN)
	$(PY) tools/export.py $(RUN) -o $(RUN)/model.onnx
	$(PY) tools/predict.py $(RUN)/model.onnx demo_data/disgusting/val/00000.jpg demo_data/disgusting/val/00001.jpg \
		demo_data/scene_tags/val/00000.jpg demo_data/scene_tags/val/00001.jpg

test: install
	$(PY) -m pytest tests

# A runtime-only install (no torch) in its own venv scores images with a model exported here.
runtime-check: install
	rm -rf .venv-runtime work_dirs/runtime-check
	$(PYTHON) -m venv .venv-runtime
	.venv-runtime/bin/python -m pip install -q .
	$(PY) tests/make_runtime_fixture.py work_dirs/runtime-check
	cd work_dirs && ../.venv-runtime/bin/python -c "import importlib.util, sys; \
		assert importlib.util.find_spec('torch') is None, 'torch is installed'; \
		import waterdrop.runtime; print('waterdrop.runtime imported without torch'); \
		from waterdrop.config import load_registry; cfg = load_registry('../registry.yaml'); \
		print('registry.yaml loaded without torch:', ', '.join(cfg.task_names))"
	# exit code 1: one of the images is corrupt on purpose (scored images: 3, error lines: 1)
	cd work_dirs && ../.venv-runtime/bin/python ../tools/predict.py runtime-check/model.onnx runtime-check/images \
		> runtime-check/predictions.jsonl; test $$? -eq 1
	$(PY) -c "import json; rows = [json.loads(l) for l in open('work_dirs/runtime-check/predictions.jsonl')]; \
		assert len(rows) == 4 and sum('error' in r for r in rows) == 1 and all('tasks' in r for r in rows if 'error' not in r), rows; \
		print('runtime-only install: 3 images scored, 1 error line')"

lint: install
	$(PY) -m ruff check waterdrop heads tools tests benchmarks

bench: install
	$(PY) benchmarks/multitask_cost.py

clean:
	rm -rf work_dirs demo_data
