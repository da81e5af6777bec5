# Two commands on a fresh machine: `make run` (train, then evaluate, at the defaults) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NOTEBOOK := Variational_autoencoder.ipynb
# The companion: evaluates the walkthrough's checkpoint (OUT_DIR/vae.pt), writes evaluation.json and its figures.
COMPANION := Evaluating_a_trained_VAE.ipynb
DATA_DIR := $(or $(VAE_DATA_DIR),data)
DATASET := $(or $(VAE_DATASET),mnist)
REPRODUCE_DIR ?= build/reproduce
MAX_TEST_LOSS ?= 101.5
# Execute headless, in order, with no per-cell timing metadata in the result.
EXECUTE := $(BIN)/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=-1 \
	--ExecutePreprocessor.record_timing=False

# uv installs the lock files: a fresh setup took 7-27 s on the CI machine where pip took 75-78 s (CONTRIBUTING.md). It is
# pinned, and itself installed by pip, hash-checked, from requirements-uv.lock: a fresh machine needs only Python
# and make.
UV_VERSION := 0.13.9
UV := $(BIN)/uv
# uv does not read pip's configuration. This project's CI machines give pip two local PyPI mirrors (below), and
# uv takes wheels from them before PyPI when they exist. Every file must still match the lock's hashes, which are
# PyPI's, so a mirror only saves downloads; it cannot change what is installed. `unsafe-best-match` lets a
# mirror that holds other versions of a package fall through to PyPI (uv's default would stop at the mirror);
# with exact, hashed pins there is nothing else it could pick. Elsewhere this is empty; WHEEL_MIRRORS= turns it off.
WHEEL_MIRRORS ?= $(patsubst %,file://%,$(wildcard /opt/pypi/simple /opt/pypi-more/simple))
SYNC := $(UV) pip sync --python $(BIN)/python --require-hashes \
	$(if $(strip $(WHEEL_MIRRORS)),--index-strategy unsafe-best-match $(addprefix --extra-index-url ,$(WHEEL_MIRRORS)))
# Fails, naming the pin, when requirements*.txt and the lock files disagree (standard library only).
CHECK_LOCK := $(PYTHON) tools/check_lock.py
# Universal: one lock for Linux and macOS (and Windows), Python 3.11 and newer, resolved on PyPI.
COMPILE := $(UV) pip compile --universal --python-version 3.11 --generate-hashes --custom-compile-command "make lock" \
	--quiet $(LOCK_FLAGS)

.PHONY: setup dev lock data run reproduce test test-full lint bench sweep clean

setup: $(VENV)/.installed  ## create .venv with exactly requirements.lock (hash-checked)

dev: $(VENV)/.installed-dev  ## the same with requirements-dev.lock: also ruff, nbstripout, pre-commit, playwright

# The venv and the pinned uv in it.
$(VENV)/.uv: requirements-uv.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements-uv.lock
	touch $@

# `uv pip sync` makes the venv exactly the lock (it removes what the lock lacks, except pip and uv). A venv that
# has the dev tools stays a dev venv: it is synced with the dev lock, a superset, so `make test` after `make dev`
# does not uninstall the linters. (The dev lock is a prerequisite for that case; elsewhere its sync changes nothing.)
$(VENV)/.installed: requirements.txt requirements.lock requirements-dev.lock $(VENV)/.uv
	$(CHECK_LOCK)
	$(SYNC) $(if $(wildcard $(BIN)/pre-commit),requirements-dev.lock,requirements.lock)
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt requirements-dev.lock $(VENV)/.uv
	$(CHECK_LOCK)
	$(SYNC) requirements-dev.lock
	touch $(VENV)/.installed $@

# Keeps every pin it can (LOCK_FLAGS=--upgrade moves all to the newest allowed); the dev lock is constrained to the
# runtime lock, so the packages they share are identical (tools/check_lock.py checks that too).
lock: $(VENV)/.uv  ## regenerate requirements*.lock from requirements*.txt and UV_VERSION
	$(COMPILE) requirements.txt -o requirements.lock
	$(COMPILE) requirements-dev.txt --constraint requirements.lock -o requirements-dev.lock
	echo "uv==$(UV_VERSION)" | $(COMPILE) - -o requirements-uv.lock
	$(CHECK_LOCK)

data: setup  ## make sure the data set is in $(DATA_DIR), verified (downloads through torchvision if absent)
	$(BIN)/python tools/make_commands.py fetch $(DATA_DIR) $(DATASET)

run: data  ## the main job: execute the walkthrough, then the companion, in place at their defaults; writes every figure here
	$(EXECUTE) --inplace $(NOTEBOOK)
	$(EXECUTE) --inplace $(COMPANION)

reproduce: data  ## run both notebooks headless at the defaults into $(REPRODUCE_DIR) and check the result
	rm -rf $(REPRODUCE_DIR) && mkdir -p $(REPRODUCE_DIR)
	VAE_OUT_DIR=$(REPRODUCE_DIR) $(EXECUTE) --output-dir $(REPRODUCE_DIR) $(NOTEBOOK)
	VAE_OUT_DIR=$(REPRODUCE_DIR) $(EXECUTE) --output-dir $(REPRODUCE_DIR) $(COMPANION)
	$(BIN)/python tools/make_commands.py check-run $(REPRODUCE_DIR) $(MAX_TEST_LOSS)

test: data  ## the fast tier (a few minutes): unit tests, estimator oracles, the committed notebooks, nbval on both
	$(BIN)/python -m pytest

test-full: data  ## the slow tier (several minutes): real kernels, a browser, the sweep, one end-to-end papermill run
	$(BIN)/python -m pytest -m slow

lint: dev  ## ruff and nbstripout through pre-commit, on every file
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pre-commit run --all-files --show-diff-on-failure

bench: data  ## every epoch with and without configure_torch against the matmul floor; then beside a second job
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_shared_cores.py

sweep: data  ## train and evaluate each exercise configuration into build/sweep (resumable), then a table and a figure; published to results/sweep
	$(BIN)/python tools/sweep.py --out build/sweep --data-dir $(DATA_DIR) --publish results/sweep $(SWEEP_ARGS)

clean:  ## remove scratch runs (keeps .venv and data)
	rm -rf $(REPRODUCE_DIR) .pytest_cache .ruff_cache __pycache__ tests/__pycache__ tools/__pycache__
