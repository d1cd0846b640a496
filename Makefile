# goclaw: `make run` shows it working, `make test` runs every test, `make bench` compares.
# Each target builds .venv from pyproject.toml + constraints.txt on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_HOME ?= .goclaw-demo

# No network at import time (LiteLLM's model cost map), in tests or anywhere.
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: install run test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-c constraints.txt -e '.[dev,postgres]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/goclaw --home $(DEMO_HOME) init
	$(BIN)/goclaw --home $(DEMO_HOME) demo

lint: $(STAMP)
	$(BIN)/ruff check goclaw tests
	$(BIN)/ruff format --check goclaw tests

test: lint
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/goclaw bench queue --tasks 2000 --workers 2

clean:
	rm -rf $(VENV) $(DEMO_HOME) .pytest_cache .ruff_cache .hypothesis
