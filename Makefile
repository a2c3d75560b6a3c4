# deltagw: `make run` starts the gateway, `make test` runs the whole suite.
# Both create the virtual environment (.venv) themselves, with the exact
# versions constraints.txt pins. `make test VENV=.venv-lowest
# CONSTRAINTS=constraints-lowest.txt` runs the suite on the lowest versions
# setup.py allows instead (CI runs both).

VENV ?= .venv
PYTHON ?= python3
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python

.PHONY: install run test bench clean

# What running needs (`make run`), then the test extras too (the rest).
$(VENV)/.runtime: setup.py pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime
	$(PY) -m pip install -q -c $(CONSTRAINTS) ".[test]"
	touch $@

install: $(VENV)/.installed
	@# Reinstall the package itself so twistd subprocesses run this tree's code.
	$(PY) -m pip install -q --no-deps --force-reinstall .

run: $(VENV)/.runtime
	$(PY) -m pip install -q --no-deps --force-reinstall .
	$(VENV)/bin/deltagw --demo

test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .venv-lowest build *.egg-info
