# `make demo` and `make test` work on a fresh machine: each creates .venv,
# installs the package with its pinned extras, and fetches the Fashion-MNIST
# IDX files from Debian when they are missing and apt-get can run.
# `make test` = lint + the docs site built with --strict + the test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export TF_CPP_MIN_LOG_LEVEL ?= 2
export NO_MKDOCS_2_WARNING ?= 1

.PHONY: demo test lint docs pytest data clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[all,dev,docs]'
	touch $(STAMP)

# Optional: tests that need Fashion-MNIST skip with a reason when it is absent.
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) >/dev/null 2>&1 \
	      || echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will skip"; \
	  else echo "note: dataset-fashion-mnist absent and apt-get unavailable; Fashion-MNIST tests will skip"; fi; \
	fi

demo: $(STAMP)
	$(VENV)/bin/energy-callbacks demo

lint: $(STAMP)
	$(VENV)/bin/ruff check energy_callbacks tests
	$(VENV)/bin/mypy energy_callbacks/core

# The site goes to site/; --strict fails on any warning (a broken link, a
# missing snippet, a docstring mkdocstrings cannot render).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

pytest: $(STAMP) data
	$(PY) -m pytest -q -n 2 --dist loadfile

test: lint docs pytest

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache .hypothesis
