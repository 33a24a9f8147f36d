# lepton-flwr: `make run` trains, `make test` tests. Both set up .venv themselves.
#   make run                                            HE + DP on Fashion-MNIST, 1,000 clients (+experiment=main)
#   make run ARGS="partition=dirichlet num_rounds=5"    Hydra overrides for the run
#   make test PYTEST_ARGS="-m 'not slow'"               pytest options
#   make docs                                           the documentation site, docs/_build/html
#   TORCH_SPEC="torch==2.13.0"                          the torch build to install first
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lepton-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test lint venv data docs

venv: $(STAMP)

# torch first, pinned: a bare `torch` requirement can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# setuptools tells every editable install of a flat layout to mind same-named folders in
	# the working directory: informational, and this repository is that folder.
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e ".[dev,docs]"
	touch $(STAMP)

data:
	./scripts/ensure-fashion-mnist.sh $(if $(filter run,$(MAKECMDGOALS)),--required,)

run: $(STAMP) data
	FLWR_TELEMETRY_ENABLED=0 $(PY) -m simulations.run +experiment=main $(ARGS)

test: $(STAMP) data
	FLWR_TELEMETRY_ENABLED=0 $(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Warnings are errors, as in tests/test_docs.py, which also checks every link of the site.
docs: $(STAMP)
	FLWR_TELEMETRY_ENABLED=0 $(PY) -m sphinx -W --keep-going -b html docs docs/_build/html
