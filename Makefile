# Two commands do all the set-up on a fresh machine:
#   make demo   install, train the registered tasks on the demo data, evaluate, export, predict
#   make test   install, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := work_dirs/demo

LABEL_STUDIO := .venv-labelstudio
LABEL_STUDIO_VERSION := 1.23.2

.PHONY: install label-studio demo test runtime-check lint bench clean lock

# The constraints files hold every version this project was last tested with, so a release of
# some dependency of a dependency cannot break a fresh install; `make lock` refreshes them.
$(VENV)/.installed: setup.py pyproject.toml constraints/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints/dev.txt -e ".[train,dev,scan,release]"
	touch $@

install: $(VENV)/.installed

# Label Studio (Apache-2.0) in its own venv: its pinned Django stack never meets ours. The
# labelling round trip (tools/label_studio.py) is tested against a server started from it.
$(LABEL_STUDIO)/.installed: constraints/label-studio.txt
	$(PYTHON) -m venv $(LABEL_STUDIO)
	$(LABEL_STUDIO)/bin/python -m pip install -q -c constraints/label-studio.txt "label-studio==$(LABEL_STUDIO_VERSION)"
	touch $@

label-studio: $(LABEL_STUDIO)/.installed

demo: install
	$(PY) tools/train.py registry.yaml --work-dir $(RUN)
	$(PY) tools/export.py $(RUN) -o $(RUN)/model.onnx
	$(PY) tools/predict.py $(RUN)/model.onnx demo_data/disgusting/val/00000.jpg demo_data/disgusting/val/00001.jpg \
		demo_data/scene_tags/val/00000.jpg demo_data/scene_tags/val/00001.jpg

# Two workers, a test file each at a time (a file's fixtures are built once): many tests wait on a
# subprocess, a server or a cluster to start, and the other worker runs meanwhile.
test: install label-studio
	WATERDROP_REQUIRE_LABEL_STUDIO=1 $(PY) -m pytest tests -n 2 --dist loadfile

# A runtime-only install (no torch) in its own venv scores images with a model exported here.
runtime-check: install
	rm -rf .venv-runtime work_dirs/runtime-check
	$(PYTHON) -m venv .venv-runtime
	.venv-runtime/bin/python -m pip install -q -c constraints/dev.txt .
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

# Refresh the constraints from the installed venvs (after a deliberate upgrade that passed `make test`).
lock: install label-studio
	$(PY) -m pip freeze --exclude-editable | grep -vi "^waterdrop" > constraints/dev.txt
	$(LABEL_STUDIO)/bin/python -m pip freeze --exclude-editable > constraints/label-studio.txt
