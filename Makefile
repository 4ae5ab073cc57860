# Clover's two commands: `make demo` runs the main job, `make test` runs the tests.
# Both create the virtualenv, install the project and bring the local stack up as needed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLOVER := $(VENV)/bin/clover
STAMP := $(VENV)/.clover-installed
# Names of the servers `make test` started, so that it stops only those.
STARTED := .stack-started
# KEEP_STACK=1 leaves the servers running after `make test`.
KEEP_STACK ?= 0
PYTEST_ARGS ?=

.PHONY: install test demo bench stack-up stack-down lint clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

test: $(STAMP)
	@rm -f $(STARTED); status=0; \
	$(CLOVER) stack up --record $(STARTED) && \
	$(PY) -m pytest $(PYTEST_ARGS) || status=$$?; \
	if [ "$(KEEP_STACK)" != 1 ]; then $(CLOVER) stack down --recorded $(STARTED); fi; \
	rm -f $(STARTED); exit $$status

# DEMO_ARGS passes options to `clover demo`, e.g. DEMO_ARGS="--fault errors --service cart".
DEMO_ARGS ?=
demo: $(STAMP)
	$(CLOVER) stack up
	$(CLOVER) demo $(DEMO_ARGS)

bench: $(STAMP)
	$(CLOVER) stack up
	$(PY) -m benchmarks
	$(CLOVER) models evaluate

stack-up: $(STAMP)
	$(CLOVER) stack up

stack-down: $(STAMP)
	$(CLOVER) stack down

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy clover analytics streams benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
