# Two entry points: `make demo` and `make test`. Both create .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0: on a Linux GPU box PyPI serves the CUDA build; a machine with a
# local CPU wheel (find-links) takes that instead. Override with TORCH_SPEC=...
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Remote-code models (ChatGLM3, InternVL2, MiniCPM-V, CogVLM2) ship code written for the
# transformers 4.x their model cards pin; their tests also run on that line, in .venv-tf4.
TF4_SPEC ?= transformers==4.40.2
VENV4 := .venv-tf4
BIN4 := $(VENV4)/bin
STAMP4 := $(VENV4)/.installed
REMOTE_TESTS := tests/test_remote_code.py

.PHONY: demo test test-tf4 setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

$(STAMP4): pyproject.toml
	test -x $(BIN4)/python || $(PYTHON) -m venv $(VENV4)
	$(BIN4)/python -m pip install --quiet --upgrade pip
	$(BIN4)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN4)/python -m pip install --quiet "$(TF4_SPEC)" "accelerate>=1.0" "safetensors>=0.4" "rich>=13" \
		"pillow>=10" "pytest>=8" "hypothesis>=6.100"
	$(BIN4)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP4)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/fitmap demo

test: $(STAMP) $(STAMP4)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest tests
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN4)/python -m pytest $(REMOTE_TESTS)

test-tf4: $(STAMP4)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN4)/python -m pytest $(REMOTE_TESTS)

clean:
	rm -rf $(VENV) $(VENV4)
