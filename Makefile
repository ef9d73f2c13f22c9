# Two entry points for a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SERVE_VENV := .venv-serve

.PHONY: serve test test-all lint clean docker-smoke

# Serving install: no PyTorch.
$(SERVE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install -q -e .
	touch $@

# Development install: everything, PyTorch (CPU build) included.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[torch,train,dev]'
	touch $@

serve: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/avatar serve

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy server export

test: lint
	$(VENV)/bin/pytest -q -m "not slow and not browser and not gpu"

test-all: lint
	$(VENV)/bin/pytest -q -m "not gpu"

clean:
	rm -rf $(VENV) $(SERVE_VENV) .pytest_cache .mypy_cache .ruff_cache

# The compose stack built and run for real: Docker engine and Compose v2 installed if
# missing, stand-in base images where no registry answers, the CPU image, two replicas
# behind the front, 60 streamed frames checked, a restart. Needs root; docs/deployment.md.
docker-smoke: $(VENV)/.installed
	SMOKE_PYTHON=$(abspath $(PY)) bash deploy/smoke.sh
