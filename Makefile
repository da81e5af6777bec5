# Two commands on a fresh machine: `make run` (train at the defaults) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NOTEBOOK := Variational_autoencoder.ipynb
DATA_DIR := $(or $(VAE_DATA_DIR),data)
DATASET := $(or $(VAE_DATASET),mnist)
REPRODUCE_DIR ?= build/reproduce
MAX_TEST_LOSS ?= 101.5
# Execute headless, in order, with no per-cell timing metadata in the result.
EXECUTE := $(BIN)/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=-1 \
	--ExecutePreprocessor.record_timing=False

.PHONY: setup dev data run reproduce test lint bench clean

setup: $(VENV)/.installed  ## create .venv and install the pinned requirements

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -r requirements.txt
	touch $@

dev: setup  ## also install ruff, nbstripout and pre-commit
	$(BIN)/python -m pip install -r requirements-dev.txt

data: setup  ## make sure the data set is in $(DATA_DIR), verified (downloads through torchvision if absent)
	$(BIN)/python vae_helpers.py fetch $(DATA_DIR) $(DATASET)

run: data  ## the main job: execute the notebook in place at its defaults; writes samples.png and friends here
	$(EXECUTE) --inplace $(NOTEBOOK)

reproduce: data  ## run the notebook headless at the defaults into $(REPRODUCE_DIR) and check the result
	rm -rf $(REPRODUCE_DIR) && mkdir -p $(REPRODUCE_DIR)
	VAE_OUT_DIR=$(REPRODUCE_DIR) $(EXECUTE) --output-dir $(REPRODUCE_DIR) --output executed.ipynb $(NOTEBOOK)
	$(BIN)/python vae_helpers.py check-run $(REPRODUCE_DIR) $(MAX_TEST_LOSS)

test: data  ## the test suite: helpers, model and loss, and the notebook under nbval (a few minutes)
	$(BIN)/python -m pytest

lint: dev  ## ruff and nbstripout through pre-commit, on every file
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pre-commit run --all-files --show-diff-on-failure

bench: data  ## time one epoch three ways and print the ratios
	$(BIN)/python benchmarks/bench_train.py

clean:  ## remove scratch runs (keeps .venv and data)
	rm -rf $(REPRODUCE_DIR) .pytest_cache .ruff_cache __pycache__ tests/__pycache__
