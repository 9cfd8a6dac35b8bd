# sidemesh — every target works from a fresh clone: `install` builds .venv/ on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SIDEMESH := $(VENV)/bin/sidemesh
CERTS ?= certs
HOST ?= 127.0.0.1
PORT ?= 8443
XDS_PORT ?= 15012
# MESH_DIR=./mesh makes discovery read (and watch) that directory instead of its demo mesh
MESH_DIR ?=
MESH_DIR_FLAG := $(if $(MESH_DIR),--mesh-dir $(MESH_DIR))
# RATELIMIT=1 (the default when MESH_DIR holds a RateLimitPolicy): `make run` also starts
# redis-server on 127.0.0.1:$(REDIS_PORT) and `sidemesh ratelimit` (mTLS) on $(HOST):$(RLS_PORT)
RATELIMIT ?= $(if $(MESH_DIR),$(shell grep -rqs RateLimitPolicy $(MESH_DIR) && echo 1))
REDIS_PORT ?= 6379
RLS_PORT ?= 8081

.PHONY: install run certs test unit e2e golden lint bench deploy undeploy clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

## run: the webhook (and CA) on https://$(HOST):$(PORT) and the control plane (discovery: xDS
## on $(HOST):$(XDS_PORT), debug on 127.0.0.1:15014) on its embedded demo mesh, certs in certs/
run: install certs
	pids=""; rls=""; \
	  trap 'kill $$pids 2>/dev/null; wait $$pids' EXIT INT TERM; \
	  if [ -n "$(RATELIMIT)" ]; then \
	    redis-server --port $(REDIS_PORT) --bind 127.0.0.1 --dir "$$(mktemp -d)" --save '' \
	      --appendonly no & pids="$$pids $$!"; \
	    $(SIDEMESH) ratelimit --listen $(HOST):$(RLS_PORT) --cert-dir $(CERTS) $(MESH_DIR_FLAG) \
	      --redis redis://127.0.0.1:$(REDIS_PORT)/0 & pids="$$pids $$!"; \
	    rls="--ratelimit-address $(HOST):$(RLS_PORT)"; \
	  fi; \
	  $(SIDEMESH) discovery --scoped --listen $(HOST):$(XDS_PORT) --cert-dir $(CERTS) $(MESH_DIR_FLAG) \
	    $$rls & pids="$$pids $$!"; \
	  $(SIDEMESH) serve --host $(HOST) --port $(PORT) --cert-dir $(CERTS)

## certs: create the development root if missing, then a fresh serving certificate
certs: install
	$(SIDEMESH) ca init --dir $(CERTS) --if-missing
	$(SIDEMESH) ca serving-cert --dir $(CERTS)

## test: lint, then every test (root/netns/Envoy tests run when possible; required when CI=true),
## TEST_JOBS test files at a time (each lab has its own uniquely named namespaces)
TEST_JOBS ?= 3
test: install lint
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile tests

unit: install
	$(PY) -m pytest -q tests -m "not e2e and not root"

## e2e: the end-to-end data-plane test in network namespaces (root)
e2e: install
	$(PY) -m pytest -q tests -m e2e

## golden: rewrite every golden file from the current code
golden: install
	UPDATE_GOLDEN=1 $(PY) -m pytest -q tests -m golden

lint: install
	$(VENV)/bin/ruff check webhook tests
	$(VENV)/bin/ruff format --check webhook tests
	$(VENV)/bin/mypy

## bench: every benchmark under tests/bench/, figures printed and written to bench-results/
bench: install
	@mkdir -p bench-results
	@set -e; for b in tests/bench/bench_*.py; do echo "== $$b"; $(PY) $$b; done

## deploy/undeploy: install sidemesh into the current kubectl context
deploy: install
	$(SIDEMESH) install

undeploy: install
	$(SIDEMESH) uninstall

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis bench-results
