# Two commands on a fresh machine: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-all demo clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned exactly, so that nothing later pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[pytorch,test]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -n 2 -q tests

test-all: install
	$(PY) -m pytest -n 2 -q -m "slow or not slow" tests

demo: install
	$(PY) -m tools.demo

clean:
	rm -rf $(VENV) runs
