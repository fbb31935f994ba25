# Two commands do everything on a fresh machine:
#   make demo   - create .venv, install alignkit, run recipes/quickstart.yaml (CPU is fine)
#   make test   - create .venv, install alignkit + test tools (and bubblewrap, see sandbox-deps), run the tests
# TORCH_SPEC picks the torch build installed first: CI uses the CPU wheel; on a GPU machine pass
# e.g. `make demo TORCH_SPEC=torch` (or your CUDA index) to keep/get a CUDA build.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup sandbox-deps demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

# bubblewrap: the kernel sandbox reward/code.py runs untrusted code in (docs/sandbox.md). Installed when missing
# and we are root with apt-get; otherwise only a note: the code reward then refuses unless allowed unisolated.
sandbox-deps:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap) \
	      || echo "note: could not install bubblewrap; see docs/sandbox.md"; \
	  else echo "note: bubblewrap (bwrap) is missing: apt-get install bubblewrap (docs/sandbox.md)"; fi; }

demo: setup
	$(BIN)/alignkit run recipes/quickstart.yaml

test: setup sandbox-deps
	WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
