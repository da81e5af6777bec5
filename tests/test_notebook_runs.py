"""Whole runs of the walkthrough in the quick configuration: figures, determinism, resuming, Fashion-MNIST, and
every way a run can be refused, each showing its clear error and that nothing already written was lost.
(nbval runs the notebook once more on its own, from pytest.ini.)
"""

import gzip
import json
import shutil
from pathlib import Path

import pytest

from conftest import data_root, dataset_present, run_notebook, snapshot

pytestmark = pytest.mark.notebook

FIGURES = ("samples.png", "reconstructions.png", "interpolation.png", "loss_curves.png")
# Entries of metrics.json that identical runs may differ in: the time taken, and OUT_DIR and RESUME
# (part of "config"); every number a run computes must match.
NOT_RESULTS = ("train_seconds", "config")
FASHION_PACKAGE = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist


def metrics_of(out_dir):
    """metrics.json."""
    return json.loads((Path(out_dir) / "metrics.json").read_text())


def results_of(out_dir):
    """metrics.json without the entries that identical runs may differ in."""
    return {key: value for key, value in metrics_of(out_dir).items() if key not in NOT_RESULTS}


def failing_cell(notebook):
    """The index, among code cells, of the one that raised; later cells must not have run."""
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    failed = next(i for i, cell in enumerate(code_cells) if any(o["output_type"] == "error" for o in cell["outputs"]))
    assert all(cell["execution_count"] is None for cell in code_cells[failed + 1 :])
    return failed


def test_quick_run_writes_every_figure_and_consistent_metrics(quick_run):
    for name in (*FIGURES, "metrics.json", "vae.pt"):
        assert (quick_run / name).stat().st_size > 0, name
    assert not list(quick_run.glob(".*.tmp"))
    metrics = metrics_of(quick_run)
    history = metrics["history"]
    assert len(history["test_recon"]) == 2 and metrics["config"]["EPOCHS"] == 2
    assert metrics["final_test_loss"] == pytest.approx(metrics["final_test_recon"] + metrics["final_test_kl"])
    assert metrics["test_loss"] == pytest.approx([r + k for r, k in zip(history["test_recon"], history["test_kl"])])
    assert metrics["final_test_negative_elbo"] == pytest.approx(metrics["final_test_recon"] + metrics["final_test_kl"])
    assert 0 < metrics["entropy_floor"] < metrics["final_test_recon"]  # grey pixels: a floor under the BCE
    assert metrics["train_seconds"] > 0 and metrics["config"]["RESUME"] is False


def test_identical_runs_give_identical_results(quick_run, tmp_path):
    _, error = run_notebook(tmp_path, EPOCHS=2)
    assert error is None, error
    assert results_of(tmp_path) == results_of(quick_run)  # every loss, to the last bit
    assert (tmp_path / "samples.png").read_bytes() == (quick_run / "samples.png").read_bytes()


def test_resuming_gives_the_same_final_metrics_as_an_uninterrupted_run(quick_run, tmp_path):
    _, error = run_notebook(tmp_path, EPOCHS=1)  # "interrupted" after epoch 1
    assert error is None, error
    notebook, error = run_notebook(tmp_path, EPOCHS=2, RESUME=1)
    assert error is None, error
    assert "resumed from" in json.dumps(notebook["cells"])
    assert results_of(tmp_path) == results_of(quick_run)
    assert (tmp_path / "samples.png").read_bytes() == (quick_run / "samples.png").read_bytes()


@pytest.fixture
def finished_out_dir(quick_run, tmp_path):
    """A copy of a finished run's OUT_DIR, to run failing runs over."""
    out_dir = tmp_path / "out"
    shutil.copytree(quick_run, out_dir)
    return out_dir


def test_non_finite_loss_stops_at_once_and_overwrites_nothing(finished_out_dir):
    before = snapshot(finished_out_dir)
    _, error = run_notebook(finished_out_dir, LEARNING_RATE=1e6)
    assert error is not None and error.ename == "FloatingPointError"
    assert "epoch 1, batch" in error.evalue and "LEARNING_RATE" in error.evalue
    assert snapshot(finished_out_dir) == before


def test_mismatched_checkpoint_is_refused_and_kept(finished_out_dir):
    before = snapshot(finished_out_dir)
    _, error = run_notebook(finished_out_dir, EPOCHS=2, RESUME=1, LATENT_DIM=8)
    assert error is not None and error.ename == "CheckpointError"
    assert "LATENT_DIM: checkpoint 20, now 8" in error.evalue
    assert snapshot(finished_out_dir) == before


def test_corrupt_checkpoint_is_refused_and_kept(finished_out_dir):
    checkpoint = finished_out_dir / "vae.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: 1 << 20])  # truncated, as by a full disk
    before = snapshot(finished_out_dir)
    _, error = run_notebook(finished_out_dir, EPOCHS=2, RESUME=1)
    assert error is not None and error.ename == "CheckpointError" and "truncated or corrupt" in error.evalue
    assert snapshot(finished_out_dir) == before


def test_unwritable_out_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("keep me")
    notebook, error = run_notebook(blocker / "out")
    assert error is not None and "cannot be written to" in error.evalue and "VAE_OUT_DIR" in error.evalue
    assert failing_cell(notebook) == 2  # the setup cell, before the data is loaded or anything trained
    assert blocker.read_text() == "keep me"


def test_bad_setting_stops_in_the_settings_cell(tmp_path):
    notebook, error = run_notebook(tmp_path, EPOCHS="abc")
    assert error is not None and error.ename == "ConfigError" and failing_cell(notebook) == 1
    assert "VAE_EPOCHS='abc'" in error.evalue and "a whole number >= 1" in error.evalue
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def fashion_root(tmp_path):
    """A data root with Fashion-MNIST: from $VAE_DATA_DIR if there, else unzipped from Debian's package."""
    if dataset_present(data_root(), "fashion"):
        return data_root()
    if not FASHION_PACKAGE.is_dir():
        pytest.skip("Fashion-MNIST not found: apt-get install dataset-fashion-mnist, or put it in VAE_DATA_DIR")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for packed in FASHION_PACKAGE.glob("*-ubyte.gz"):
        (raw / packed.stem).write_bytes(gzip.decompress(packed.read_bytes()))
    return tmp_path


def test_fashion_mnist_quick_run(fashion_root, tmp_path):
    out_dir = tmp_path / "out"
    notebook, error = run_notebook(out_dir, DATASET="fashion", DATA_DIR=fashion_root)
    assert error is None, error
    assert "T-shirt/top" in json.dumps(notebook["cells"])
    assert all((out_dir / name).is_file() for name in FIGURES)
    assert metrics_of(out_dir)["config"]["DATASET"] == "fashion"
