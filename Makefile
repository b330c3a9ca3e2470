# Fresh-machine entry points: `make demo` and `make test` build .venv from the pinned lock when it is
# missing or older than requirements.txt / pyproject.toml, then run.
PY      ?= $(shell command -v python3.11 || command -v python3)
VENV    := .venv
STAMP   := $(VENV)/.installed
PYTHON  := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench-features clean-cache venv

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements.txt
	$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m xmodal.demo

test: $(STAMP)
	$(PYTHON) -m pytest

bench-features: $(STAMP)
	$(PYTHON) benchmarks/features.py

clean-cache:
	rm -rf .xmodal-cache
