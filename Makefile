# Two commands do all set-up on a fresh machine: `make run` and `make test`. Both build .venv first if missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= conf/default.yaml
PYTEST_ARGS ?=

.PHONY: install system-deps run test test-fast lint docs clean

install: $(STAMP)

# Reinstall when the dependency pins change. torch comes first and exactly pinned: on CPU machines a range
# would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,qlora,distributed,tracking]'
	$(PY) -m pip check
	touch $(STAMP)

# Debian packages the operations tests use (tests/test_operations.py): a PostgreSQL server for Prefect's database
# and headless Chromium + ChromeDriver for the UI check. Idempotent: installs only what is missing. Needs root
# (or sudo) and apt-get; elsewhere it says so and the tests that need a missing package skip with the reason.
SYSTEM_DEPS := postgresql chromium chromium-driver

system-deps:
	@missing=$$(for p in $(SYSTEM_DEPS); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then echo "system-deps: $(SYSTEM_DEPS) already installed"; exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "system-deps: no apt-get; install $$missing by hand"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=; elif command -v sudo >/dev/null; then sudo=sudo; \
	else echo "system-deps: not root and no sudo; install $$missing by hand"; exit 0; fi; \
	echo "system-deps: installing $$missing"; \
	$$sudo apt-get -o Acquire::Retries=3 update -qq && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get -o Acquire::Retries=3 install -y -qq --no-install-recommends $$missing

run: install
	$(PY) -m flows.finetune_then_quantize --config $(CONFIG)

# The full suite, as CI runs it (.ci/run): real servers, downloads from the package registries, the fault suite.
test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The edit loop: tiny models only, no downloads, no servers (the `slow` and `network` markers left out).
test-fast: install
	$(PY) -m pytest -m "not slow and not network" $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .

# Regenerate the reference pages that mirror code (tests/test_docs.py fails when they are stale).
docs: install
	$(PY) docs/generate.py

clean:
	rm -rf artifacts .pytest_cache test-outputs
