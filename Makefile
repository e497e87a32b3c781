# `make demo` and `make test` do all the set-up themselves; re-running them
# reinstalls only when pyproject.toml changed (stamp keyed on its hash).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP_TEST := $(VENV)/.stamp-test-$(HASH)
STAMP_RUN := $(VENV)/.stamp-run-$(HASH)
DEMO_DIR ?= demo

.PHONY: demo test install clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP_RUN): pyproject.toml | $(PY)
	rm -f $(VENV)/.stamp-run-*
	$(PY) -m pip install -q -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(PY)
	rm -f $(VENV)/.stamp-test-* $(VENV)/.stamp-run-*
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(STAMP_RUN)

install: $(STAMP_RUN)

test: $(STAMP_TEST)
	$(PY) -m pytest

demo: $(STAMP_RUN)
	$(VENV)/bin/dali-fl prep --source synthetic --image-size 32 --out $(DEMO_DIR)/data
	$(VENV)/bin/dali-fl verify $(DEMO_DIR)/data/synthetic-32

clean:
	rm -rf $(VENV) $(DEMO_DIR)
