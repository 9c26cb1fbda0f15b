# The two commands of the README: `make run` and `make test` (both install what they need first).
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: install run test test-fast ui bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an open range can pull a multi-GB CUDA build (see README).
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install  ## materialize the whole graph on the default profile (CONFIG=path for another)
	$(VENV)/bin/scratchllm run $(if $(CONFIG),--config $(CONFIG))

test: install  ## the whole test suite, slow end-to-end tests included
	$(PY) -m pytest

test-fast: install  ## the inner loop: every test but the slow end-to-end ones (about 3 minutes on 2 cores)
	$(PY) -m pytest -m "not slow"

ui: install  ## Dagster UI on http://127.0.0.1:3000 and MLflow UI on http://127.0.0.1:5000
	$(VENV)/bin/scratchllm ui $(if $(CONFIG),--config $(CONFIG))

bench: install
	$(PY) benchmarks/data_stages.py

clean:
	rm -rf data/run data/ci .dagster_home
