"""The finished model, OUT_DIR/model.pt: what the companion and PRETRAINED load (vh.read_finished_model), refused
with what to do when it cannot be used; and the committed one, outputs/model.pt, tied to the committed numbers."""

import json

import pytest
import torch

import vae_helpers as vh
from conftest import NOTEBOOK, REPO, data_root

OUTPUTS = REPO / "outputs"


def tiny_model_file(path, **changes):
    """A model.pt with every entry the reader checks (the weights are not looked at)."""
    config = {"EPOCHS": 3, "LATENT_DIM": 20, "SEED": 1234, "DATASET": "mnist", "BETA": 1.0, **changes}
    torch.save({"model": {}, "config": config, "history": [{"test_recon": 1.0}] * 3, "device": "cpu",
                "versions": {"cpu": "a CPU"}}, path)
    return path


def test_a_model_that_is_missing_unreadable_or_of_another_data_set_is_refused_naming_the_fix(tmp_path):
    path = tiny_model_file(tmp_path / "fashion.pt", DATASET="fashion")
    with pytest.raises(vh.CheckpointError, match=r"other settings \(DATASET: 'fashion' -> 'mnist'\)\. Set them"):
        vh.read_finished_model(path, DATASET="mnist")
    assert vh.read_finished_model(path, DATASET="fashion")["config"]["DATASET"] == "fashion"
    with pytest.raises(vh.CheckpointError, match="Cannot read .*No such file.*Run the training cell.*outputs/ holds"):
        vh.read_finished_model(tmp_path / "model.pt")
    path = tiny_model_file(tmp_path / "model.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(vh.CheckpointError, match="truncated or corrupt"):
        vh.read_finished_model(path)
    torch.save({"model": {}, "config": {}}, path)
    with pytest.raises(vh.CheckpointError, match="lacks some of"):
        vh.read_finished_model(path)
    torch.save({"model": vh.Split}, path)  # a global: weights_only refuses it, so loading never runs a pickle's code
    with pytest.raises(vh.CheckpointError, match="truncated or corrupt"):
        vh.read_finished_model(path)


@pytest.mark.notebook
def test_the_committed_model_gives_the_committed_test_loss():
    """outputs/model.pt loads with weights_only=True; evaluate (seed 0, as in training) gives metrics.json's loss."""
    # to 1e-3 nats: another CPU may round the last bits of its sums differently
    finished = vh.read_finished_model(OUTPUTS / "model.pt", DATASET="mnist")
    metrics = json.loads((OUTPUTS / "metrics.json").read_text())
    assert finished["config"] == metrics["config"] and finished["history"] == metrics["history"]
    VAE, evaluate = vh.load_notebook_definitions(NOTEBOOK, names=("VAE", "evaluate"))
    model = VAE(finished["config"]["LATENT_DIM"])
    model.load_state_dict(finished["model"])
    test = vh.load_splits(data_root(), "mnist", "cpu", allow_download=False)[1]
    recon, kl = evaluate(model, test.images, finished["config"]["BATCH_SIZE"])
    assert recon + kl == pytest.approx(metrics["final_test_loss"], abs=1e-3)
