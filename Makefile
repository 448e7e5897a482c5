# bridgegen developer entry points. Every target creates .venv itself when it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv generate check test demo bench golden lint typecheck clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so pip takes the CPU wheel that lies on local disk.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

generate: $(STAMP)
	$(PY) -m bridgegen generate

check: $(STAMP)
	$(PY) -m bridgegen check
	$(PY) -m mypy --strict generated bridgegen
	$(PY) -m ruff check bridgegen generated tests bench

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m bridgegen.demo

bench: $(STAMP)
	$(PY) bench/bench_convert.py

golden: $(STAMP)
	$(PY) tests/golden/refresh.py

clean:
	rm -rf $(VENV) demo_out bench/out .mypy_cache .ruff_cache .pytest_cache
