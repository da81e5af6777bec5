"""papermill, the one whole-notebook runner of these tests: `--help-notebook` sees every setting (fast); the committed
model explored by the walkthrough and evaluated by the companion, end to end, without training (slow)."""

import json
import shutil

import papermill as pm
import pytest

import vae_helpers as vh
from conftest import COMPANION, DEFAULTS, NOTEBOOK, QUICK_SETTINGS, REPO, data_root, execute_notebook

QUICK_COMPANION = {k: v for k, v in QUICK_SETTINGS.items() if k in DEFAULTS[COMPANION]}


@pytest.mark.parametrize("notebook", DEFAULTS, ids=["walkthrough", "companion"])
def test_papermill_lists_every_setting_with_its_default_and_help(notebook):
    inferred = pm.inspect_notebook(str(notebook))
    assert list(inferred) == list(DEFAULTS[notebook]) and set(inferred) <= set(vh.SETTINGS)
    for name, default in DEFAULTS[notebook].items():
        assert eval(inferred[name]["default"]) == default, name  # papermill reports the literal as written
        assert inferred[name]["help"], f"{name} has no comment for --help-notebook"


@pytest.mark.slow
@pytest.mark.notebook
def test_the_committed_model_explored_and_evaluated_end_to_end_without_training(tmp_path):
    """PRETRAINED = True on a copy of outputs/ (a folder name with a space): nothing trained; the companion agrees."""
    out = tmp_path / "my outputs"
    shutil.copytree(REPO / "outputs", out)
    data = {"OUT_DIR": str(out), "DATA_DIR": str(data_root())}
    executed = execute_notebook(NOTEBOOK, tmp_path / "walkthrough.ipynb", PRETRAINED=True, **data)
    printed = "\n".join(o.get("text", "") for cell in executed.cells for o in cell.get("outputs", []))
    assert "PRETRAINED: loaded" in printed and "epoch  1/" not in printed
    metrics, committed = (json.loads((folder / "metrics.json").read_text()) for folder in (out, REPO / "outputs"))
    assert metrics == committed | {"entropy_floor": pytest.approx(committed["entropy_floor"])}  # the floor: this CPU's
    execute_notebook(COMPANION, tmp_path / "companion.ipynb", **QUICK_COMPANION, **data)
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["checkpoint_config"] == metrics["config"]  # the committed model, as the companion read it
    assert evaluation["elbo_surgery"]["average_kl"] == pytest.approx(metrics["final_test_kl"], rel=1e-4)
    assert 0 < metrics["entropy_floor"] < metrics["final_test_recon"]
