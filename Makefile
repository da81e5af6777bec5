# Two commands on a fresh machine: `make run` (train, then evaluate, at the defaults) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NOTEBOOK := Variational_autoencoder.ipynb
# The companion: evaluates the walkthrough's trained model (OUT_DIR/model.pt), writes evaluation.json and figures.
COMPANION := Evaluating_a_trained_VAE.ipynb
# Where the data is (make DATA_DIR=... or the environment); the notebooks get it as a papermill parameter.
DATA_DIR ?= data
DATASET ?= mnist
REPRODUCE_DIR ?= build/reproduce
MAX_TEST_LOSS ?= 102.5
# Execute headless, in order, with no per-cell timing metadata in the result.
EXECUTE := $(BIN)/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=-1 \
	--ExecutePreprocessor.record_timing=False --ExecutePreprocessor.store_widget_state=False
# Settings other than the defaults reach a notebook as papermill parameters (-p NAME value), and only so.
PAPERMILL := $(BIN)/papermill --no-progress-bar --cwd .

# uv installs the lock files: a fresh setup took 7-27 s on the CI machine where pip took 75-78 s (CONTRIBUTING.md). It is
# pinned, and itself installed by pip, hash-checked, from requirements-uv.lock: a fresh machine needs only Python
# and make.
UV_VERSION := 0.13.9
UV := $(BIN)/uv
# Any file whose hash differs from the lock's is refused. A local mirror, if any, comes from the environment
# (UV_EXTRA_INDEX_URL, UV_INDEX_STRATEGY: see .ci/run); it can only save downloads.
SYNC := $(UV) pip sync --python $(BIN)/python --require-hashes
# Universal: one lock for Linux and macOS (and Windows), Python 3.11 and newer, resolved on PyPI alone: index
# settings in the environment are dropped, so that the hashes are PyPI's, not a mirror's.
COMPILE := env -u UV_INDEX_URL -u UV_DEFAULT_INDEX -u UV_INDEX -u UV_EXTRA_INDEX_URL -u UV_FIND_LINKS \
	-u UV_INDEX_STRATEGY $(UV) pip compile --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command "make lock" --quiet $(LOCK_FLAGS)
# The three locks, from the requirements*.txt in folder $(1): `lock` runs this here, `lock-check` in a copy. The dev
# lock is constrained to the runtime lock, so the packages they share are identical.
LOCKS = $(COMPILE) --directory $(1) requirements.txt -o requirements.lock && \
	$(COMPILE) --directory $(1) requirements-dev.txt --constraint requirements.lock -o requirements-dev.lock && \
	echo "uv==$(UV_VERSION)" | $(COMPILE) --directory $(1) - -o requirements-uv.lock

.PHONY: setup dev lock lock-check data run reproduce test test-full lint bench sweep clean

setup: $(VENV)/.installed  ## create .venv with exactly requirements.lock (hash-checked)

dev: $(VENV)/.installed-dev  ## the same with requirements-dev.lock: also ruff, nbstripout, pre-commit, playwright

# The venv and the pinned uv in it. The lock needs Python 3.11 or newer: an older one stops here, at once, named.
$(VENV)/.uv: requirements-uv.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "make setup needs Python 3.11 or \
	newer, and $(PYTHON) is Python %s. Install a newer one and name it: make setup PYTHON=python3.12 (or its path)" \
	% sys.version.split()[0])' || { command -v $(PYTHON) >/dev/null || echo "make setup: there is no $(PYTHON)." \
	"Install Python 3.11 or newer and name it: make setup PYTHON=python3.12 (or its path)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements-uv.lock
	touch $@

# `uv pip sync` makes the venv exactly the lock (it removes what the lock lacks, except pip and uv). A venv that
# has the dev tools stays a dev venv: it is synced with the dev lock, a superset, so `make test` after `make dev`
# does not uninstall the linters. (The dev lock is a prerequisite for that case; elsewhere its sync changes nothing.)
$(VENV)/.installed: requirements.txt requirements.lock requirements-dev.lock $(VENV)/.uv
	$(SYNC) $(if $(wildcard $(BIN)/pre-commit),requirements-dev.lock,requirements.lock)
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt requirements-dev.lock $(VENV)/.uv
	$(SYNC) requirements-dev.lock
	touch $(VENV)/.installed $@

# uv reads each existing lock and keeps every pin it can (LOCK_FLAGS=--upgrade moves all to the newest allowed).
lock: $(VENV)/.uv  ## regenerate requirements*.lock from requirements*.txt and UV_VERSION
	$(call LOCKS,.)

# uv pip compile has no check mode (uv 0.13.9), so this runs `make lock` on a copy of requirements*.txt and of the
# committed locks (uv keeps their pins, as in `make lock`) in a temporary folder, and compares. Needs PyPI.
lock-check: $(VENV)/.uv  ## fail if requirements*.lock differ from what `make lock` would write (CI runs this)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	cp requirements*.txt requirements*.lock "$$tmp/" && \
	$(call LOCKS,"$$tmp") && \
	stale= && for f in requirements*.lock; do diff -u "$$f" "$$tmp/$$f" || stale=1; done && \
	if [ -n "$$stale" ]; then echo "requirements*.lock are stale: run \`make lock\` and commit them with" \
		"requirements*.txt (the diff above is what it would change)" >&2; exit 1; fi && \
	echo "requirements*.lock are what \`make lock\` makes of requirements*.txt and UV_VERSION $(UV_VERSION)"

data: setup  ## make sure the data set is in $(DATA_DIR), verified (downloads through torchvision if absent)
	$(BIN)/python tools/make_commands.py fetch $(DATA_DIR) $(DATASET)

run: data  ## the main job: execute the walkthrough, then the companion, in place at their defaults; outputs/ holds the results
	@test "$(DATA_DIR)" = data || { echo "make run executes the notebooks as committed, which read ./data:" \
		"link your copy there (ln -s $(DATA_DIR) data) and run make run without DATA_DIR"; exit 1; }
	$(EXECUTE) --inplace $(NOTEBOOK)
	$(EXECUTE) --inplace $(COMPANION)

reproduce: data  ## run both notebooks headless at the defaults into $(REPRODUCE_DIR) and check the result
	rm -rf $(REPRODUCE_DIR) && mkdir -p $(REPRODUCE_DIR)
	$(PAPERMILL) $(NOTEBOOK) $(REPRODUCE_DIR)/$(NOTEBOOK) -p OUT_DIR $(REPRODUCE_DIR) -p DATA_DIR $(DATA_DIR)
	$(PAPERMILL) $(COMPANION) $(REPRODUCE_DIR)/$(COMPANION) -p OUT_DIR $(REPRODUCE_DIR) -p DATA_DIR $(DATA_DIR)
	$(BIN)/python tools/make_commands.py check-run $(REPRODUCE_DIR) $(MAX_TEST_LOSS)

test: data  ## the fast tier (a few minutes): unit tests, estimator oracles, the committed notebooks, nbval on both
	$(BIN)/python -m pytest --data-dir=$(DATA_DIR)

test-full: data  ## the slow tier (several minutes): real kernels, a browser, the sweep, one end-to-end papermill run
	$(BIN)/python -m pytest -m slow --data-dir=$(DATA_DIR)

lint: dev  ## ruff and nbstripout through pre-commit, on every file
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pre-commit run --all-files --show-diff-on-failure

# `make bench BASELINE=b7da75d` times the working tree against that revision.
BASELINE ?= HEAD
bench: data  ## the walkthrough's default training, working tree vs $(BASELINE), and against the matmul floor; then beside a second job
	$(BIN)/python benchmarks/bench_train.py --baseline $(BASELINE) --data-dir $(DATA_DIR)
	$(BIN)/python benchmarks/bench_shared_cores.py --data-dir $(DATA_DIR)

# Two runs side by side, one torch thread each, finished the sweep in 0.76x the time of one after the other on the
# 2-core CI machine (CONTRIBUTING.md); SWEEP_JOBS=1 runs them one at a time.
SWEEP_JOBS ?= 2
sweep: data  ## train and evaluate each exercise configuration, from several seeds, into build/sweep (resumable), then a table and a figure; published to results/sweep
	$(BIN)/python tools/sweep.py --out build/sweep --data-dir $(DATA_DIR) --jobs $(SWEEP_JOBS) --publish results/sweep \
		$(SWEEP_ARGS)

clean:  ## remove scratch runs (keeps .venv and data)
	rm -rf $(REPRODUCE_DIR) build/nbval .pytest_cache .ruff_cache __pycache__ tests/__pycache__ tools/__pycache__
