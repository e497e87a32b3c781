# `make demo` and `make test` do all the set-up themselves; re-running them
# reinstalls only when pyproject.toml changed (stamp keyed on its hash).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP_TEST := $(VENV)/.stamp-test-$(HASH)
STAMP_RUN := $(VENV)/.stamp-run-$(HASH)
DEMO_DIR ?= demo

.PHONY: demo test test-fast lint install clean bench gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP_RUN): pyproject.toml | $(PY)
	rm -f $(VENV)/.stamp-run-*
	$(PY) -m pip install -q -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(PY)
	rm -f $(VENV)/.stamp-test-* $(VENV)/.stamp-run-*
	$(PY) -m pip install -q -e '.[test,flower]'
	touch $@ $(STAMP_RUN)

install: $(STAMP_RUN)

# The linter, then the whole suite (multi-process and end-to-end tests included, as CI runs it).
test: lint
	$(PY) -m pytest

# The edit loop: everything but the tests marked slow (multi-process, subprocess CLI runs).
test-fast: $(STAMP_TEST)
	$(PY) -m pytest -m "not slow"

# On a GPU machine: environment, GPU tests, loader and round benchmarks, summary.md (issue 9).
# A machine that cannot install packages (DALI unpacked onto PYTHONPATH, see README) runs it with its
# own $(PYTHON) when that already imports everything; anywhere else it sets up the venv as test does.
# GPU_CHECK_ARGS passes options through, e.g. make gpu-check GPU_CHECK_ARGS=--quick.
GPU_NEEDS := import torch, torchvision, timm, peft, click, tqdm, safetensors, psutil, pytest, nvidia.dali
gpu-check:
	@if $(PYTHON) -c '$(GPU_NEEDS)' 2>/dev/null; then \
		$(PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS); \
	else \
		$(MAKE) --no-print-directory $(STAMP_TEST) && $(PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS); \
	fi

lint: $(STAMP_TEST)
	$(PY) -m ruff check .

# The embedded default: a synthetic CIFAR-like store at 32 px and a short FedLoRA run of a
# small ViT from scratch (no weights can be downloaded here) through the DALI loader on CPU.
demo: $(STAMP_RUN)
	$(VENV)/bin/dali-fl prep --source synthetic --num-train 2000 --num-test 500 --image-size 32 --out $(DEMO_DIR)/data
	$(VENV)/bin/dali-fl verify $(DEMO_DIR)/data/synthetic-32
	rm -rf $(DEMO_DIR)/run
	$(VENV)/bin/dali-fl train --preset tiny-32 --alg fedlora --loader dali --device cpu \
		--store $(DEMO_DIR)/data/synthetic-32 --out $(DEMO_DIR)/run
	$(VENV)/bin/python tools/plot_metrics.py $(DEMO_DIR)/run

clean:
	rm -rf $(VENV) $(DEMO_DIR)
