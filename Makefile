# Two commands do everything on a fresh machine:
#   make demo   - create .venv, install alignkit, run recipes/quickstart.yaml (CPU is fine)
#   make test   - create .venv, install alignkit + test tools, run the test suite
# TORCH_SPEC picks the torch build installed first: CI uses the CPU wheel; on a GPU machine pass
# e.g. `make demo TORCH_SPEC=torch` (or your CUDA index) to keep/get a CUDA build.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/alignkit run recipes/quickstart.yaml

test: setup
	WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
