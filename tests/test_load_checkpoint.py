"""The companion's first stop, vh.load_trained_checkpoint: a checkpoint it cannot evaluate is refused with what to do
instead, in milliseconds, on tiny checkpoints written here. (Whole runs of the companion: test_papermill.py, nbval.)
"""

import json

import pytest
import torch

import vae_helpers as vh


def tiny_checkpoint(path, epochs_done=3, **changes):
    """A checkpoint with every entry the loader checks (the weights are not looked at): 3 epochs asked for."""
    config = {"EPOCHS": 3, "LATENT_DIM": 20, "SEED": 1234, "DATASET": "mnist", "BETA": 1.0, **changes}
    history = [{"train_recon": 1.0, "train_kl": 1.0, "test_recon": 1.0, "test_kl": 1.0, "seconds": 1.0}] * epochs_done
    torch.save({"model": {}, "optimizer": {}, "rng": {}, "config": config, "history": history, "device": "cpu",
                "run_id": "0123456789abcdef"}, path)
    metrics = {"entropy_floor": 45.5, "history": history}  # as the walkthrough's last cell writes it
    path.with_name("metrics.json").write_text(json.dumps(metrics))
    return path


def test_a_finished_checkpoint_loads_with_the_walkthroughs_metrics_of_that_run(tmp_path):
    state = vh.load_trained_checkpoint(tiny_checkpoint(tmp_path / "vae.pt"), "mnist")
    assert len(state["history"]) == state["config"]["EPOCHS"] == 3 and state["metrics"]["entropy_floor"] == 45.5
    (tmp_path / "metrics.json").write_text('{"entropy_floor": 189.9, "history": []}')  # an earlier run's
    with pytest.raises(vh.CheckpointError, match="metrics.json is from another training run"):
        vh.load_trained_checkpoint(tmp_path / "vae.pt", "mnist")
    (tmp_path / "metrics.json").unlink()
    with pytest.raises(vh.CheckpointError, match="metrics.json is missing.*to its last cell"):
        vh.load_trained_checkpoint(tmp_path / "vae.pt", "mnist")


def test_no_checkpoint_names_the_walkthrough_to_run_first(tmp_path):
    with pytest.raises(vh.CheckpointError, match="Cannot read checkpoint .*No such file") as error:
        vh.load_trained_checkpoint(tmp_path / "vae.pt", "mnist")
    assert "Run Variational_autoencoder.ipynb" in str(error.value) and "OUT_DIR" in str(error.value)


def test_an_interrupted_training_says_how_to_finish_it(tmp_path):
    with pytest.raises(vh.CheckpointError, match="1 of its 3 epochs: training was interrupted") as error:
        vh.load_trained_checkpoint(tiny_checkpoint(tmp_path / "vae.pt", epochs_done=1), "mnist")
    assert "RESUME = True" in str(error.value)


def test_another_data_sets_checkpoint_names_both_and_the_fix(tmp_path):
    path = tiny_checkpoint(tmp_path / "vae.pt", DATASET="fashion")
    with pytest.raises(vh.CheckpointError, match="DATASET='fashion'.*DATASET='mnist'"):
        vh.load_trained_checkpoint(path, "mnist")
    assert vh.load_trained_checkpoint(path, "fashion")["config"]["DATASET"] == "fashion"


def test_an_unreadable_checkpoint_is_refused_without_running_its_code(tmp_path):
    path = tiny_checkpoint(tmp_path / "vae.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(vh.CheckpointError, match="truncated or corrupt"):
        vh.load_trained_checkpoint(path, "mnist")
    torch.save({"model": {}, "config": {}}, path)
    with pytest.raises(vh.CheckpointError, match="lacks some of"):
        vh.load_trained_checkpoint(path, "mnist")
    torch.save({"model": vh.Split}, path)  # a global: weights_only refuses it, so loading never runs a pickle's code
    with pytest.raises(vh.CheckpointError, match="truncated or corrupt"):
        vh.load_trained_checkpoint(path, "mnist")
