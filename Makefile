# Set-up and entry points. Everything goes through a local virtual environment, .venv, created on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Hypothesis profile used by `make test` (registered in tests/conftest.py): bounded examples, no deadline.
HYPOTHESIS_PROFILE ?= ci
PYTEST_ARGS ?=

.PHONY: setup test demo bench docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[torch,test,bench]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --hypothesis-profile=$(HYPOTHESIS_PROFILE) $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m anomstats demo

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
