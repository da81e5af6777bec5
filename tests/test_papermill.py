"""Whole runs of both notebooks through papermill, the one notebook runner of these tests: what only a whole run
shows. `papermill --help-notebook` sees every setting of the parameters cells (fast); one end-to-end run of the
walkthrough and then the companion into a scratch OUT_DIR writes a finished, evaluated run, and a second run of
the walkthrough with the same parameters gives the same numbers to the last bit (slow tier).
"""

import json

import make_commands
import papermill as pm
import pytest
from PIL import Image

import vae_helpers as vh
from conftest import COMPANION, DEFAULTS, NOTEBOOK, QUICK_SETTINGS, data_root, execute_notebook

QUICK_WALKTHROUGH, QUICK_COMPANION = ({k: v for k, v in QUICK_SETTINGS.items() if k in DEFAULTS[nb]} for nb in DEFAULTS)
LOOSE_BOUND = 300.0  # nats: one epoch on 2,000 images is far from the defaults' 101.5, but well below this
# The only entries of metrics.json that identical runs may differ in: times, and OUT_DIR (in "config").
NOT_RESULTS = ("train_seconds", "config", "history")


@pytest.mark.parametrize("notebook", DEFAULTS, ids=["walkthrough", "companion"])
def test_papermill_lists_every_setting_with_its_default_and_help(notebook):
    inferred = pm.inspect_notebook(str(notebook))
    assert list(inferred) == list(DEFAULTS[notebook]) and set(inferred) <= set(vh.SETTINGS)
    for name, default in DEFAULTS[notebook].items():
        assert eval(inferred[name]["default"]) == default, name  # papermill reports the literal as written
        assert inferred[name]["help"], f"{name} has no comment for --help-notebook"


def results_of(out_dir):
    """metrics.json without what identical runs may differ in, and its history without the seconds."""
    metrics = json.loads((out_dir / "metrics.json").read_text())
    history = [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in metrics["history"]]
    return {key: value for key, value in metrics.items() if key not in NOT_RESULTS} | {"history": history}


@pytest.mark.slow
@pytest.mark.notebook
def test_walkthrough_then_companion_end_to_end_and_a_second_run_is_identical(tmp_path):
    data = {"DATA_DIR": str(data_root())}
    runs = []
    for name in ("first", "second"):
        out_dir = tmp_path / f"{name} out"  # a space in the path, as on many laptops
        executed = execute_notebook(NOTEBOOK, tmp_path / f"{name}.ipynb", OUT_DIR=str(out_dir), **QUICK_WALKTHROUGH,
                                    **data)
        runs.append(out_dir)
    first, second = runs
    assert any("injected-parameters" in cell.metadata.get("tags", []) for cell in executed.cells)
    execute_notebook(COMPANION, tmp_path / "companion.ipynb", OUT_DIR=str(first), **QUICK_COMPANION, **data)

    metrics = make_commands.check_run(first, LOOSE_BOUND)  # metrics.json, evaluation.json, samples.png; the bound
    assert metrics["config"] == {**DEFAULTS[NOTEBOOK], **QUICK_WALKTHROUGH, **data, "OUT_DIR": str(first)}
    assert len(metrics["history"]) == 1
    with Image.open(first / "samples.png") as samples:
        assert samples.size == (242, 242)  # 8 x 8 digits of 28 pixels with 2-pixel gaps
    assert results_of(second) == results_of(first)  # every loss, to the last bit
    assert (second / "samples.png").read_bytes() == (first / "samples.png").read_bytes()
    assert not list(first.glob(".*.tmp"))

    evaluation = json.loads((first / "evaluation.json").read_text())
    state = vh.load_trained_checkpoint(first / "vae.pt", "mnist")
    assert evaluation["checkpoint_config"] == state["config"] and evaluation["config"]["OUT_DIR"] == str(first)
    iw = evaluation["importance_weighted"]
    assert (iw["K"], iw["test_images"], iw["by_K"]["K"]) == (50, 100, [1, 10, 50])
    assert iw["nll"] < iw["elbo_loss_same_images"] + 4 * iw["standard_error"]  # -L_K is below the negative ELBO
    assert len(evaluation["kl_per_dimension"]) == state["config"]["LATENT_DIM"]
    assert evaluation["elbo_surgery"]["average_kl"] == pytest.approx(metrics["final_test_kl"], rel=1e-4)
    assert 0 < metrics["entropy_floor"] < metrics["final_test_recon"]
