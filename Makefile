# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch first, the CPU build (on this project's machines pip finds it on disk); anything that depends on torch
# afterwards, or pip fetches several GB of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
READY  := $(VENV)/.ready

.PHONY: venv demo test lint protos clean

venv: $(READY)

$(READY): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[cloud,edge,hub,dev]"
	# Model Optimizer's FLOPs-constrained pruning needs torchprofile 0.0.4, whose declared deps pull torchvision.
	$(BIN)/python -m pip install --quiet --no-deps torchprofile==0.0.4
	touch $@

demo: $(READY)
	$(BIN)/edgeloop demo

test: $(READY)
	$(BIN)/python -m pytest

lint: $(READY)
	$(BIN)/ruff check .

protos: $(READY)
	$(BIN)/python scripts/generate_protos.py

clean:
	rm -rf $(VENV) .demo .edgeloop .pytest_cache
