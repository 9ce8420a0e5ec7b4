# Two commands from a fresh clone:
#   make demo   set up .venv and run the quick-start demo
#   make test   set up .venv and run the test suite
# torch is pinned to the CPU wheel 2.13.0 *before* the package is installed, so the package's torch range is already
# satisfied and pip never pulls a multi-GB CUDA build. Override with `make test TORCH_SPEC=...`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRANSFORMERS_SPEC ?=
OLDEST_TRANSFORMERS ?= transformers==5.0.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-oldest test-cross-version test-wheel clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]" $(TRANSFORMERS_SPEC)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The oldest transformers release setup.cfg admits, in an environment of its own.
test-oldest:
	$(MAKE) test VENV=.venv-oldest TRANSFORMERS_SPEC="$(OLDEST_TRANSFORMERS)"

# Folders written under the newest release load bit for bit under the oldest, and the other way round.
test-cross-version: $(STAMP)
	$(MAKE) setup VENV=.venv-oldest TRANSFORMERS_SPEC="$(OLDEST_TRANSFORMERS)"
	GENIEBLUE_OTHER_PYTHON=.venv-oldest/bin/python HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/test_cross_version.py

# A non-editable install (a built wheel) in a fresh environment, used from outside the repository.
test-wheel:
	.ci/check_wheel.sh

clean:
	rm -rf $(VENV) .venv-oldest .venv-wheel
