# deltagw: `make run` starts the gateway, `make test` runs the whole suite.
# Both create the virtual environment (.venv) themselves.

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install run test bench clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q ".[test]"
	touch $@

install: $(VENV)/.installed
	@# Reinstall the package itself so twistd subprocesses run this tree's code.
	$(PY) -m pip install -q --no-deps --force-reinstall .

run: install
	$(VENV)/bin/twistd --nodaemon --pidfile= deltagw --demo

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info
