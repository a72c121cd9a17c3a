# Two commands on a fresh machine: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-all demo clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned exactly, so that nothing later pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[pytorch,test]'
	# The reference of tests/test_molmo2_preprocess.py needs torchvision, whose PyPI build for torch 2.13 breaks
	# transformers' imports once in the environment: it goes to a folder that only the tests use (tests/conftest.py).
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(VENV)/test-torchvision torchvision==0.28.0
	touch $(STAMP)

test: install
	$(PY) -m pytest -n 2 -q tests

test-all: install
	$(PY) -m pytest -n 2 -q -m "slow or not slow" tests

demo: install
	$(PY) -m tools.demo

clean:
	rm -rf $(VENV) runs
