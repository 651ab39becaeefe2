# Two commands do all set-up on a fresh machine: `make run` and `make test`. Both build .venv first if missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= conf/default.yaml
PYTEST_ARGS ?=

.PHONY: install run test clean

install: $(STAMP)

# Reinstall when the dependency pins change. torch comes first and exactly pinned: on CPU machines a range
# would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip check
	touch $(STAMP)

run: install
	$(PY) -m flows.finetune_then_quantize --config $(CONFIG)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf artifacts .pytest_cache test-outputs
