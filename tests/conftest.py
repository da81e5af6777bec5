"""Shared test setup: the quick configuration, where the data is, and papermill as the one whole-notebook runner.

nbval starts its kernels from this process's environment, so pytest_configure puts the quick configuration
(1 epoch on 2,000 images) and a scratch OUT_DIR there: the notebook tests never write into the repository.
Tests that need real MNIST (marked `notebook`, and the notebooks under nbval) are skipped, with the reason, when
it is not on disk: tests never download.
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
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # the command-line tools, importable as modules
import vae_helpers as vh  # noqa: E402

# The quick configuration of the fast tier (nbval): VAE_* variables, which every kernel started here inherits.
QUICK_SETTINGS = {"VAE_EPOCHS": "1", "VAE_TRAIN_SUBSET": "2000", "VAE_IW_SAMPLES": "50", "VAE_IW_TEST_IMAGES": "100"}
KEPT_SETTINGS = ("VAE_DATA_DIR", "VAE_DEVICE")  # a user's data location and device still apply


@pytest.fixture(scope="session")
def nb():
    """The walkthrough's cells tagged `definitions` (VAE, loss_terms, train_one_epoch, ...), as a namespace."""
    return vh.load_notebook_definitions(NOTEBOOK)


def data_root():
    """The folder the notebook will read data from: $VAE_DATA_DIR, else the notebook's default `data`."""
    return Path(os.environ.get("VAE_DATA_DIR", REPO / "data"))


def dataset_present(root, dataset):
    """True if all four files of `dataset` are in `root`, in torchvision's layout (<Name>/raw/)."""
    return not vh.missing_files(root, dataset)


def snapshot(folder):
    """Every file below `folder` (by relative path) with its bytes, to show that nothing was changed or lost."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def execute_notebook(notebook, output_path, **parameters):
    """Run a whole notebook with papermill in the repository's folder (so `import vae_helpers` works), its settings
    given as papermill parameters. Its kernel sees no VAE_* variable (one would override a parameter). Returns the
    executed notebook; raises papermill's PapermillExecutionError on an error."""
    import papermill

    saved = dict(os.environ)
    for name in [name for name in os.environ if name.startswith(vh.ENV_PREFIX)]:
        del os.environ[name]
    try:
        return papermill.execute_notebook(str(notebook), str(output_path), parameters=parameters, cwd=str(REPO),
                                          kernel_name="python3", progress_bar=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def pytest_configure(config):
    """Give nbval's kernels the quick configuration and a scratch OUT_DIR."""
    config.saved_environ = dict(os.environ)
    for name in [name for name in os.environ if name.startswith("VAE_") and name not in KEPT_SETTINGS]:
        del os.environ[name]
    os.environ.update(QUICK_SETTINGS)
    os.environ["VAE_OUT_DIR"] = config.nbval_out_dir = tempfile.mkdtemp(prefix="vae-nbval-")


def pytest_unconfigure(config):
    """Restore the environment and remove the scratch OUT_DIR."""
    if hasattr(config, "saved_environ"):
        os.environ.clear()
        os.environ.update(config.saved_environ)
        shutil.rmtree(config.nbval_out_dir, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Skip everything that executes a notebook when MNIST is not on disk (tests never download)."""
    if dataset_present(data_root(), "mnist"):
        return
    skip = pytest.mark.skip(reason=f"MNIST is not in {data_root()}: run `make data` or set VAE_DATA_DIR")
    for item in items:
        if item.path.suffix == ".ipynb" or item.get_closest_marker("notebook"):
            item.add_marker(skip)
