# The two commands of the README: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# PyTorch version installed when no torch is present. On a machine without a CUDA GPU, pip is
# pointed at PyTorch's CPU wheel index through TORCH_INDEX_URL (if set) so that it never pulls a
# multi-GB CUDA build; on this project's CI machines the CPU wheel lies on local disk.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=

.PHONY: setup demo test lint clean

$(VENV)/.installed: setup.cfg pyproject.toml
	@# Reuse a torch already installed in the base interpreter (e.g. a CUDA build) instead of a new copy.
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "setup: keeping the torch installed in $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "setup: torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed, kept"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "setup: CUDA GPU found, installing torch==$(TORCH_VERSION)"; $(PY) -m pip install -q "torch==$(TORCH_VERSION)"; \
	else \
	  echo "setup: no CUDA GPU, installing the CPU build of torch==$(TORCH_VERSION)"; \
	  $(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)); \
	fi
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m pneumoseg demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) demo_output *.egg-info
