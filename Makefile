# The commands the README shows. `make test` and `make dev` work from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUNTIME_STAMP := $(VENV)/.installed-runtime
NODE_STAMP := bench/node/node_modules/.package-lock.json

.PHONY: install test test-fast dev bench lint constraints clean

$(RUNTIME_STAMP): requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP) requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

install: $(STAMP) ## create .venv with the pinned dependencies
	@scripts/ensure-tool.sh redis-server redis-server "the tests start throwaway Redis servers"
	@scripts/ensure-tool.sh chromium chromium "the job board test runs in headless Chromium"
	@scripts/ensure-tool.sh promtool prometheus "the chart's alert rules and dashboard are checked with promtool"
	@scripts/ensure-helm.sh

test: install ## the whole suite (starts its own throwaway Redis servers)
	$(PY) -m pytest

test-fast: install ## the in-process tests: not the fault-injection and load tests, not the whole-stack ones (~2.5 min)
	$(PY) -m pytest -m "not slow and not e2e"

dev: $(RUNTIME_STAMP) ## the whole stack in the foreground: Redis, simulator (without POTPIE_API_KEY), API, worker, Flower
	@scripts/ensure-tool.sh redis-server redis-server "make dev starts a Redis when none answers (or REDIS=fresh)"
	DEV_REDIS=$(REDIS) $(PY) scripts/dev.py

bench: install $(NODE_STAMP) ## benchmarks; writes docs/performance.md
	@scripts/ensure-tool.sh wrk wrk "the P1 benchmark load generator"
	$(PY) -m bench.run

$(NODE_STAMP): bench/node/package-lock.json  # P5's clients, P5 peer's Node server and publisher
	npm ci --prefix bench/node --no-audit --no-fund
	touch $(NODE_STAMP)

lint: $(STAMP) ## style (ruff.toml), types (mypy, setup.cfg) and the import layers (import-linter, setup.cfg)
	$(PY) -m ruff check potpie_service workers tests bench scripts
	$(PY) -m mypy
	$(VENV)/bin/lint-imports --no-cache

constraints: ## re-resolve requirements*.txt from PyPI and pin every resulting package in constraints.txt
	rm -rf .venv-resolve && $(PYTHON) -m venv .venv-resolve
	.venv-resolve/bin/pip install --quiet -r requirements-dev.txt
	{ head -3 constraints.txt; .venv-resolve/bin/pip freeze --exclude-editable | LC_ALL=C sort -f; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .venv-resolve

clean:
	rm -rf $(VENV) test-artifacts .pytest_cache
