# Two commands do all the set-up on a fresh machine:
#   make demo   install, then run the main job on the embedded Fashion-MNIST default (offline)
#   make test   install, then lint and run the test suite (what .ci/run calls)
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch that this machine keeps on disk; users need torch>=2.6 (see pyproject.toml).
TORCH_SPEC ?= torch==2.13.0
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
# pip leaves compiling to bytecode to the first import (--no-compile), so only what is imported gets compiled:
# set-up takes 2 min instead of 4. Python must then be allowed to keep what it compiled (or every test process
# compiles torch and transformers again), so a PYTHONDONTWRITEBYTECODE in the environment is dropped here.
PIP_INSTALL := -m pip install -q --no-compile
unexport PYTHONDONTWRITEBYTECODE
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Exported models must load with the oldest transformers their code supports (retrofit/hub_code.py) and the
# releases since: the tests reload every family's export in this second environment too, with OLDEST_TRANSFORMERS
# and with each of LATER_TRANSFORMERS (releases whose layouts differ again), installed next to it with pip --target.
OLDEST_TRANSFORMERS ?= 5.0.0
LATER_TRANSFORMERS ?= 5.8.0 5.17.0
OLDEST_VENV ?= .venv-oldest
empty :=
OVERLAYS := $(subst $(empty) $(empty),:,$(foreach v,$(LATER_TRANSFORMERS),$(abspath $(OLDEST_VENV))/transformers-$(v)))

# `make test-lowest` runs the suite with the Hugging Face libraries at the lowest versions pyproject.toml allows
# (not part of CI: run it when a change uses a newer API or moves a floor).
LOWEST_VENV ?= .venv-lowest

# The suite runs on every core (pytest-xdist): one worker per core, at most 4, each with its share of torch's threads
# (tests/conftest.py). Most of a test's time is single-threaded Python: on 2 cores the suite took 704 s, not 1122 s.
PYTEST := -m pytest -n auto --maxprocesses 4

.PHONY: setup data demo test lint oldest test-lowest
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) $(PIP_INSTALL) --upgrade pip
	$(PY) $(PIP_INSTALL) "$(TORCH_SPEC)"
	$(PY) $(PIP_INSTALL) -e ".[dev,tensorboard,onnx]"
	touch $@

data: $(FMNIST)
$(FMNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

demo: setup data
	$(VENV)/bin/retrofit run recipes/fashion-mnist.yaml --overwrite

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

oldest: $(OLDEST_VENV)/.installed
$(OLDEST_VENV)/.installed: Makefile
	python3 -m venv $(OLDEST_VENV)
	# what a user of an export needs: torch, transformers, PIL (pipelines), SigLIP's tokenizer (sentencepiece, protobuf)
	$(OLDEST_VENV)/bin/python $(PIP_INSTALL) "$(TORCH_SPEC)" "transformers==$(OLDEST_TRANSFORMERS)" pillow \
	  sentencepiece protobuf
	for version in $(LATER_TRANSFORMERS); do rm -rf $(OLDEST_VENV)/transformers-$$version && \
	  $(OLDEST_VENV)/bin/python $(PIP_INSTALL) --target $(OLDEST_VENV)/transformers-$$version "transformers==$$version" \
	  || exit 1; done
	touch $@

test: setup data lint oldest
	RETROFIT_OLDEST_PYTHON=$(OLDEST_VENV)/bin/python RETROFIT_TRANSFORMERS_OVERLAYS=$(OVERLAYS) $(PY) $(PYTEST)

test-lowest: data oldest
	python3 -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python $(PIP_INSTALL) "$(TORCH_SPEC)"
	$(LOWEST_VENV)/bin/python $(PIP_INSTALL) -e ".[dev,tensorboard,onnx]" $$(python3 .ci/lowest-pins)
	RETROFIT_OLDEST_PYTHON=$(OLDEST_VENV)/bin/python RETROFIT_TRANSFORMERS_OVERLAYS=$(OVERLAYS) \
	  $(LOWEST_VENV)/bin/python $(PYTEST)
