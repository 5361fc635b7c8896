# Quick start: `make demo` (the bridge on the offline default, end to end) and `make test`.
# Both bootstrap .venv and check for a mosquitto binary first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench mosquitto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

mosquitto:
	@sh deploy/ensure-mosquitto.sh

demo: $(STAMP) mosquitto
	$(PY) deploy/demo.py

test: $(STAMP) mosquitto
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check service firmware_protocol tests bench deploy
	$(VENV)/bin/mypy

bench: $(STAMP) mosquitto
	$(PY) bench/bridge_throughput.py --devices 100 --seconds 20

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
