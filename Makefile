# hvstack: `make demo` (install, then boot a VM) and `make test` (install, then every test).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
HV := $(VENV)/bin/hv
export HV_CACHE_DIR ?= $(CURDIR)/.cache
# Test processes side by side (pytest-xdist), each taking whole test files: most of an
# integration test's time is spent waiting on a guest, so two share two cores well.
TEST_WORKERS ?= 2
DEMO_DATA ?= $(CURDIR)/demo-data

.PHONY: install deps venv image demo demo-stop test test-unit test-functional \
        test-integration lint bench clean

install: deps venv image

deps:
	@scripts/install-deps.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

image: venv
	$(VENV)/bin/python -m hvstack.images build tiny --cache-dir $(HV_CACHE_DIR)

demo: install
	@DEMO_DATA=$(DEMO_DATA) HV=$(HV) scripts/demo.sh

demo-stop:
	@DEMO_DATA=$(DEMO_DATA) HV=$(HV) scripts/demo.sh stop

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy src

test: install lint
	$(VENV)/bin/pytest -p no:cacheprovider -q -n $(TEST_WORKERS) --dist loadfile \
		--durations=25 tests

test-unit: venv
	$(VENV)/bin/pytest -p no:cacheprovider -q tests/unit tests/functional

test-integration: install
	$(VENV)/bin/pytest -p no:cacheprovider -q -n $(TEST_WORKERS) --dist loadfile \
		tests/integration

bench: install
	$(VENV)/bin/python -m bench

clean:
	rm -rf $(VENV) .cache build *.egg-info src/*.egg-info
