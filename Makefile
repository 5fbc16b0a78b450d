# Two commands do everything on a fresh machine (see README):
#   make demo    federated training demo on bundled data
#   make test    lint and type checks (make lint), then the whole test suite (hypothesis profile
#                "ci" unless HYPOTHESIS_PROFILE is set)
# Both create or reuse .venv and install what they need; a second run skips the install.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Off these machines (no local CPU wheel), point this at https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=

# Nothing may leave loopback: Flower's telemetry and update check stay off.
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo lint test test-quick bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) torch
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m securefed demo $(ARGS)

# ruff and mypy read their settings from pyproject.toml; both are pinned in the dev extra.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy securefed

test: lint
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(BIN)/python -m pytest -n 2 $(ARGS)

test-quick: $(STAMP)
	HYPOTHESIS_PROFILE=dev $(BIN)/python -m pytest -x -q $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
