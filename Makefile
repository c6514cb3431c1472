# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv with pip if missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Hospitals do not phone home, and nothing is downloaded at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv test demo lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[assets,test]'
	$(BIN)/python -m pip check
	@if $(BIN)/python -m pip list 2>/dev/null | grep -qi '^nvidia-'; then echo "error: a CUDA package was installed; torch must be the 2.13.0 CPU wheel" >&2; exit 1; fi
	@touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/python -m server.demo

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/python bench/labels.py
	$(BIN)/python bench/step.py
	$(BIN)/python bench/screen.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
