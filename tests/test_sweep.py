"""The sweep (tools/sweep.py): its cheap parts on made-up JSON files, then one slow run end to end with two
stand-in notebooks (a parameters cell and a cell writing metrics.json or evaluation.json). Everything is written
under tmp_path; nothing is downloaded.
"""

import json

import make_commands  # tools/, on the path through conftest
import nbformat
import pytest
import sweep

import vae_helpers as vh
from conftest import REPO

EVALUATION_SETTINGS = ("OUT_DIR", "DATA_DIR", "DATASET", "DEVICE", "IW_SAMPLES", "IW_TEST_IMAGES")  # the companion's


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """sweep.plan of the real notebooks and configurations: ({name: settings}, defaults)."""
    return sweep.plan(tmp_path_factory.mktemp("plan") / "out", "data")


def fake_run(folder, settings, rec=80.0, kl=20.0, nll=95.0, change=None):
    """Write metrics.json and evaluation.json as the notebooks would for `settings`; `change` edits them first."""
    training = {k: v for k, v in settings.items() if k not in ("IW_SAMPLES", "IW_TEST_IMAGES")}
    metrics = {"config": training, "history": [], "final_test_recon": rec, "final_test_kl": kl,
               "final_test_negative_elbo": rec + kl, "entropy_floor": 50.0, "train_seconds": 100.0}
    evaluation = {"config": {k: settings[k] for k in EVALUATION_SETTINGS}, "checkpoint_config": dict(training),
                  "importance_weighted": {"nll": nll, "K": settings["IW_SAMPLES"],
                                          "test_images": settings["IW_TEST_IMAGES"]},
                  "active_units": 12, "seconds": 40.0}
    if change:
        change(metrics, evaluation)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (("metrics.json", metrics), ("evaluation.json", evaluation)):
        (folder / name).write_text(json.dumps(data))
    return metrics, evaluation


def table_rows(summary):
    """summary.md's table as dicts keyed by its header."""
    lines = [line for line in summary.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return {row[header[0]]: row for row in (dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
                                            for line in lines[2:])}


# --------------------------------------------------------------------------- cheap parts


def test_configurations_are_valid_settings_of_the_real_notebooks(planned):
    wanted, defaults = planned
    assert list(wanted) == list(sweep.CONFIGURATIONS) and {"beta-1", "beta-0", "fashion"} <= set(wanted)
    for name, settings in wanted.items():
        changed = {k: v for k, v in settings.items() if k not in ("OUT_DIR", "RESUME") and v != defaults[k]}
        assert changed == sweep.CONFIGURATIONS[name], name
        assert settings["RESUME"] is True and settings["OUT_DIR"].endswith(f"out/{name}")
    assert wanted["beta-0"]["BETA"] == 0.0 and wanted["beta-1"]["BETA"] == defaults["BETA"] == 1.0


@pytest.mark.parametrize(("configurations", "message"), [
    ({"bad": {"BETA": -1}}, "bad: BETA = -1 is invalid"),
    ({"typo": {"LATENTDIM": 2}}, "typo: unknown setting.s. LATENTDIM"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, configurations, message):
    with pytest.raises(vh.ConfigError, match=message):
        sweep.run_sweep(tmp_path / "out", configurations=configurations)
    assert not (tmp_path / "out").exists()


def test_a_run_with_the_settings_asked_for_is_complete_wherever_it_was_made(tmp_path, planned):
    settings = planned[0]["beta-0.5"]
    elsewhere = {**settings, "OUT_DIR": "/elsewhere", "DATA_DIR": "/d", "DEVICE": "cuda", "RESUME": False}
    fake_run(tmp_path, elsewhere)
    assert sweep.is_complete(tmp_path, settings)


@pytest.mark.parametrize("change", [
    lambda m, e: m["config"].update(BETA=2.0),  # trained with other settings
    lambda m, e: e["config"].update(IW_SAMPLES=50),  # evaluated with other settings
    lambda m, e: e["checkpoint_config"].update(EPOCHS=5),  # evaluated an earlier checkpoint
    lambda m, e: e.pop("checkpoint_config"),
    lambda m, e: m.pop("config"),
])
def test_a_run_with_other_settings_is_not_complete(tmp_path, planned, change):
    settings = planned[0]["beta-0.5"]
    fake_run(tmp_path, settings, change=change)
    assert not sweep.is_complete(tmp_path, settings)


def test_a_missing_or_unreadable_file_is_not_complete(tmp_path, planned):
    settings = planned[0]["beta-0.5"]
    fake_run(tmp_path, settings)
    (tmp_path / "evaluation.json").write_text('{"config": {')
    assert not sweep.is_complete(tmp_path, settings)
    (tmp_path / "evaluation.json").unlink()
    assert not sweep.is_complete(tmp_path, settings) and not sweep.is_complete(tmp_path / "none", settings)


@pytest.fixture
def runs(tmp_path, planned):
    """Made-up finished runs of four configurations: {name: (metrics, evaluation)}."""
    numbers = {"beta-1": (80.5, 20.0, 95.2), "beta-0.5": (72.7, 28.6, 95.6), "binarized": (77.5, 20.6, 92.3),
               "fashion": (226.5, 13.1, 236.7)}
    return {name: fake_run(tmp_path / name, planned[0][name], *values) for name, values in numbers.items()}


def test_summary_has_a_row_per_run_with_its_changed_settings_and_numbers(runs, planned):
    rows = table_rows(sweep.summary_markdown(runs, planned[1]))
    assert list(rows) == ["beta-1", "beta-0.5", "binarized", "fashion"]
    assert rows["beta-1"] == {"configuration": "beta-1", "changed settings": "(defaults)", "rec": "80.5", "KL": "20.0",
                              "−ELBO": "100.5", "−L_K": "95.2", "active units": "12 of 20", "seconds": "140"}
    assert [rows[name]["changed settings"] for name in ("beta-0.5", "binarized", "fashion")] == [
        "BETA=0.5", "BINARIZE=True", "DATASET=fashion"]
    common = {name: (dict(m, config={**m["config"], "EPOCHS": 1}), e) for name, (m, e) in runs.items()}
    rows = table_rows(sweep.summary_markdown(common, planned[1]))
    assert rows["beta-0.5"]["changed settings"] == "EPOCHS=1, BETA=0.5"


def test_figure_has_one_labelled_point_per_grey_level_mnist_run(runs):
    figure = sweep.rate_distortion_figure(runs)
    ax = figure.axes[0]
    assert sorted(text.get_text() for text in ax.texts) == ["beta-0.5", "beta-1"]
    points = sorted(tuple(line.get_xydata()[0]) for line in ax.lines if line.get_marker() == "o")
    assert points == [(20.0, 80.5), (28.6, 72.7)]
    assert "KL" in ax.get_xlabel() and "log p(x|z)" in ax.get_ylabel()
    assert sweep.rate_distortion_figure({"fashion": runs["fashion"]}) is None


def test_publish_replaces_the_folder_with_the_summary_the_figure_and_each_runs_json_and_figures(tmp_path, runs):
    out = tmp_path
    (out / "summary.md").write_text("table")
    (out / "rate_distortion.png").write_bytes(b"\x89PNG")
    (out / "beta-1" / "vae.pt").write_bytes(b"checkpoint")  # not published
    (out / "beta-1" / "loss_curves.png").write_bytes(b"curves")  # nor is this figure
    (out / "beta-1" / "samples.png").write_bytes(b"samples")
    (out / "fashion" / "reconstructions.png").write_bytes(b"reconstructions")
    (tmp_path / "published").mkdir()
    (tmp_path / "published" / "beta-4.json").write_text("{}")  # an earlier publish: replaced as a whole
    with pytest.MonkeyPatch.context() as patch:  # a publish that fails half-way leaves the published folder as it was
        patch.setattr(sweep.shutil, "copyfile", lambda *_: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError):
            sweep.publish(out, ["beta-1", "fashion"], tmp_path / "published")
    assert [path.name for path in (tmp_path / "published").iterdir()] == ["beta-4.json"]
    sweep.publish(out, ["beta-1", "fashion"], tmp_path / "published")
    published = {path.name: path.read_bytes() for path in (tmp_path / "published").iterdir()}
    assert published == {"summary.md": b"table", "rate_distortion.png": b"\x89PNG",
                         "beta-1.json": (out / "beta-1" / "metrics.json").read_bytes(),
                         "beta-1.evaluation.json": (out / "beta-1" / "evaluation.json").read_bytes(),
                         "beta-1.samples.png": b"samples",
                         "fashion.json": (out / "fashion" / "metrics.json").read_bytes(),
                         "fashion.evaluation.json": (out / "fashion" / "evaluation.json").read_bytes(),
                         "fashion.reconstructions.png": b"reconstructions"}


@pytest.mark.skipif(not make_commands.DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_missing_from_data_dir_is_unpacked_into_the_sweeps_own_data_folder(tmp_path, planned):
    settings = {**planned[0]["fashion"], "DATA_DIR": str(tmp_path / "empty")}
    sweep.run_configuration(settings, (), tmp_path / "out" / "fashion")  # no notebooks: only the data
    assert vh.missing_files(tmp_path / "out" / "data", "fashion") == [] and not (tmp_path / "empty").exists()


@pytest.mark.parametrize("argv", [["--only", "nope"], ["--set", "BETA=-1"], ["--set", "BETA"]])
def test_command_line_refuses_bad_arguments(tmp_path, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2 and "error" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- end to end, with stand-ins

WALKTHROUGH = """\
import json, os, pathlib
assert LATENT_DIM != 7, "no such model"
rec, kl = 80 + 10 * BETA, 20 / (1 + BETA)
config = dict(EPOCHS=EPOCHS, LATENT_DIM=LATENT_DIM, BETA=BETA, BINARIZE=BINARIZE, DATASET=DATASET,
              DATA_DIR=DATA_DIR, OUT_DIR=OUT_DIR, RESUME=RESUME)
pathlib.Path(OUT_DIR, "metrics.json").write_text(json.dumps({
    "config": config, "final_test_recon": rec, "final_test_kl": kl, "final_test_negative_elbo": rec + kl,
    "train_seconds": 1.0, "cwd": os.getcwd()}))
pathlib.Path(OUT_DIR, "samples.png").write_bytes(b"samples")
"""
COMPANION = """\
import json, pathlib
out = pathlib.Path(OUT_DIR)
(out / "evaluation.json").write_text(json.dumps({
    "config": dict(OUT_DIR=OUT_DIR, DATA_DIR=DATA_DIR, DATASET=DATASET, IW_SAMPLES=IW_SAMPLES),
    "checkpoint_config": json.loads((out / "metrics.json").read_text())["config"],
    "importance_weighted": {"nll": 90.0, "K": IW_SAMPLES, "test_images": 100}, "active_units": 3, "seconds": 1.0}))
"""


def stand_in(path, parameters, code):
    """A notebook of a parameters cell (`parameters`) and `code`."""
    cells = [nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()),
                                       metadata={"tags": ["parameters"]}), nbformat.v4.new_code_cell(code)]
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}}), path)
    return str(path)


@pytest.mark.slow
def test_sweep_end_to_end_with_stand_in_notebooks(tmp_path, monkeypatch, capsys):
    walkthrough = {"EPOCHS": 20, "LATENT_DIM": 20, "BETA": 1.0, "BINARIZE": False, "DATASET": "mnist",
                   "DATA_DIR": "data", "OUT_DIR": ".", "RESUME": False}
    companion = {"OUT_DIR": ".", "DATA_DIR": "data", "DATASET": "mnist", "IW_SAMPLES": 1000}
    notebooks = [stand_in(tmp_path / "walkthrough.ipynb", walkthrough, WALKTHROUGH),
                 stand_in(tmp_path / "companion.ipynb", companion, COMPANION)]
    out, published = tmp_path / "out", tmp_path / "published"
    argv = ["--out", str(out), "--data-dir", str(tmp_path / "data"), "--notebooks", *notebooks]
    configurations = {"beta-1": {}, "beta-2": {"BETA": 2.0}}

    monkeypatch.setattr(sweep, "CONFIGURATIONS", {**configurations, "broken": {"LATENT_DIM": 7}})
    assert sweep.main([*argv, "--only", "beta-2,broken", "--publish", str(published)]) == 1
    printed = capsys.readouterr().out
    assert "broken: FAILED AssertionError: no such model" in printed and "not published" in printed
    assert not published.exists() and not (out / "beta-1").exists()
    assert list(table_rows((out / "summary.md").read_text())) == ["beta-2"]

    monkeypatch.setattr(sweep, "CONFIGURATIONS", configurations)
    done = (out / "beta-2" / "evaluation.json").stat().st_mtime_ns
    assert sweep.main([*argv, "--publish", str(published)]) == 0
    printed = capsys.readouterr().out
    assert "beta-2: skipped (done)" in printed and "beta-1: done in" in printed
    assert (out / "beta-2" / "evaluation.json").stat().st_mtime_ns == done
    for name in configurations:
        assert {p.name for p in (out / name).iterdir()} == {"metrics.json", "evaluation.json", "walkthrough.ipynb",
                                                             "companion.ipynb", "samples.png"}
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["cwd"] == str(REPO) and metrics["config"]["RESUME"]
    rows = table_rows((out / "summary.md").read_text())
    assert rows["beta-2"]["changed settings"] == "BETA=2" and rows["beta-2"]["rec"] == "100.0"
    assert {p.name for p in published.iterdir()} == {"summary.md", "rate_distortion.png", "beta-1.json",
                                                     "beta-1.evaluation.json", "beta-2.json", "beta-2.evaluation.json",
                                                     "beta-1.samples.png", "beta-2.samples.png"}
    assert (published / "beta-2.json").read_bytes() == (out / "beta-2" / "metrics.json").read_bytes()
    assert (published / "summary.md").read_bytes() == (out / "summary.md").read_bytes()

    (out / "beta-1" / "manifold.png").write_bytes(b"from a 2-D run")  # a figure the next run does not make
    assert sweep.main([*argv, "--only", "beta-1", "--set", "EPOCHS=3"]) == 0  # other settings: run again
    printed = capsys.readouterr().out
    assert not (out / "beta-1" / "manifold.png").exists()
    assert "beta-1: done in" in printed and "beta-2" not in printed
    assert table_rows((out / "summary.md").read_text())["beta-1"]["changed settings"] == "EPOCHS=3"
