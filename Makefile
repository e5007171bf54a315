# branchbuild: `make run` (the whole system, locally) and `make test` (what CI runs).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PIP_DISABLE_PIP_VERSION_CHECK := 1

LOCALSTACK_VENV := .localstack-venv
LOCALSTACK_STAMP := $(LOCALSTACK_VENV)/.installed-stamp
# The newest LocalStack community runtime that runs on Python 3.11 in host mode, and the pins
# it needs (see docs/local-development.md). Its own venv: its pins clash with ours.
LOCALSTACK_PACKAGES := 'localstack-core[runtime]==4.13.1' 'cbor2<6' 'pyopenssl<25' \
	'cryptography<45' service_identity 'joserfc<1.3'

# The IAM policy evaluator of tests/test_iam.py (npm, pinned by tests/iam/package-lock.json).
IAM_STAMP := tests/iam/node_modules/.installed-stamp

BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed-stamp
# The original design (A) uses the AWS CLI, as it did; charts and profiles need their tools.
BENCH_PACKAGES := 'awscli==1.46.3' 'matplotlib==3.11.2' 'py-spy==0.4.3' 'psutil==7.2.2'

.PHONY: help venv system-deps image-deps image image-test localstack run demo lint format typecheck pytest test coverage lint-deploy chaos bench soak clean

help:
	@echo "make run          the service and everything it needs, locally (LocalStack, git host)"
	@echo "make demo         the same, non-interactively: push, check the outcomes, stop"
	@echo "make test         lint, type-check and the whole test suite (what CI runs)"
	@echo "make coverage     the suite with line coverage of service/"
	@echo "make lint-deploy  cfn-lint, checkov and hadolint on deploy/ and the Dockerfile"
	@echo "make image        the service image, built with podman (no Docker daemon needed)"
	@echo "make image-test   run that image as ECS does, against moto and the SSH git host"
	@echo "make chaos        the long crash-safety run (random SIGKILLs) and recovery times"
	@echo "make bench        the benchmark: the original design, branchbuild and the floor"
	@echo "make soak         thousands of pushes through one service: memory, fds, tasks flat"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(STAMP)

$(LOCALSTACK_STAMP):
	$(PYTHON) -m venv $(LOCALSTACK_VENV)
	$(LOCALSTACK_VENV)/bin/pip install -q --upgrade pip
	$(LOCALSTACK_VENV)/bin/pip install -q $(LOCALSTACK_PACKAGES)
	touch $@

# Not needed when LOCALSTACK_ENDPOINT names a LocalStack that is already running.
ifeq ($(LOCALSTACK_ENDPOINT),)
localstack: $(LOCALSTACK_STAMP)
else
localstack:
	@echo "using the LocalStack at $(LOCALSTACK_ENDPOINT)"
endif

run: venv system-deps localstack
	$(BIN)/python -m localdev.run

demo: venv system-deps localstack
	$(BIN)/python -m localdev.run --demo

# git and the OpenSSH client are the service's only system dependencies; promtool (Debian's
# prometheus package) checks the alert rules and serves the scrape test; node and npm run the
# IAM policy evaluator of tests/test_iam.py; chromium and chromium-driver render the status
# badge in tests/test_badges.py.
system-deps:
	@missing=""; \
	command -v git >/dev/null || missing="$$missing git"; \
	command -v ssh >/dev/null || missing="$$missing openssh-client"; \
	command -v ssh-keygen >/dev/null || missing="$$missing openssh-client"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v npm >/dev/null || missing="$$missing npm"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# podman, buildah and runc build and run the image without a Docker daemon; mmdebstrap
# makes its base from Debian's packages (dpkg-dev: dpkg-architecture, for its eatmydata
# hook); uidmap lets podman run rootless too.
image-deps:
	@missing=""; \
	command -v podman >/dev/null || missing="$$missing podman"; \
	command -v buildah >/dev/null || missing="$$missing buildah"; \
	command -v runc >/dev/null || missing="$$missing runc"; \
	command -v mmdebstrap >/dev/null || missing="$$missing mmdebstrap"; \
	command -v dpkg-architecture >/dev/null || missing="$$missing dpkg-dev"; \
	command -v newuidmap >/dev/null || missing="$$missing uidmap"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing runc; \
	fi

# The image of this tree as branchbuild:dev (see docs/image.md).
image: image-deps
	bash deploy/build-image.sh branchbuild:dev

image-test: venv system-deps image
	$(BIN)/pytest tests/test_image.py

lint: venv
	$(BIN)/ruff check service localdev tests bench
	$(BIN)/ruff format --check service localdev tests bench

format: venv
	$(BIN)/ruff format service localdev tests bench
	$(BIN)/ruff check --fix service localdev tests bench

typecheck: venv
	$(BIN)/mypy

$(IAM_STAMP): tests/iam/package.json tests/iam/package-lock.json
	npm ci --prefix tests/iam --no-audit --no-fund --loglevel=error
	touch $@

# The suite in parallel (pytest-xdist): PYTEST_WORKERS processes; the tests that share a costly
# session fixture (LocalStack, the image) stay on one worker (conftest: xdist_group, with
# --dist loadgroup). Most tests wait on processes, git and HTTP, so more workers than the
# machine's 2 CPUs pay (docs/local-development.md, "The suite").
PYTEST_WORKERS ?= 4

pytest: venv system-deps $(LOCALSTACK_STAMP) $(IAM_STAMP) image
	$(BIN)/pytest -n $(PYTEST_WORKERS) --durations=20 $(PYTEST_ARGS)

test: lint typecheck lint-deploy pytest

# The suite with line coverage of service/ (the service processes the tests start included:
# coverage's subprocess patch, pyproject.toml [tool.coverage.run]); not part of make test.
coverage: venv system-deps $(LOCALSTACK_STAMP) $(IAM_STAMP) image
	$(BIN)/pytest -n $(PYTEST_WORKERS) --cov --cov-report=term:skip-covered $(PYTEST_ARGS)

# The long crash-safety run: hundreds of pushes, random SIGKILLs, a table of the figures; then
# three instances under a steady stream of pushes, one SIGKILLed and one SIGTERMed: the
# push-to-StartBuild latency after each (median, p90, longest stall). Then a burst while
# CodeBuild is full (docs/capacity.md): builds started with and without the scheduler, and
# the time from capacity returning to the first start.
chaos: venv system-deps
	CHAOS=long $(BIN)/pytest tests/test_chaos.py -s -p no:cacheprovider --timeout 900
	$(BIN)/pytest tests/test_scheduler.py -k burst -s -p no:cacheprovider --timeout 900

$(BENCH_STAMP):
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q $(BENCH_PACKAGES)
	touch $@

# A, B and F side by side on this machine (about 30 min); BENCH_ARGS=--quick or
# BENCH_ARGS='--sizes small' for less. Results, charts and profiles go to bench/results/.
bench: venv system-deps $(BENCH_STAMP)
	@command -v zip >/dev/null && command -v jq >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zip jq)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Not in `make test` (a few minutes): thousands of pushes across thousands of branches and
# hundreds of repositories through one service process; RSS, open fds and asyncio tasks sampled
# after every wave must be flat after the warm-up (docs/data-safety.md). SOAK_ARGS=--help.
soak: venv system-deps
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

lint-deploy: system-deps
	bash deploy/lint.sh

clean:
	rm -rf $(VENV) $(LOCALSTACK_VENV) $(BENCH_VENV) .venv-deploy tests/iam/node_modules .run .mypy_cache .ruff_cache .pytest_cache .hypothesis
