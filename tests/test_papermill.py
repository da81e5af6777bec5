"""papermill as a way to run the notebook: its -p values take effect, bad ones are refused by name, and
`papermill --help-notebook` sees all thirteen settings of the parameters cell with their defaults.
"""

import json

import papermill as pm
import pytest

from conftest import NOTEBOOK, REPO, data_root

# The parameters cell's defaults, as a reader sees them (and as metrics.json of a default run records them).
DEFAULTS = {
    "EPOCHS": 20, "BATCH_SIZE": 128, "LATENT_DIM": 20, "LEARNING_RATE": 1e-3, "SEED": 1234, "DATA_DIR": "data",
    "OUT_DIR": ".", "TRAIN_SUBSET": 0, "DEVICE": "auto", "DATASET": "mnist", "BETA": 1.0, "BINARIZE": False,
    "RESUME": False,
}


@pytest.fixture
def papermill_env(monkeypatch):
    """No VAE_* settings from the test session (they would override -p); yields (monkeypatch, the data folder)."""
    import os

    data_dir = data_root()  # read before VAE_DATA_DIR goes: tests pass it with -p, and must never download
    for name in [name for name in os.environ if name.startswith("VAE_")]:
        monkeypatch.delenv(name)
    return monkeypatch, data_dir


def execute(output_path, **parameters):
    """Run the notebook through papermill's Python API in the repository's folder."""
    return pm.execute_notebook(str(NOTEBOOK), str(output_path), parameters=parameters, cwd=str(REPO),
                               kernel_name="python3", progress_bar=False)


def test_inspect_lists_all_thirteen_settings_with_their_defaults():
    inferred = pm.inspect_notebook(str(NOTEBOOK))
    assert list(inferred) == list(DEFAULTS)
    for name, default in DEFAULTS.items():
        assert eval(inferred[name]["default"]) == default, name  # papermill reports the literal as written
        assert inferred[name]["help"], f"{name} has no comment for --help-notebook"


@pytest.mark.notebook
def test_papermill_parameters_take_effect_and_environment_variables_win(papermill_env, tmp_path):
    monkeypatch, data_dir = papermill_env
    out_dir = tmp_path / "papermill out"
    monkeypatch.setenv("VAE_TRAIN_SUBSET", "1500")  # beats the -p value below
    execute(tmp_path / "executed.ipynb", EPOCHS=1, TRAIN_SUBSET=1000, BETA=0.5, OUT_DIR=str(out_dir),
            DATA_DIR=str(data_dir))
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["config"]["EPOCHS"] == 1 and metrics["config"]["BETA"] == 0.5
    assert metrics["config"]["OUT_DIR"] == str(out_dir)
    assert metrics["config"]["TRAIN_SUBSET"] == 1500  # VAE_TRAIN_SUBSET > -p TRAIN_SUBSET
    assert (out_dir / "samples.png").is_file() and not (REPO / "papermill out").exists()


@pytest.mark.notebook
@pytest.mark.parametrize(
    ("name", "value", "accepts"),
    [("EPOCHS", 0, "a whole number >= 1"), ("EPOCHS", "abc", "a whole number >= 1"),
     ("DEVICE", "tpu", "auto, cpu, cuda, cuda:N or mps")],
)
def test_bad_papermill_value_stops_in_the_settings_cell(papermill_env, tmp_path, name, value, accepts):
    out_dir = tmp_path / "out"
    with pytest.raises(pm.PapermillExecutionError) as error:
        execute(tmp_path / "executed.ipynb", OUT_DIR=str(out_dir), **{name: value})
    assert error.value.ename == "ConfigError"
    assert f"parameter {name}={value!r}" in error.value.evalue and accepts in error.value.evalue
    executed = json.loads((tmp_path / "executed.ipynb").read_text())
    failed = [cell for cell in executed["cells"] if cell["cell_type"] == "code"
              and any(output["output_type"] == "error" for output in cell["outputs"])]
    assert len(failed) == 1 and "read_config(" in "".join(failed[0]["source"])  # the settings cell, no later one
    assert not out_dir.exists()  # nothing was created or written
