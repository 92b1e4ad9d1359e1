# Two commands do all the set-up on a fresh machine:
#   make demo   install, train the registered tasks on the demo data, evaluate, export, predict
#   make test   install, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := work_dirs/demo

.PHONY: install demo test lint bench clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) tools/train.py registry.yaml --work-dir $(RUN)
	$(PY) tools/export.py $(RUN) -o $(RUN)/model.onnx
	$(PY) tools/predict.py $(RUN)/model.onnx demo_data/disgusting/val/00000.jpg demo_data/disgusting/val/00001.jpg \
		demo_data/scene_tags/val/00000.jpg demo_data/scene_tags/val/00001.jpg

test: install
	$(PY) -m pytest tests

lint: install
	$(PY) -m ruff check waterdrop heads tools tests benchmarks

bench: install
	$(PY) benchmarks/multitask_cost.py

clean:
	rm -rf work_dirs demo_data
