# bridgegen developer entry points. Every target creates .venv itself when it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The newest-versions environment: Python 3.12 with megatron-core 0.19.2 (pinned by
# constraints-latest.txt); for 3.12 pip takes torch's CUDA build, which runs on the CPU.
PYTHON_LATEST ?= $(shell for p in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do \
	$$p -c '' 2>/dev/null && echo $$p && break; done)
VENV_LATEST := .venv-latest
PY_LATEST := $(VENV_LATEST)/bin/python
STAMP_LATEST := $(VENV_LATEST)/.installed

.PHONY: venv venv-latest generate check test test-fast test-latest demo bench golden lint typecheck clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so pip takes the CPU wheel that lies on local disk.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

$(STAMP_LATEST): pyproject.toml constraints-latest.txt
	test -n "$(PYTHON_LATEST)" || { echo "no Python 3.12 found; set PYTHON_LATEST" >&2; exit 1; }
	test -x $(PY_LATEST) || $(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(PY_LATEST) -m pip install -q --upgrade pip
	$(PY_LATEST) -m pip install -q -c constraints-latest.txt "torch==2.13.0"
	$(PY_LATEST) -m pip install -q -c constraints-latest.txt -e ".[dev]"
	# Megatron-Bridge 0.6.2 alone (tests_cross syncs a model its provider builds): its own
	# dependencies would replace transformers 5.24 with the 5.12 it pins.
	$(PY_LATEST) -m pip install -q --no-deps megatron-bridge==0.6.2 omegaconf==2.4.0 einops==0.8.2
	touch $(STAMP_LATEST)

venv-latest: $(STAMP_LATEST)

generate: $(STAMP)
	$(PY) -m bridgegen generate

check: $(STAMP)
	$(PY) -m bridgegen check
	$(PY) -m mypy --strict generated bridgegen
	$(PY) -m ruff check bridgegen generated tests tests_cross bench examples
	$(PY) -m pytest -q -p no:cacheprovider tests/test_architecture.py

# The full suite (about 13 min on 2 cores).
test: $(STAMP)
	$(PY) -m pytest -q

# The fast subset for the edit-test loop: every test not marked slow (`-m "not slow"`; the slow
# ones build many models or run several processes). `make test` stays the whole suite.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The suite under megatron-core 0.19.2, then checkpoints written under one version read under the other.
test-latest: $(STAMP) $(STAMP_LATEST)
	$(PY_LATEST) -m pytest -q
	BRIDGEGEN_PYTHON_OLD=$(CURDIR)/$(PY) BRIDGEGEN_PYTHON_NEW=$(CURDIR)/$(PY_LATEST) \
		$(PY_LATEST) -m pytest -q tests_cross

demo: $(STAMP)
	$(PY) -m bridgegen.cli.demo

bench: $(STAMP)
	$(PY) bench/bench_convert.py

golden: $(STAMP)
	$(PY) tests/golden/refresh.py

clean:
	rm -rf $(VENV) $(VENV_LATEST) demo_out bench/out .mypy_cache .ruff_cache .pytest_cache
