"""Shared test setup: the quick configuration, where the data is (--data-dir), papermill as the one whole-notebook
runner, nbval's prepared copies of both notebooks in build/nbval (when pytest runs its testpaths), the pieces
several test files use. Tests that need real MNIST are skipped, with the reason, when it is not on disk."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "Variational_autoencoder.ipynb"
COMPANION = REPO / "Evaluating_a_trained_VAE.ipynb"
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # as configure_torch sets it, before MKL's first call fixes it
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))  # the command-line tools, importable as modules
import vae_helpers as vh  # noqa: E402

# The parameters cells' defaults, as a reader sees them.
DEFAULTS = {NOTEBOOK: {"EPOCHS": 20, "BATCH_SIZE": 128, "LATENT_DIM": 20, "LEARNING_RATE": 1e-3, "SEED": 1234,
                       "DATA_DIR": "data", "OUT_DIR": "outputs", "TRAIN_SUBSET": 0, "DEVICE": "auto",
                       "DATASET": "mnist", "BETA": 1.0, "BINARIZE": False, "RESUME": False, "PRETRAINED": False},
            COMPANION: {"OUT_DIR": "outputs", "DATA_DIR": "data", "DATASET": "mnist", "DEVICE": "auto",
                        "IW_SAMPLES": 1000, "IW_TEST_IMAGES": 1000}}
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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors, where a second thread only adds waiting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as vh.configure_torch: Adam's tiny moments are subnormal, and slow
    yield
    torch.set_num_threads(threads)


def tiny_vae(nb, pixels=16, hidden=8, latent_dim=2, seed=0):
    """The walkthrough's VAE with its layers swapped for tiny ones (the same forward code): a run is a blink."""
    torch.manual_seed(seed)
    model = nb["VAE"](latent_dim)
    for name, sizes in dict(enc1=(pixels, hidden), enc2=(hidden, hidden), enc_mu=(hidden, latent_dim),
                            enc_log_var=(hidden, latent_dim), dec1=(latent_dim, hidden), dec2=(hidden, hidden),
                            dec3=(hidden, pixels)).items():
        setattr(model, name, torch.nn.Linear(*sizes))
    return model


def losses(history):
    """A run's epochs without their seconds: what two identical runs share to the last bit."""
    return [{key: value for key, value in epoch.items() if key != "seconds"} for epoch in history]


def under_ci():
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def require(what, present):
    """Skip when `present` is false, with `what` as the reason; under CI fail: CI never passes a check by skipping."""
    if not present and under_ci():
        pytest.fail(f"{what} (CI is set: this test must run, not skip)")
    if not present:
        pytest.skip(what)


def require_strict_mkl():
    """Skip unless MKL's mode can be read (its strict mode: the same bits at any thread count); under CI, fail."""
    why = ("torch has no MKL" if not torch.backends.mkl.is_available() else
           "torch's MKL does not export mkl_serv_cbwr_get, which vh.mkl_cbwr_mode reads")
    require(f"{why}: the same bits at any thread count cannot be checked", vh.mkl_cbwr_mode() is not None)


def data_root():
    """The folder the notebooks read data from in the tests: --data-dir, else the repository's `data`."""
    return DATA_ROOT[0]


def prepare_notebook(notebook, target, clear_outputs=False, **parameters):
    """Write a copy of `notebook` to `target` with papermill's parameters cell for those of `parameters` it has."""
    import nbformat
    import papermill

    own = papermill.inspect_notebook(str(notebook))
    papermill.execute_notebook(str(notebook), str(target), parameters={k: v for k, v in parameters.items() if k in own},
                               prepare_only=True, kernel_name="python3", progress_bar=False)
    if clear_outputs:
        copy = nbformat.read(target, as_version=4)
        for cell in (cell for cell in copy.cells if cell.cell_type == "code"):
            cell.outputs, cell.execution_count = [], None
        nbformat.write(copy, target)
    return Path(target)


def execute_notebook(notebook, output_path, **parameters):
    """The notebook executed by papermill in the repository's folder, with `parameters`."""
    import papermill

    return papermill.execute_notebook(str(notebook), str(output_path), parameters=parameters, cwd=str(REPO),
                                      kernel_name="python3", progress_bar=False)


def pytest_configure(config):
    """Where the data is; for a run of the testpaths, nbval's quick copies of both notebooks, walkthrough first."""
    DATA_ROOT[0] = Path(config.getoption("data_dir")).expanduser().resolve()
    if config.args_source != pytest.Config.ArgsSource.TESTPATHS or vh.missing_files(data_root(), "mnist"):
        return
    config.nbval_out_dir = tempfile.mkdtemp(prefix="vae-nbval-")
    config.add_cleanup(lambda: shutil.rmtree(config.nbval_out_dir, ignore_errors=True))
    shutil.rmtree(NBVAL_DIR, ignore_errors=True)
    NBVAL_DIR.mkdir(parents=True)
    (NBVAL_DIR / "vae_helpers.py").symlink_to(REPO / "vae_helpers.py")  # imported from the kernel's folder
    for notebook in (NOTEBOOK, COMPANION):
        prepare_notebook(notebook, NBVAL_DIR / notebook.name, **QUICK_SETTINGS, OUT_DIR=config.nbval_out_dir,
                         DATA_DIR=str(data_root()))
        config.args.append(str(NBVAL_DIR / notebook.name))


def pytest_collection_modifyitems(config, items):
    """Skip everything that executes a notebook when MNIST is not on disk (tests never download); under CI, stop."""
    if not vh.missing_files(data_root(), "mnist"):
        return
    reason = f"MNIST is not in {data_root()}: run `make data`, or pass --data-dir"
    if under_ci():
        raise pytest.UsageError(f"{reason} (CI is set: the tests that need it must run, not skip)")
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.path.suffix == ".ipynb" or item.get_closest_marker("notebook"):
            item.add_marker(skip)
