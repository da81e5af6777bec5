"""Shared test setup: the quick configuration, where the data is, and a runner that executes the notebook.

nbval starts its kernel from this process's environment, so pytest_configure puts the quick configuration
(1 epoch on 2,000 images) and a scratch OUT_DIR there: the notebook test never writes into the repository.
Tests that need real MNIST are skipped, with the reason, when it is not on disk: tests never download.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "Variational_autoencoder.ipynb"
COMPANION = REPO / "Evaluating_a_trained_VAE.ipynb"
sys.path.insert(0, str(REPO))
import vae_helpers as vh  # noqa: E402

# The quick configuration: every notebook run in the tests starts from this.
QUICK_SETTINGS = {
    "VAE_EPOCHS": "1",
    "VAE_TRAIN_SUBSET": "2000",
    "VAE_IW_SAMPLES": "50",
    "VAE_IW_TEST_IMAGES": "100",
}
KEPT_SETTINGS = ("VAE_DATA_DIR", "VAE_DEVICE")  # a user's data location and device still apply


def data_root():
    """The folder the notebook will read data from: $VAE_DATA_DIR, else the notebook's default `data`."""
    return Path(os.environ.get("VAE_DATA_DIR", REPO / "data"))


def dataset_present(root, dataset):
    """True if all four files of `dataset` are in `root`, in torchvision's layout."""
    _, folder, expected_files = vh.DATASETS[dataset]
    return not vh.missing_files(Path(root) / folder / "raw", expected_files)


def snapshot(folder):
    """Every file below `folder` (by relative path) with its bytes, to show that nothing was changed or lost."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def pytest_configure(config):
    """Give nbval's kernel the quick configuration and a scratch OUT_DIR."""
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
    """Skip everything that executes the notebook when MNIST is not on disk (tests never download)."""
    if dataset_present(data_root(), "mnist"):
        return
    skip = pytest.mark.skip(reason=f"MNIST is not in {data_root()}: run `make data` or set VAE_DATA_DIR")
    for item in items:
        if item.path.suffix == ".ipynb" or item.get_closest_marker("notebook"):
            item.add_marker(skip)


def run_notebook(out_dir, notebook_path=NOTEBOOK, **settings):
    """Execute a whole notebook in a fresh kernel with the quick configuration plus `settings`.

    Returns (executed notebook, None) or (partly executed notebook, CellExecutionError).
    """
    env = dict(os.environ, VAE_OUT_DIR=str(out_dir), **{f"VAE_{k}": str(v) for k, v in settings.items()})
    notebook = nbformat.read(notebook_path, as_version=4)
    for cell in notebook["cells"]:  # start from a clean slate, not the committed run's outputs
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    try:
        client.execute(env=env)
    except CellExecutionError as error:
        return notebook, error
    return notebook, None


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One uninterrupted quick run of 2 epochs: its OUT_DIR (shared by several tests; do not modify)."""
    out_dir = tmp_path_factory.mktemp("quick_run")
    _, error = run_notebook(out_dir, EPOCHS=2)
    assert error is None, error
    return out_dir
