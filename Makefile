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
	$(PY) -m pip install -q -c constraints.txt -e '.[torch,test,bench,docs]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --hypothesis-profile=$(HYPOTHESIS_PROFILE) $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m anomstats demo

# Results, summary.md (headline table first) and plots, the cost-growth plot included, go to benchmarks/results/;
# a full run of every suite also rewrites the README's benchmark table (between its bench-table markers) and
# fetches anomalib 2.7.0's wheel into .whl/ (no dependencies; its two stats modules are the torch peers).
# BENCH_ARGS=--quick is a smoke run (into results/quick/, README untouched); BENCH_ARGS=--no-readme keeps the README.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m benchmarks.run_all $(BENCH_ARGS)

# Sphinx + numpydoc (the `docs` extra, installed by the shared set-up so `make test` checks the build too);
# -W turns every warning into an error.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs built: docs/_build/html/index.html"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
