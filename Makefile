# Two entry points: `make demo` and `make test`. Both create .venv when needed, from the
# lock files in requirements/, so a clean clone gets the same packages every day.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0: on a Linux GPU box PyPI serves the CUDA build; a machine with a
# local CPU wheel (find-links) takes that instead. Override with TORCH_SPEC=...
TORCH_SPEC ?= torch==2.13.0
LOCK := requirements/lock.txt
STAMP := $(VENV)/.installed
# Remote-code models (ChatGLM3, InternVL2, MiniCPM-V, CogVLM2) ship code written for the
# transformers 4.x their model cards pin; their tests also run on that line, in .venv-tf4.
VENV4 := .venv-tf4
BIN4 := $(VENV4)/bin
LOCK4 := requirements/lock-tf4.txt
STAMP4 := $(VENV4)/.installed
REMOTE_TESTS := tests/test_remote_code.py tests/test_seed_models.py
# `make test-latest`: the suite against the newest releases, never locked.
VENVL := .venv-latest
LATEST := transformers accelerate tokenizers safetensors huggingface_hub
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# pip prints a line for every extra index that lacks a package; only errors matter here.
PIP = python -m pip install --quiet --quiet --disable-pip-version-check

.PHONY: demo test test-tf4 test-latest check setup lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/$(PIP) "$(TORCH_SPEC)"
	$(BIN)/$(PIP) -r $(LOCK)
	$(BIN)/$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(STAMP4): pyproject.toml $(LOCK4)
	test -x $(BIN4)/python || $(PYTHON) -m venv $(VENV4)
	$(BIN4)/$(PIP) "$(TORCH_SPEC)"
	$(BIN4)/$(PIP) -r $(LOCK4)
	$(BIN4)/$(PIP) --no-deps --no-build-isolation -e .
	touch $(STAMP4)

demo: $(STAMP)
	$(OFFLINE) $(BIN)/fitmap demo

# Static checks first (seconds: ruff, the import layers, mypy), then the suite on transformers 5,
# then the remote-code tests again on the transformers 4.x their models pin.
test: $(STAMP) $(STAMP4)
	$(MAKE) --no-print-directory check
	$(OFFLINE) $(BIN)/python -m pytest tests
	$(OFFLINE) $(BIN4)/python -m pytest $(REMOTE_TESTS)

check: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy

test-tf4: $(STAMP4)
	$(OFFLINE) $(BIN4)/python -m pytest $(REMOTE_TESTS)

# The same suite on the newest releases of transformers and its family (torch stays at
# TORCH_SPEC unless given: `make test-latest TORCH_SPEC=torch`). Not part of `make test`.
test-latest:
	test -x $(VENVL)/bin/python || $(PYTHON) -m venv $(VENVL)
	$(VENVL)/bin/$(PIP) "$(TORCH_SPEC)"
	$(VENVL)/bin/$(PIP) --upgrade --upgrade-strategy eager -c requirements/torch.txt -e ".[dev]" $(LATEST)
	$(VENVL)/bin/python -m pip list --disable-pip-version-check 2>/dev/null | grep -iE "^(torch|transformers|accelerate|tokenizers) "
	$(OFFLINE) $(VENVL)/bin/python -m pytest tests

# Refresh the locks to the newest releases that fit pyproject.toml (then run `make test`
# and commit requirements/). UV_LOCK_FLAGS= keeps the current pins where they still fit.
UV_LOCK_FLAGS ?= --upgrade
FIND_LINKS := $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))
COMPILE = $(BIN)/uv pip compile --quiet --python-version 3.11 $(FIND_LINKS) -c requirements/torch.txt \
	--no-emit-package torch --custom-compile-command "make lock" $(UV_LOCK_FLAGS)
lock: $(STAMP)
	$(COMPILE) pyproject.toml requirements/build.in --extra dev -o $(LOCK)
	$(COMPILE) requirements/tf4.in requirements/build.in -o $(LOCK4)

clean:
	rm -rf $(VENV) $(VENV4) $(VENVL)
