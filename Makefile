# Two entry points on a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use (torch pinned first: an unpinned torch pulls a multi-GB CUDA build).
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.ffnfusion-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench-large check-deci clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ffnfusion demo

test: lint
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# Skips the real-model tests (they export SmolLM2: a few minutes).
test-fast: lint
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

# ruff on everything; mypy on the library: core, passes, exporters, runtime (settings in pyproject.toml).
# passes/, exporters/ and runtime/ are ffnfusion.* only through setuptools' package-dir, which mypy
# cannot follow: it checks a tree of links laid out as Python imports the package.
TYPECHECK := build/typecheck
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/ffnfusion
	for f in ffnfusion/*.py ffnfusion/core ffnfusion/cli ffnfusion/checks ffnfusion/benchmarks; do \
		ln -s "$(CURDIR)/$$f" $(TYPECHECK)/ffnfusion/; done
	for d in passes exporters runtime; do ln -s "$(CURDIR)/$$d" $(TYPECHECK)/ffnfusion/$$d; done
	cd $(TYPECHECK) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml --cache-dir $(CURDIR)/.mypy_cache \
		ffnfusion/core ffnfusion/passes ffnfusion/exporters ffnfusion/runtime

# Fuse the ~15 GB llama-8b preset; needs ~35 GB of free disk (all deleted afterwards).
bench-large: $(STAMP)
	$(PYTHON) -m ffnfusion.benchmarks.large_model

# llama.cpp's deci architecture runs export-hf's Nemotron-NAS checkpoints of SmolLM2 (fused, repaired) and
# must agree with ONNX Runtime. Its own venv (transformers < 5, llama-cpp-python compiled once) lives in
# ~/.cache/ffnfusion/llamacpp: ~8 min the first time, ~3 min after. CI runs it as a slow test.
check-deci: $(STAMP)
	$(PYTHON) -m ffnfusion.checks.llamacpp_deci

clean:
	rm -rf out .pytest_cache
