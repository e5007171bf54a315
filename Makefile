# branchbuild: `make run` (the whole system, locally) and `make test` (what CI runs).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv system-deps lint format typecheck pytest test lint-deploy clean

help:
	@echo "make run          the service and everything it needs, locally (LocalStack, git host)"
	@echo "make test         lint, type-check and the whole test suite (what CI runs)"
	@echo "make lint-deploy  cfn-lint, checkov and hadolint on deploy/ and the Dockerfile"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(STAMP)

# git and the OpenSSH client are the service's only system dependencies.
system-deps:
	@missing=""; \
	command -v git >/dev/null || missing="$$missing git"; \
	command -v ssh >/dev/null || missing="$$missing openssh-client"; \
	command -v ssh-keygen >/dev/null || missing="$$missing openssh-client"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

lint: venv
	$(BIN)/ruff check service tests
	$(BIN)/ruff format --check service tests

format: venv
	$(BIN)/ruff format service tests
	$(BIN)/ruff check --fix service tests

typecheck: venv
	$(BIN)/mypy

pytest: venv system-deps
	$(BIN)/pytest

test: lint typecheck pytest

lint-deploy:
	bash deploy/lint.sh

clean:
	rm -rf $(VENV) .venv-deploy .mypy_cache .ruff_cache .pytest_cache .hypothesis
