# Every target creates/uses a project-local virtual environment and installs the
# project from its own files, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast venv bench docs clean wheel-check

venv: $(STAMP)

# `pip install -e .` also compiles the fast path (setup.py) from these; an out-of-date
# build is never used (it falls back to the .py), so rebuild to test what users get.
FASTPATH := setup.py $(wildcard src/healthdelta/*.pxd src/healthdelta/parse/*.pxd) \
            src/healthdelta/keys.py src/healthdelta/ndjson.py src/healthdelta/parse/healthkit.py

$(STAMP): pyproject.toml $(FASTPATH)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/healthdelta demo --out demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Unit and quick CLI tests only (under a minute on two cores): the tests marked slow are left out.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_pipeline.py

docs: $(STAMP)
	$(BIN)/python tools/gen_cli_docs.py docs/cli.md

# What `pipx install .` / `uv tool install .` give a user: a wheel built from the repo, in an
# environment of its own, running the demo and the printed next step.
WHEEL_DIR := build/wheel-check
wheel-check: $(STAMP)
	rm -rf $(WHEEL_DIR)
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir $(WHEEL_DIR)/dist .
	$(PYTHON) -m venv $(WHEEL_DIR)/venv
	$(WHEEL_DIR)/venv/bin/python -m pip install --quiet $(WHEEL_DIR)/dist/*.whl
	cd $(WHEEL_DIR) && PATH="$$PWD/venv/bin:$$PATH" healthdelta demo --out demo --progress never > demo.txt
	cd $(WHEEL_DIR) && PATH="$$PWD/venv/bin:$$PATH" sh -c "$$(sed -n 's/^next: //p' demo.txt)"

clean:
	rm -rf $(VENV) demo-out .pytest_cache build
	find src -name '*.so' -delete
	rm -f src/healthdelta/_fastpath_sources.json
