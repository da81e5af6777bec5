"""Shared test setup: the quick configuration, where the data is, and papermill as the one whole-notebook runner.

nbval runs copies of both notebooks that papermill prepared with the quick configuration (1 epoch on 2,000
images) and a scratch OUT_DIR as parameters, in build/nbval: the notebook tests never write into the repository.
They are added when pytest runs its testpaths (`python -m pytest`, `make test`). Tests that need real MNIST
(marked `notebook`, and the notebooks under nbval) are skipped, with the reason, when it is not on disk: tests
never download. The data folder is --data-dir (the Makefile passes DATA_DIR), else the repository's `data`.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "Variational_autoencoder.ipynb"
COMPANION = REPO / "Evaluating_a_trained_VAE.ipynb"
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # as configure_torch sets it, before MKL's first call fixes it
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # the command-line tools, importable as modules
import vae_helpers as vh  # noqa: E402

# The parameters cells' defaults, as a reader sees them.
DEFAULTS = {
    NOTEBOOK: {"EPOCHS": 20, "BATCH_SIZE": 128, "LATENT_DIM": 20, "LEARNING_RATE": 1e-3, "SEED": 1234,
               "DATA_DIR": "data", "OUT_DIR": "outputs", "TRAIN_SUBSET": 0, "DEVICE": "auto", "DATASET": "mnist",
               "BETA": 1.0, "BINARIZE": False, "RESUME": False},
    COMPANION: {"OUT_DIR": "outputs", "DATA_DIR": "data", "DATASET": "mnist", "DEVICE": "auto", "IW_SAMPLES": 1000,
                "IW_TEST_IMAGES": 1000},
}
# The quick configuration of the fast tier (nbval), as papermill parameters; each notebook takes those it has.
QUICK_SETTINGS = {"EPOCHS": 1, "TRAIN_SUBSET": 2000, "IW_SAMPLES": 50, "IW_TEST_IMAGES": 100}
NBVAL_DIR = REPO / "build" / "nbval"
DATA_ROOT = [REPO / "data"]  # replaced by --data-dir


def pytest_addoption(parser):
    parser.addoption("--data-dir", default=str(REPO / "data"), help="the folder that holds MNIST/raw (make: DATA_DIR)")


@pytest.fixture(scope="session")
def nb():
    """The walkthrough's cells tagged `definitions` (VAE, loss_terms, train_one_epoch, ...), as a namespace."""
    return vh.load_notebook_definitions(NOTEBOOK)


def data_root():
    """The folder the notebooks read data from in the tests: --data-dir, else the repository's `data`."""
    return DATA_ROOT[0]


def dataset_present(root, dataset):
    """True if all four files of `dataset` are in `root`, in torchvision's layout (<Name>/raw/)."""
    return not vh.missing_files(root, dataset)


def snapshot(folder):
    """Every file below `folder` (by relative path) with its bytes, to show that nothing was changed or lost."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def prepare_notebook(notebook, target, clear_outputs=False, **parameters):
    """Write a copy of `notebook` to `target` with papermill's parameters cell for those of `parameters` it has."""
    import nbformat
    import papermill

    own = papermill.inspect_notebook(str(notebook))
    papermill.execute_notebook(str(notebook), str(target), parameters={k: v for k, v in parameters.items() if k in own},
                               prepare_only=True, kernel_name="python3", progress_bar=False)
    if clear_outputs:
        copy = nbformat.read(target, as_version=4)
        for cell in copy.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nbformat.write(copy, target)
    return Path(target)


def execute_notebook(notebook, output_path, **parameters):
    """Run a whole notebook with papermill in the repository's folder (so `import vae_helpers` works), its settings
    given as papermill parameters. Returns the executed notebook; raises PapermillExecutionError on an error."""
    import papermill

    return papermill.execute_notebook(str(notebook), str(output_path), parameters=parameters, cwd=str(REPO),
                                      kernel_name="python3", progress_bar=False)


def pytest_configure(config):
    """Where the data is; when pytest runs its testpaths, nbval's copies of both notebooks in the quick configuration
    (the walkthrough first: the companion reads its checkpoint), with a scratch OUT_DIR."""
    DATA_ROOT[0] = Path(config.getoption("data_dir")).expanduser().resolve()
    if config.args_source != pytest.Config.ArgsSource.TESTPATHS or not dataset_present(data_root(), "mnist"):
        return
    config.nbval_out_dir = tempfile.mkdtemp(prefix="vae-nbval-")
    shutil.rmtree(NBVAL_DIR, ignore_errors=True)
    NBVAL_DIR.mkdir(parents=True)
    (NBVAL_DIR / "vae_helpers.py").symlink_to(REPO / "vae_helpers.py")  # imported from the kernel's folder
    for notebook in (NOTEBOOK, COMPANION):
        prepare_notebook(notebook, NBVAL_DIR / notebook.name, **QUICK_SETTINGS, OUT_DIR=config.nbval_out_dir,
                         DATA_DIR=str(data_root()))
        config.args.append(str(NBVAL_DIR / notebook.name))


def pytest_unconfigure(config):
    """Remove the scratch OUT_DIR."""
    if hasattr(config, "nbval_out_dir"):
        shutil.rmtree(config.nbval_out_dir, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Skip everything that executes a notebook when MNIST is not on disk (tests never download)."""
    if dataset_present(data_root(), "mnist"):
        return
    skip = pytest.mark.skip(reason=f"MNIST is not in {data_root()}: run `make data`, or pass --data-dir")
    for item in items:
        if item.path.suffix == ".ipynb" or item.get_closest_marker("notebook"):
            item.add_marker(skip)
