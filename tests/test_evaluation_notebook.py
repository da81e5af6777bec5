"""The companion notebook, Evaluating_a_trained_VAE.ipynb: its checks on the checkpoint it is given, and whole runs.

The first tests call the checkpoint loader on tiny checkpoints written here (milliseconds each). The tests marked
`notebook` execute the companion in a fresh kernel: with no checkpoint, with another data set's checkpoint, and
after a quick run of the walkthrough (the session's `quick_run`), whose vae.pt is copied so that run stays as it was.
"""

import json
import math
import shutil

import pytest
import torch

import vae_helpers as vh
from conftest import COMPANION, run_notebook, snapshot

FIGURES = ("iw_vs_k.png", "kl_per_dimension.png", "latent_space.png", "aggregate_posterior_samples.png")
EVALUATION_KEYS = {
    "config", "checkpoint_config", "test_loss_redraw_sd", "test_loss_standard_error", "entropy_floor",
    "importance_weighted", "active_units", "active_units_burda", "kl_per_dimension", "posterior_mean_variance",
    "gradient_variance", "knn_accuracy", "elbo_surgery", "marginal_kl_gaussian_lower_bound", "seconds", "device",
    "versions",
}  # fmt: skip


def training_settings(**changes):
    """The walkthrough's 13 settings at their defaults (3 epochs), with `changes`."""
    settings = dict(EPOCHS=3, BATCH_SIZE=128, LATENT_DIM=20, LEARNING_RATE=1e-3, SEED=1234, DATA_DIR="data",
                    OUT_DIR=".", TRAIN_SUBSET=0, DEVICE="auto", DATASET="mnist", BETA=1.0, BINARIZE=False,
                    RESUME=False)  # fmt: skip
    return {**settings, **changes}


def tiny_checkpoint(path, epoch=3, drop=(), **changes):
    """A checkpoint with every entry the loader checks (the weights are not looked at), written like training's."""
    state = {"model": {}, "optimizer": {}, "epoch": epoch, "config": training_settings(**changes),
             "history": {}, "train_seconds": 0.0, "rng": {}}  # fmt: skip
    for key in drop:
        del state[key]
    vh.save_checkpoint(state, path)
    return path


# --------------------------------------------------------------------------- the checkpoint loader


def test_a_finished_checkpoint_loads_with_its_training_settings(tmp_path, monkeypatch):
    path = tiny_checkpoint(tmp_path / "vae.pt", IW_SAMPLES=1000)  # older runs also stored IW_SAMPLES: ignored
    state = vh.load_trained_checkpoint(path, "mnist")
    monkeypatch.setenv("VAE_EPOCHS", "7")  # the evaluating notebook's VAE_* variables do not change the run's settings
    config = vh.checkpoint_config(state, DATA_DIR="/elsewhere", DEVICE="cpu")
    expected = training_settings(DATA_DIR="/elsewhere", DEVICE="cpu")
    assert config == vh.Config(**{name.lower(): value for name, value in expected.items()})


def test_no_checkpoint_names_the_walkthrough_to_run_first(tmp_path):
    with pytest.raises(vh.CheckpointError, match="no checkpoint") as error:
        vh.load_trained_checkpoint(tmp_path / "vae.pt", "mnist")
    assert "Variational_autoencoder.ipynb" in str(error.value) and "VAE_OUT_DIR" in str(error.value)


def test_a_truncated_or_foreign_checkpoint_is_named_as_unreadable(tmp_path):
    path = tiny_checkpoint(tmp_path / "vae.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(vh.CheckpointError, match="truncated or corrupt"):
        vh.load_trained_checkpoint(path, "mnist")
    torch.save({"model": vh.Config}, path)  # a global weights_only refuses: loading never runs a checkpoint's code
    with pytest.raises(vh.CheckpointError, match="truncated or corrupt"):
        vh.load_trained_checkpoint(path, "mnist")


@pytest.mark.parametrize("drop", [("history",), ("model", "epoch")])
def test_a_checkpoint_missing_entries_names_them(tmp_path, drop):
    path = tiny_checkpoint(tmp_path / "vae.pt", drop=drop)
    with pytest.raises(vh.CheckpointError, match="incomplete") as error:
        vh.load_trained_checkpoint(path, "mnist")
    assert all(repr(key) in str(error.value) for key in drop)


def test_a_checkpoint_without_its_settings_is_refused(tmp_path):
    path = tmp_path / "vae.pt"
    state = torch.load(tiny_checkpoint(path), weights_only=True)
    del state["config"]["BETA"]
    vh.save_checkpoint(state, path)
    with pytest.raises(vh.CheckpointError, match=r"unusable configuration.*BETA"):
        vh.load_trained_checkpoint(path, "mnist")
    state["config"]["BETA"] = -1.0
    vh.save_checkpoint(state, path)
    with pytest.raises(vh.CheckpointError, match="BETA"):
        vh.load_trained_checkpoint(path, "mnist")


def test_an_interrupted_training_says_to_finish_it(tmp_path):
    path = tiny_checkpoint(tmp_path / "vae.pt", epoch=1)
    with pytest.raises(vh.CheckpointError, match="1 of its 3 epochs: training was interrupted") as error:
        vh.load_trained_checkpoint(path, "mnist")
    assert "VAE_RESUME=1" in str(error.value)


def test_another_data_sets_checkpoint_names_both_and_the_fix(tmp_path):
    path = tiny_checkpoint(tmp_path / "vae.pt", DATASET="fashion")
    with pytest.raises(vh.CheckpointError, match="DATASET='fashion'.*DATASET='mnist'") as error:
        vh.load_trained_checkpoint(path, "mnist")
    assert "VAE_DATASET=fashion" in str(error.value)
    assert vh.load_trained_checkpoint(path, "fashion")["config"]["DATASET"] == "fashion"


# --------------------------------------------------------------------------- whole runs of the companion


@pytest.mark.notebook
def test_without_a_checkpoint_it_stops_at_once_and_writes_nothing(tmp_path):
    out_dir = tmp_path / "no_run_here"
    notebook, error = run_notebook(out_dir, notebook_path=COMPANION)
    assert error is not None and "CheckpointError" in str(error)
    assert "Variational_autoencoder.ipynb first" in str(error)
    assert not out_dir.exists()


@pytest.mark.notebook
def test_another_data_sets_checkpoint_stops_it_and_changes_nothing(tmp_path):
    tiny_checkpoint(tmp_path / "vae.pt", DATASET="fashion")
    before = snapshot(tmp_path)
    _, error = run_notebook(tmp_path, notebook_path=COMPANION)  # DATASET is mnist by default
    assert error is not None and "CheckpointError" in str(error)
    assert "DATASET='fashion'" in str(error) and "DATASET='mnist'" in str(error)
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def evaluated(quick_run, tmp_path_factory):
    """The companion run on a copy of the walkthrough's quick run: (its OUT_DIR, evaluation.json, the checkpoint)."""
    out_dir = tmp_path_factory.mktemp("evaluated")
    shutil.copy2(quick_run / "vae.pt", out_dir / "vae.pt")
    checkpoint = (out_dir / "vae.pt").read_bytes()
    _, error = run_notebook(out_dir, notebook_path=COMPANION)
    assert error is None, error
    assert (out_dir / "vae.pt").read_bytes() == checkpoint  # read, never written
    state = torch.load(out_dir / "vae.pt", weights_only=True)
    return out_dir, json.loads((out_dir / "evaluation.json").read_text()), state


@pytest.mark.notebook
def test_after_the_walkthrough_it_writes_every_figure_and_evaluation_json(evaluated):
    out_dir, evaluation, state = evaluated
    for name in FIGURES:
        assert (out_dir / name).stat().st_size > 0, name
    assert not list(out_dir.glob(".*.tmp"))
    assert set(evaluation) == EVALUATION_KEYS
    assert evaluation["checkpoint_config"] == state["config"]
    assert evaluation["config"]["OUT_DIR"] == str(out_dir)
    assert (evaluation["config"]["IW_SAMPLES"], evaluation["config"]["IW_TEST_IMAGES"]) == (50, 100)  # quick
    assert evaluation["seconds"] > 0 and evaluation["versions"]["torch"] == torch.__version__


@pytest.mark.notebook
def test_the_evaluation_numbers_are_consistent(evaluated):
    _, evaluation, state = evaluated
    latent_dim = state["config"]["LATENT_DIM"]
    assert evaluation["test_loss_redraw_sd"] > 0 and evaluation["test_loss_standard_error"] > 0
    assert 0 < evaluation["entropy_floor"] < state["history"]["test_recon"][-1]

    iw = evaluation["importance_weighted"]
    assert (iw["K"], iw["test_images"]) == (50, 100)
    assert iw["nll"] < iw["elbo_loss_same_images"] + 4 * iw["standard_error"]
    assert iw["by_K"]["K"] == [1, 10, 50] and iw["by_K"]["test_images"] == 100  # K = 1, 10, IW_SAMPLES
    assert iw["by_K"]["nll"][-1] == pytest.approx(iw["nll"])  # its last point is the estimate on the same 100 images

    kl, variance = evaluation["kl_per_dimension"], evaluation["posterior_mean_variance"]
    assert len(kl) == len(variance) == latent_dim
    assert evaluation["active_units"] == sum(value > 0.01 for value in kl)
    assert evaluation["active_units_burda"] == sum(value > 0.01 for value in variance)
    assert all(v <= 2 * k + 1e-6 for v, k in zip(variance, kl))  # Var_x(mu_j) <= 2 * average KL_j
    surgery = evaluation["elbo_surgery"]
    assert sum(kl) == pytest.approx(surgery["average_kl"], rel=1e-4)
    assert surgery["average_kl"] == pytest.approx(state["history"]["test_kl"][-1], rel=1e-4)  # the same test KL
    assert surgery["mutual_information"] + surgery["marginal_kl"] == pytest.approx(surgery["average_kl"], abs=1e-4)
    assert surgery["mutual_information"] < math.log(10_000) + 4 * surgery["standard_error"]
    assert 0 <= evaluation["marginal_kl_gaussian_lower_bound"] < surgery["marginal_kl"] + 4 * surgery["standard_error"]

    gradients = evaluation["gradient_variance"]
    assert gradients["ratio_to_reparameterization"]["reparameterization"] == 1
    for name, (low, high) in gradients["ratio_interval_95"].items():
        assert low <= gradients["ratio_to_reparameterization"][name] <= high, name
    knn = evaluation["knn_accuracy"]
    assert knn["k"] == 5 and all(0 <= knn[key] <= 1 for key in ("latent", "pca_2d", "untrained_encoder", "pixels"))
