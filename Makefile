# Everything a fresh machine needs is installed by these targets themselves.
# Caches: pip's own cache (~/.cache/pip) and $(SHOAL_CACHE) (cluster binaries, models).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export SHOAL_CACHE ?= $(HOME)/.cache/shoal
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast test-e2e demo lint bench clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

## make test: the fast tier then the e2e tier (what CI runs)
test: test-fast test-e2e

## make test-fast: unit and integration tests, no cluster
test-fast: venv lint
	$(BIN)/pytest -m "not e2e" -q

## make test-e2e: the slow tier on a real local Kubernetes cluster
test-e2e: venv
	$(BIN)/python -m pytest -m e2e -q; rc=$$?; [ $$rc -eq 5 ] && exit 0 || exit $$rc

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: venv
	$(BIN)/python -m shoal.e2e.demo

bench: venv
	$(BIN)/python -m bench.serving

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
