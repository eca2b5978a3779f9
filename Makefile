# RouteT2I developer entry points. `make demo` and `make test` are all a fresh clone needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup browser demo test test-fast lint typecheck clean

setup: $(STAMP)

# Re-installs only when the project's metadata changes, so `make setup` is cheap to repeat.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# The dashboard's browser tests drive Debian's Chromium (playwright never downloads a browser here).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

browser:
	@test -x $(CHROMIUM) || { echo "installing Chromium for the dashboard's browser tests"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

demo: setup
	$(BIN)/routet2i demo

test: setup browser
	ROUTET2I_TEST_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
