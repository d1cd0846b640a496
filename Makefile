# goclaw: `make run` shows it working, `make test` runs every test, `make bench` compares.
# Each target builds .venv from pyproject.toml + constraints.txt on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_HOME ?= .goclaw-demo

# No network at import time (LiteLLM's model cost map), in tests or anywhere.
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: install run test lint bench skills clean

install: $(STAMP)

# llama-cpp-python (the `local` extra, a real model offline) only comes as source. A native
# build enables AVX512/AMX on these VMs and segfaults in llama_decode; this portable AVX2 build
# works here and on other x86-64 CPUs. It compiles once (4-5 min on 2 cores); pip then reuses
# the wheel from its cache, whatever CMAKE_ARGS say (`pip cache remove llama_cpp_python` to redo).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-c constraints.txt -e '.[dev,postgres,local]'
	touch $(STAMP)

# The demo starts the whole stack with `goclaw up` (gateway + worker, supervised) as a child
# process on a free port, talks to the default agent, tours the lifecycle, then stops it.
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
	$(BIN)/goclaw bench agent --turns 100
	$(BIN)/goclaw bench policy --calls 2000
	$(BIN)/goclaw bench skill --calls 2000
	$(BIN)/goclaw bench gateway

# Rebuild the bundled skills' modules from their WebAssembly text (wasmtime's wat2wasm).
skills: $(STAMP)
	for skill in skills/*/; do $(BIN)/goclaw skill build "$$skill" || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_HOME) .pytest_cache .ruff_cache .hypothesis
