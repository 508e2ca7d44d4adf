# bigtrain: `make demo` and `make test` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU machine must get the local CPU wheel: an unpinned torch pulls several GB of CUDA packages.
# On a GPU machine with a CUDA torch already in the base interpreter: make VENV_FLAGS=--system-site-packages
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
PYTEST_ARGS ?=

.PHONY: venv test test-fast demo demo-bert lint format clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

test: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -ra --durations=20 $(PYTEST_ARGS)

# the fast tier for iteration: everything but the multi-process end-to-end tests (marked slow)
test-fast: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

demo: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash launch/demo.sh

demo-bert: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash launch/demo_bert.sh

# ruff and mypy are pinned in setup.py's dev extra; .pre-commit-config.yaml runs the same three checks
lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy bigtrain tokenizer

format: venv
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf demo_out runs .pytest_cache
