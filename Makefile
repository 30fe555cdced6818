# Two commands, each doing its own set-up on a fresh machine:
#   make serve   start evalserve on the default model (http://127.0.0.1:8000)
#   make test    lint, type-check and run the whole test suite
# The virtual environment is (re)built when pyproject.toml or the lock changes; runtime
# dependencies are installed at the versions of requirements/lock.txt, as in the image.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are installed first, pinned, so pip takes the pair this machine holds.
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
# Debian packages the tests use: docker-compose 1.29 validates the compose files offline;
# Chromium runs the web page's tests (Playwright drives it; browser downloads are impossible).
APT_PACKAGES := docker-compose chromium g++

.PHONY: serve test lint install test-tools

$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-c requirements/lock.txt -e '.[test,deploy-check]'
	touch $@

install: $(STAMP)

# Only the tests need these (as root, which the CI and dev machines are).
test-tools:
	command -v docker-compose >/dev/null && command -v chromium >/dev/null && command -v g++ >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); }

serve: $(STAMP)
	$(BIN)/evalserve serve

lint: $(STAMP)
	$(BIN)/ruff check app tests
	$(BIN)/ruff format --check app tests
	$(BIN)/mypy

test: lint test-tools
	$(BIN)/python -m pytest
