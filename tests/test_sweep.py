"""The sweep (tools/sweep.py): its bookkeeping with stand-ins for the two notebooks (fast), then one quick sweep
of the real ones (two configurations of 1 epoch on 2,000 images, each trained by the walkthrough and evaluated by
the companion, and one made to fail), shared by the tests that read its table, figure and JSON files, rerun it,
and drive the command line. Everything goes to tmp_path; nothing is downloaded.
"""

import gzip
import io
import json
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import nbformat
import pytest

from conftest import REPO, data_root, vh

sys.path.insert(0, str(REPO / "tools"))
import sweep  # noqa: E402

QUICK = {"EPOCHS": 1, "TRAIN_SUBSET": 2000, "IW_SAMPLES": 20, "IW_TEST_IMAGES": 20}
GOOD = {"beta-0.5": {"BETA": 0.5}, "beta-2": {"BETA": 2.0}}
BAD = {"bad-beta": {"BETA": -1}}  # refused by the walkthrough's settings cell
PNG = b"\x89PNG\r\n\x1a\n"
WALKTHROUGH_NAME, COMPANION_NAME = sweep.NOTEBOOK.name, sweep.COMPANION.name

# The stand-ins' parameters cells: the two notebooks' interfaces (their defaults), without the notebooks.
WALKTHROUGH_PARAMETERS = {"EPOCHS": 20, "BATCH_SIZE": 128, "LATENT_DIM": 20, "LEARNING_RATE": 1e-3, "SEED": 1234,
                          "DATA_DIR": "data", "OUT_DIR": ".", "TRAIN_SUBSET": 0, "DEVICE": "auto",
                          "DATASET": "mnist", "BETA": 1.0, "BINARIZE": False, "RESUME": False}
COMPANION_PARAMETERS = {"OUT_DIR": ".", "DATA_DIR": "data", "DATASET": "mnist", "DEVICE": "auto",
                        "IW_SAMPLES": 1000, "IW_TEST_IMAGES": 1000}


def table_rows(summary):
    """The rows of summary.md's table, as dicts keyed by the header's column names."""
    lines = [line for line in summary.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def stand_in_notebook(path, parameters):
    """A notebook whose only cell is a parameters cell defining `parameters` (what the sweep reads of it)."""
    source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source, metadata={"tags": ["parameters"]})],
                                        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                 "language": "python"}})
    nbformat.write(notebook, path)
    return path


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """(walkthrough, companion): stand-in notebooks with the real ones' names and parameters cells."""
    folder = tmp_path_factory.mktemp("notebooks")
    return (stand_in_notebook(folder / WALKTHROUGH_NAME, WALKTHROUGH_PARAMETERS),
            stand_in_notebook(folder / COMPANION_NAME, COMPANION_PARAMETERS))


def training_config(settings):
    """The walkthrough's recorded config for a run with `settings` on top of its defaults."""
    return sweep.normalized({**WALKTHROUGH_PARAMETERS, **{k: v for k, v in settings.items()
                                                         if k in WALKTHROUGH_PARAMETERS}})


def evaluation_config(settings):
    """The companion's recorded config for an evaluation with `settings` on top of its defaults."""
    return sweep.normalized({**COMPANION_PARAMETERS, **{k: v for k, v in settings.items()
                                                       if k in COMPANION_PARAMETERS}})


def made_up_metrics(settings, rec=90.0, kl=20.0, epochs_done=None):
    """A metrics.json as the walkthrough writes it, for a run with `settings` on top of its defaults."""
    config = training_config(settings)
    epochs = config["EPOCHS"] if epochs_done is None else epochs_done
    return {
        "config": config,
        "history": {key: [100.0] * epochs for key in ("train_recon", "train_kl", "test_recon", "test_kl")},
        "final_test_loss": rec + config["BETA"] * kl,
        "final_test_negative_elbo": rec + kl,
        "final_test_recon": rec,
        "final_test_kl": kl,
        "train_seconds": 118.6,
        "device": "cpu",
    }


def made_up_evaluation(settings, nll=100.0, burda=None, checkpoint=None):
    """An evaluation.json as the companion writes it, of a checkpoint trained with `settings` (or `checkpoint`)."""
    config = evaluation_config(settings)
    evaluation = {
        "config": config,
        "checkpoint_config": training_config(settings) if checkpoint is None else checkpoint,
        "test_loss_redraw_sd": 0.04,
        "importance_weighted": {"nll": nll, "elbo_loss_same_images": nll + 4.0, "K": config["IW_SAMPLES"],
                                "test_images": config["IW_TEST_IMAGES"]},
        "active_units": 11,
        "knn_accuracy": {"latent": 0.9647, "pca_2d": 0.3154, "untrained_encoder": 0.7683, "pixels": 0.9693, "k": 5},
        "seconds": 42.0,
        "device": "cpu",
    }
    if burda is not None:
        evaluation["active_units_burda"] = burda
    return evaluation


def write_json(folder, name, data):
    """Put `data` in folder/name."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))


def write_run(folder, settings, **metrics_options):
    """A finished, evaluated run with `settings` in `folder`: metrics.json, then evaluation.json."""
    write_json(folder, "metrics.json", made_up_metrics(settings, **metrics_options))
    write_json(folder, "evaluation.json", made_up_evaluation(settings))


# --------------------------------------------------------------------------- bookkeeping, no notebook


@pytest.fixture(scope="module")
def expected():
    """The normalized settings (walkthrough's, companion's) of a quick beta = 0.5 run, as the sweep compares them."""
    settings = {**QUICK, "BETA": 0.5}
    return training_config(settings), evaluation_config(settings)


def test_complete_metrics_and_evaluation_count_as_done(tmp_path, expected):
    write_run(tmp_path, {**QUICK, "BETA": 0.5, "OUT_DIR": "elsewhere", "DEVICE": "cuda", "DATA_DIR": "/d"})
    assert sweep.incomplete_reason(tmp_path, *expected) is None and sweep.is_complete(tmp_path, *expected)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda folder: (folder / "metrics.json").unlink(), "no metrics.json"),
        (lambda folder: (folder / "metrics.json").write_text('{"config": {"EPOCHS": 1}, "hist'), "unreadable"),
        (lambda folder: (folder / "metrics.json").write_bytes(b"\xff\xfe\x00garbage"), "unreadable"),
        (lambda folder: (folder / "metrics.json").write_text("[1, 2]"), "not a JSON object"),
        (lambda folder: write_json(folder, "metrics.json", {k: v for k, v in made_up_metrics({**QUICK}).items()
                                                            if k != "final_test_kl"}), "lacks ['final_test_kl']"),
        (lambda folder: write_json(folder, "metrics.json", made_up_metrics({**QUICK, "BETA": 2.0})),
         "BETA 2.0, wanted 0.5"),
        (lambda folder: write_json(folder, "metrics.json", made_up_metrics({**QUICK, "BETA": 0.5}, epochs_done=0)),
         "does not hold all 1 epochs"),
        (lambda folder: (folder / "evaluation.json").unlink(), "no evaluation.json"),
        (lambda folder: (folder / "evaluation.json").write_text('{"config": {'), "evaluation.json is unreadable"),
        (lambda folder: write_json(folder, "evaluation.json", {k: v for k, v in made_up_evaluation(QUICK).items()
                                                               if k != "importance_weighted"}),
         "evaluation.json lacks ['importance_weighted']"),
        (lambda folder: write_json(folder, "evaluation.json", made_up_evaluation({**QUICK, "BETA": 0.5,
                                                                                  "IW_SAMPLES": 50})),
         "evaluation made with other settings: IW_SAMPLES 50, wanted 20"),
        (lambda folder: write_json(folder, "evaluation.json", made_up_evaluation({**QUICK, "BETA": 2.0})),
         "evaluation of a checkpoint with other settings: BETA 2.0, wanted 0.5"),
        (lambda folder: os.utime(folder / "evaluation.json", ns=(0, 0)), "older than metrics.json"),
    ],
    ids=["missing", "truncated", "binary", "not-an-object", "missing-key", "other-beta", "no-epochs",
         "no-evaluation", "evaluation-truncated", "evaluation-missing-key", "other-K", "other-checkpoint",
         "evaluation-older"],
)
def test_incomplete_or_corrupt_results_are_not_done(tmp_path, expected, damage, reason):
    write_run(tmp_path, {**QUICK, "BETA": 0.5})
    damage(tmp_path)
    assert reason in sweep.incomplete_reason(tmp_path, *expected)
    assert not sweep.is_complete(tmp_path, *expected)


def test_command_line_values_and_configurations_are_parsed():
    assert sweep.parse_assignments("epochs=1, BINARIZE=True,DEVICE=cpu,BETA=-1,LEARNING_RATE=1e-3") == {
        "EPOCHS": 1, "BINARIZE": True, "DEVICE": "cpu", "BETA": -1, "LEARNING_RATE": 1e-3}
    assert sweep.parse_configuration("wide:LATENT_DIM=32,BETA=0.5") == ("wide", {"LATENT_DIM": 32, "BETA": 0.5})
    assert sweep.parse_configuration("plain:") == ("plain", {})
    for bad in ("no-colon", "x:BETA"):
        with pytest.raises(ValueError):
            sweep.parse_configuration(bad)


@pytest.mark.parametrize(
    ("configurations", "common", "message"),
    [({"a": {"OUT_DIR": "x"}}, {}, "OUT_DIR cannot be set"), ({"a": {}}, {"RESUME": True}, "RESUME cannot be set"),
     ({"a": {"BETTA": 1}}, {}, "unknown setting(s) ['BETTA']"), ({"../a": {}}, {}, "names a folder")],
)
def test_bad_configurations_are_refused_before_anything_runs(tmp_path, stand_ins, configurations, common, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sweep.run_sweep(configurations, tmp_path / "out", common, notebooks=stand_ins, stream=io.StringIO())
    assert not (tmp_path / "out").exists()


def test_a_setting_neither_notebook_has_is_refused(tmp_path, stand_ins):
    walkthrough = stand_in_notebook(tmp_path / "w.ipynb", {k: v for k, v in WALKTHROUGH_PARAMETERS.items()
                                                           if k != "SEED"})
    with pytest.raises(ValueError, match=re.escape("['SEED'] is a parameter of neither")):
        sweep.run_sweep({"a": {"SEED": 1}}, tmp_path / "out", notebooks=(walkthrough, stand_ins[1]),
                        stream=io.StringIO())


def test_kernel_environment_drops_every_vae_variable():
    env, removed = sweep.kernel_environment({"VAE_EPOCHS": "1", "VAE_DATA_DIR": "/d", "PATH": "/bin", "VAEX": "1"})
    assert env == {"PATH": "/bin", "VAEX": "1"} and removed == ["VAE_DATA_DIR", "VAE_EPOCHS"]


def test_settings_go_to_the_notebook_whose_parameters_cell_has_them():
    settings = {**WALKTHROUGH_PARAMETERS, **COMPANION_PARAMETERS, "BETA": 2.0, "IW_SAMPLES": 20}
    training, evaluation = sweep.split_parameters(settings, WALKTHROUGH_PARAMETERS, COMPANION_PARAMETERS)
    assert training["BETA"] == 2.0 and "IW_SAMPLES" not in training
    assert evaluation["IW_SAMPLES"] == 20 and "BETA" not in evaluation and "EPOCHS" not in evaluation
    assert {"OUT_DIR", "DATA_DIR", "DATASET", "DEVICE"} <= set(training) & set(evaluation)


@pytest.fixture
def stand_in(monkeypatch, stand_ins):
    """Replace the notebook runs by stand-ins that record their calls and write a finished run's JSON files.

    The walkthrough's fails for BETA = -1, the companion's for IW_SAMPLES = 13; the stand-in notebooks'
    parameters cells are the sweep's defaults (the command line uses them too).
    """
    calls = []
    walkthrough, companion = stand_ins

    def run_notebook(notebook, parameters, out_dir):
        calls.append(SimpleNamespace(name=out_dir.name, notebook=notebook.name, parameters=parameters,
                                     environ=dict(os.environ)))
        if notebook == walkthrough:
            if parameters.get("BETA") == -1:
                raise RuntimeError("boom\nsecond line")
            beta = parameters["BETA"]
            write_json(out_dir, "metrics.json", made_up_metrics({k: v for k, v in parameters.items() if k != "RESUME"},
                                                                rec=80.0 + beta, kl=20.0 / beta))
        else:
            assert notebook == companion
            if parameters.get("IW_SAMPLES") == 13:
                raise RuntimeError("no finished checkpoint")
            checkpoint = json.loads((out_dir / "metrics.json").read_text())["config"]
            write_json(out_dir, "evaluation.json", made_up_evaluation(parameters, checkpoint=checkpoint, burda=9))

    monkeypatch.setattr(sweep, "run_notebook", run_notebook)
    monkeypatch.setattr(sweep, "NOTEBOOK", walkthrough)
    monkeypatch.setattr(sweep, "COMPANION", companion)
    monkeypatch.setenv("VAE_EPOCHS", "7")  # must not reach the kernels
    monkeypatch.setenv("VAE_IW_SAMPLES", "7")  # neither
    monkeypatch.setenv("VAE_DEVICE", "cpu")  # honoured: passed on as the DEVICE parameter
    return calls


def test_sweep_runs_what_is_not_done_with_resume_and_goes_on_after_a_failure(tmp_path, stand_in):
    out = tmp_path / "out"
    configurations = {"done": {"BETA": 1.0}, "interrupted": {"BETA": 2.0}, "unevaluated": {"BETA": 0.5},
                      "fails": {"BETA": -1}, "evaluation-fails": {"BETA": 3.0, "IW_SAMPLES": 13}, "new": {"BETA": 4.0}}
    write_run(out / "done", {**QUICK, "BETA": 1.0})
    write_json(out / "interrupted", "metrics.json", made_up_metrics({**QUICK, "BETA": 2.0}, epochs_done=0))  # as if cut
    write_json(out / "interrupted", "evaluation.json", made_up_evaluation({**QUICK, "BETA": 2.0}))  # an earlier one
    (out / "interrupted" / "vae.pt").write_bytes(b"checkpoint")
    write_json(out / "unevaluated", "metrics.json", made_up_metrics({**QUICK, "BETA": 0.5}))
    stream = io.StringIO()
    result = sweep.run_sweep(configurations, out, QUICK, data_dir=tmp_path / "data", stream=stream)
    assert [(call.name, call.notebook) for call in stand_in] == [
        ("interrupted", WALKTHROUGH_NAME), ("interrupted", COMPANION_NAME),
        ("unevaluated", COMPANION_NAME),  # its training was done
        ("fails", WALKTHROUGH_NAME),  # no evaluation after a failed training
        ("evaluation-fails", WALKTHROUGH_NAME), ("evaluation-fails", COMPANION_NAME),
        ("new", WALKTHROUGH_NAME), ("new", COMPANION_NAME)]  # "done" is skipped
    for call in stand_in:
        parameters = call.parameters
        assert parameters["OUT_DIR"] == str(out / call.name) and parameters["DEVICE"] == "cpu"
        assert parameters["DATA_DIR"] == str(tmp_path / "data") and parameters["DATASET"] == "mnist"
        assert not [name for name in call.environ if name.startswith("VAE_")]
        if call.notebook == WALKTHROUGH_NAME:
            assert set(parameters) == set(WALKTHROUGH_PARAMETERS)
            assert parameters["RESUME"] is True and parameters["EPOCHS"] == 1
        else:
            assert set(parameters) == set(COMPANION_PARAMETERS)
            assert parameters["IW_SAMPLES"] == (13 if call.name == "evaluation-fails" else 20)
            assert parameters["IW_TEST_IMAGES"] == 20
    assert os.environ["VAE_EPOCHS"] == "7"  # restored afterwards
    lines = stream.getvalue().splitlines()
    assert re.match(r"note: ignoring .*VAE_EPOCHS, VAE_IW_SAMPLES.* in the notebook kernels", lines[0])
    assert "VAE_DEVICE" not in lines[0]
    assert lines[1].startswith("done ") and lines[1].endswith("skipped (done)")
    assert lines[2].startswith("interrupted ") and lines[2].endswith("(resumed)")
    assert lines[3].startswith("unevaluated ") and lines[3].endswith("(evaluation only: the training was done)")
    assert lines[4] == f"fails             FAILED {WALKTHROUGH_NAME}: RuntimeError: boom"
    assert lines[5] == f"evaluation-fails  FAILED {COMPANION_NAME}: RuntimeError: no finished checkpoint"
    assert lines[6].startswith("new ") and "active 11/20 (Burda 9)  k-NN 96.5%" in lines[6]
    assert not result.ok and result.failed == {"fails": f"{WALKTHROUGH_NAME}: RuntimeError: boom",
                                               "evaluation-fails": f"{COMPANION_NAME}: RuntimeError: no finished "
                                               "checkpoint"}
    assert list(result.metrics) == list(result.evaluations) == ["done", "interrupted", "unevaluated", "new"]
    assert result.evaluations["interrupted"]["test_loss_redraw_sd"] == 0.04
    assert result.evaluations["interrupted"]["checkpoint_config"]["EPOCHS"] == 1  # the new one, of this checkpoint
    summary = result.summary.read_text()
    assert [row["configuration"] for row in table_rows(summary)] == ["done", "interrupted", "unevaluated", "new"]
    assert f"- fails: {WALKTHROUGH_NAME}: RuntimeError: boom" in summary
    assert f"- evaluation-fails: {COMPANION_NAME}: RuntimeError: no finished checkpoint" in summary
    assert result.figure.read_bytes().startswith(PNG)


def fake_debian_fashion(folder):
    """Stand-ins for Debian's four gzipped Fashion-MNIST files (a few bytes each); returns {name: content}."""
    folder.mkdir(parents=True)
    contents = {name: f"fashion {name}".encode() for name in vh.DATASETS["fashion"][2]}
    for name, content in contents.items():
        (folder / f"{name}.gz").write_bytes(gzip.compress(content))
    return contents


def test_fashion_is_taken_from_debian_when_the_data_folder_lacks_it(tmp_path, stand_in):
    out, data, debian = tmp_path / "out", tmp_path / "data", tmp_path / "debian"
    contents = fake_debian_fashion(debian)
    configurations = {"plain": {}, "fashion": {"DATASET": "fashion"}}
    stream = io.StringIO()
    result = sweep.run_sweep(configurations, out, QUICK, data_dir=data, stream=stream, fashion_source=debian)
    assert result.ok and list(result.metrics) == ["plain", "fashion"]
    raw = out / "data" / "FashionMNIST" / "raw"
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == contents  # uncompressed, torchvision's layout
    assert f"note: unpacked Fashion-MNIST from {debian} into {raw}" in stream.getvalue()
    for call in stand_in:  # only the fashion configuration, and both its notebooks, get the unpacked copy
        assert call.parameters["DATA_DIR"] == str(out / "data" if call.name == "fashion" else data)
        assert call.parameters["DATASET"] == ("fashion" if call.name == "fashion" else "mnist")
    rows = {row["configuration"]: row for row in table_rows(result.summary.read_text())}
    assert rows["fashion"]["data"] == "Fashion-MNIST" and rows["fashion"]["settings"] == "DATASET=fashion"
    assert rows["plain"]["data"] == "MNIST"
    assert "Fashion-MNIST rows are trained and measured on another data set" in result.summary.read_text()
    before = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    stand_in.clear()
    (out / "fashion" / "evaluation.json").unlink()  # the companion runs again, on the copy already there
    result = sweep.run_sweep(configurations, out, QUICK, data_dir=data, stream=io.StringIO(), fashion_source=debian)
    assert result.ok and [(call.name, call.notebook) for call in stand_in] == [("fashion", COMPANION_NAME)]
    assert stand_in[0].parameters["DATA_DIR"] == str(out / "data")
    assert before == {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}  # not unpacked twice


def test_fashion_in_the_data_folder_is_used_as_it_is(tmp_path, stand_in):
    data = tmp_path / "data"
    raw = data / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in vh.DATASETS["fashion"][2]:
        (raw / name).write_bytes(b"x")
    result = sweep.run_sweep({"fashion": {"DATASET": "fashion"}}, tmp_path / "out", QUICK, data_dir=data,
                             stream=io.StringIO(), fashion_source=tmp_path / "no-debian")
    assert result.ok and {call.parameters["DATA_DIR"] for call in stand_in} == {str(data)}
    assert not (tmp_path / "out" / "data").exists()


def test_fashion_nowhere_fails_that_configuration_naming_the_package(tmp_path, stand_in):
    stream = io.StringIO()
    result = sweep.run_sweep({"fashion": {"DATASET": "fashion"}, "plain": {}}, tmp_path / "out", QUICK,
                             data_dir=tmp_path / "data", stream=stream, fashion_source=tmp_path / "no-debian")
    assert list(result.failed) == ["fashion"] and list(result.metrics) == ["plain"]  # the others still run
    message = result.failed["fashion"]
    assert message.startswith("DataNotFound: Fashion-MNIST is neither in ") and sweep.FASHION_PACKAGE in message
    assert "apt-get install dataset-fashion-mnist" in stream.getvalue()
    assert [call.name for call in stand_in] == ["plain", "plain"]  # no notebook ran for fashion


def test_command_line_publishes_only_a_complete_sweep(tmp_path, stand_in, capsys):
    out, published = tmp_path / "out", tmp_path / "results"
    args = ["--out", str(out), "--publish", str(published), "--set", "EPOCHS=1", "--set", "IW_SAMPLES=20",
            "--config", "a:BETA=0.5"]
    assert sweep.main([*args, "--config", "b:BETA=-1"]) == 1
    assert "not published" in capsys.readouterr().out and not published.exists()
    assert sweep.main(args) == 0
    assert sorted(p.name for p in published.iterdir()) == ["a.evaluation.json", "a.json", "rate_distortion.png",
                                                           "summary.md"]
    assert json.loads((published / "a.json").read_text()) == json.loads((out / "a" / "metrics.json").read_text())
    assert (json.loads((published / "a.evaluation.json").read_text())
            == json.loads((out / "a" / "evaluation.json").read_text()))
    assert "skipped (done)" in capsys.readouterr().out


def test_command_line_refuses_an_unknown_configuration_name(tmp_path, stand_in, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--out", str(tmp_path / "out"), "--only", "beta-3"])
    assert exit_info.value.code == 2 and "no such configuration" in capsys.readouterr().err


def test_summary_and_figure_of_the_full_list(tmp_path, stand_ins):
    defaults = {**COMPANION_PARAMETERS, **WALKTHROUGH_PARAMETERS}
    kls = {"beta-0.25": 30.0, "beta-0.5": 25.0, "beta-1": 19.7, "beta-2": 14.0, "beta-4": 9.0, "latent-2": 6.0}
    metrics = {name: made_up_metrics(settings, rec=100.0 - kls.get(name, 10.0) * 0.9, kl=kls.get(name, 10.0))
               for name, settings in sweep.CONFIGURATIONS.items()}
    evaluations = {name: made_up_evaluation(settings) for name, settings in sweep.CONFIGURATIONS.items()}
    evaluations["beta-1"]["active_units_burda"] = 10
    metrics["beta-1"]["final_test_negative_elbo"] = 42.0  # the walkthrough's own value wins when it is there
    del metrics["beta-2"]["final_test_negative_elbo"]
    del evaluations["beta-2"]["knn_accuracy"], evaluations["beta-2"]["seconds"]  # optional
    result = sweep.SweepResult(metrics=metrics, evaluations=evaluations, failed={}, skipped=[], not_run=[])
    summary = sweep.summary_markdown(result, sweep.CONFIGURATIONS, defaults, {})
    rows = {row["configuration"]: row for row in table_rows(summary)}
    assert list(rows) == list(sweep.CONFIGURATIONS)
    assert rows["beta-1"]["settings"] == "(defaults)" and rows["latent-2"]["settings"] == "LATENT_DIM=2"
    assert rows["beta-0.25"]["settings"] == "BETA=0.25" and rows["binarized"]["settings"] == "BINARIZE=True"
    assert rows["fashion"]["settings"] == "DATASET=fashion"
    assert [rows[name]["data"] for name in ("beta-1", "binarized", "fashion")] == [
        "MNIST", "MNIST, binarized", "Fashion-MNIST"]
    assert rows["beta-1"]["−ELBO (β = 1)"] == "42.0" and rows["beta-2"]["−ELBO (β = 1)"] == "101.4"
    assert rows["beta-1"]["−L_K"] == "100.0" and rows["beta-1"]["K"] == "1,000"
    assert rows["beta-1"]["active (Burda)"] == "10" and rows["beta-2"]["active (Burda)"] == "–"
    assert rows["beta-1"]["k-NN (z)"] == "96.5%" and rows["beta-1"]["k-NN (pixels)"] == "96.9%"
    assert rows["beta-2"]["k-NN (z)"] == "–" and rows["beta-2"]["evaluation time"] == "–"
    assert rows["beta-2"]["training time"] == "1 min 59 s" and rows["beta-1"]["evaluation time"] == "42 s"
    assert "binarized row is measured on binary images" in summary and "not comparable" in summary
    assert "Fashion-MNIST rows are trained and measured on another data set than MNIST" in summary
    assert "0.04 to 0.04 nats" in summary and "first 1,000 test images" in summary and "5 nearest" in summary
    beta_runs, others = sweep.rate_distortion_points(metrics, defaults)
    assert [p[0] for p in beta_runs] == ["beta-0.25", "beta-0.5", "beta-1", "beta-2", "beta-4"]
    assert [p[0] for p in others] == ["latent-2"]  # binarized and fashion are not drawn
    path = sweep.write_figure(metrics, defaults, tmp_path / "rate_distortion.png")
    assert path.read_bytes().startswith(PNG) and not list(tmp_path.glob(".*.tmp"))
    only_others = {name: metrics[name] for name in ("binarized", "fashion")}
    assert sweep.write_figure(only_others, defaults, path) is None and not path.exists()


@pytest.mark.skipif(not all((sweep.DEBIAN_FASHION / f"{name}.gz").is_file() for name in vh.DATASETS["fashion"][2]),
                    reason=f"Debian's Fashion-MNIST is not installed ({sweep.FASHION_PACKAGE})")
def test_debian_fashion_unpacks_to_the_files_the_notebooks_verify(tmp_path):
    found = sweep.fashion_data_dir(tmp_path / "empty", tmp_path / "out")
    assert found == tmp_path / "out" / "data"
    _, folder, files = vh.DATASETS["fashion"]
    vh.verify_files(found / folder / "raw", files)  # sizes and SHA-256, as load_dataset checks them


# --------------------------------------------------------------------------- the real notebooks


def test_built_in_configurations_are_parameters_of_the_real_notebooks():
    walkthrough, companion = sweep.notebook_defaults(sweep.NOTEBOOK), sweep.notebook_defaults(sweep.COMPANION)
    iw = {"IW_SAMPLES", "IW_TEST_IMAGES"}
    assert iw <= set(companion) and not iw & set(walkthrough)
    assert {"OUT_DIR", "DATA_DIR", "DATASET", "DEVICE"} <= set(walkthrough) & set(companion)
    for settings in [*sweep.CONFIGURATIONS.values(), QUICK]:
        assert set(settings) <= set(walkthrough) | set(companion)


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    """One quick sweep of the notebooks: two configurations and one that fails; VAE_BETA, VAE_LATENT_DIM and
    VAE_IW_SAMPLES set."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    stream = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("VAE_BETA", "4")  # would beat every -p BETA, and make bad-beta pass, if it got through
        monkeypatch.setenv("VAE_LATENT_DIM", "3")
        monkeypatch.setenv("VAE_IW_SAMPLES", "7")
        started = time.perf_counter()
        result = sweep.run_sweep({**GOOD, **BAD}, out, QUICK, data_dir=data_root(), stream=stream)
    seconds = time.perf_counter() - started
    return SimpleNamespace(out=out, result=result, output=stream.getvalue(), seconds=seconds,
                           summary=(out / "summary.md").read_text())  # later tests rewrite the file


@pytest.mark.notebook
def test_quick_sweep_writes_each_run_the_table_and_the_figure(quick_sweep):
    out = quick_sweep.out
    for name in GOOD:
        for file in (WALKTHROUGH_NAME, COMPANION_NAME, "metrics.json", "evaluation.json", "vae.pt", "samples.png",
                     "latent_space.png"):
            assert (out / name / file).stat().st_size > 0, (name, file)
    rows = table_rows(quick_sweep.summary)
    assert [row["configuration"] for row in rows] == list(GOOD)
    assert (out / "rate_distortion.png").read_bytes().startswith(PNG)
    assert not list(out.rglob(".*.tmp"))
    lines = quick_sweep.output.splitlines()
    assert "note: ignoring VAE_BETA, " in lines[0] and " VAE_LATENT_DIM, " in lines[0] and "VAE_IW_SAMPLES" in lines[0]
    for line, name in zip(lines[1:3], GOOD):
        assert re.fullmatch(rf"{re.escape(name)} +rec .* -ELBO .* -L_K .*\(K=20\)  active \d+/20 .*s", line)


@pytest.mark.notebook
def test_failing_configuration_is_reported_by_name_while_the_others_complete(quick_sweep):
    result = quick_sweep.result
    assert not result.ok and list(result.failed) == ["bad-beta"] and list(result.metrics) == list(GOOD)
    assert result.failed["bad-beta"].startswith(f"{WALKTHROUGH_NAME}: ConfigError: parameter BETA=-1")
    assert "\n" not in result.failed["bad-beta"]
    assert re.search(rf"^bad-beta +FAILED {WALKTHROUGH_NAME}: ConfigError: parameter BETA=-1", quick_sweep.output,
                     re.MULTILINE)
    assert f"- bad-beta: {WALKTHROUGH_NAME}: ConfigError: parameter BETA=-1" in quick_sweep.summary
    assert not (quick_sweep.out / "bad-beta" / COMPANION_NAME).exists()  # nothing to evaluate


@pytest.mark.notebook
def test_summary_numbers_are_those_of_the_runs(quick_sweep):
    for row in table_rows(quick_sweep.summary):
        folder = quick_sweep.out / row["configuration"]
        metrics = json.loads((folder / "metrics.json").read_text())
        evaluation = json.loads((folder / "evaluation.json").read_text())
        config, iw = metrics["config"], evaluation["importance_weighted"]
        assert config["BETA"] == GOOD[row["configuration"]]["BETA"] and config["LATENT_DIM"] == 20  # not VAE_*
        assert config["OUT_DIR"] == str(folder) and config["RESUME"] is True
        assert config["EPOCHS"] == 1 and config["TRAIN_SUBSET"] == 2000
        assert evaluation["config"]["OUT_DIR"] == str(folder)
        assert evaluation["config"]["IW_SAMPLES"] == 20 and evaluation["config"]["IW_TEST_IMAGES"] == 20
        assert evaluation["checkpoint_config"]["BETA"] == config["BETA"]
        rec, kl = metrics["final_test_recon"], metrics["final_test_kl"]
        assert float(row["rec"]) == pytest.approx(rec, abs=0.05)  # the table shows one decimal
        assert float(row["KL"]) == pytest.approx(kl, abs=0.05)
        assert float(row["−ELBO (β = 1)"]) == pytest.approx(rec + kl, abs=0.05)
        assert float(row["−L_K"]) == pytest.approx(iw["nll"], abs=0.05)
        assert int(row["K"].replace(",", "")) == iw["K"] == 20 and iw["test_images"] == 20
        assert int(row["active (KL)"]) == evaluation["active_units"]
        assert row["active (Burda)"] == str(evaluation.get("active_units_burda", "–"))
        assert row["k-NN (z)"] == f"{evaluation['knn_accuracy']['latent']:.1%}"
        assert row["settings"] == f"BETA={config['BETA']:g}" and row["data"] == "MNIST"


@pytest.mark.notebook
def test_rerun_skips_finished_configurations_in_seconds(quick_sweep):
    files = [quick_sweep.out / name / file for name in GOOD for file in ("metrics.json", "evaluation.json")]
    before = [path.stat().st_mtime_ns for path in files]
    stream = io.StringIO()
    started = time.perf_counter()
    result = sweep.run_sweep(GOOD, quick_sweep.out, QUICK, data_dir=data_root(), stream=stream)
    assert time.perf_counter() - started < 20  # no kernel started; a notebook run takes minutes
    assert result.ok and result.skipped == list(GOOD)
    assert [line.split()[0] for line in stream.getvalue().splitlines() if "skipped (done)" in line] == list(GOOD)
    assert before == [path.stat().st_mtime_ns for path in files]


@pytest.mark.notebook
def test_command_line_skips_done_runs_reports_a_failure_and_exits_non_zero(quick_sweep, tmp_path):
    out = tmp_path / "out"
    (out / "beta-0.5").mkdir(parents=True)
    for file in ("metrics.json", "evaluation.json"):  # in this order: an evaluation is never older than its metrics
        (out / "beta-0.5" / file).write_bytes((quick_sweep.out / "beta-0.5" / file).read_bytes())
    settings = [arg for key, value in QUICK.items() for arg in ("--set", f"{key}={value}")]
    completed = subprocess.run(
        [sys.executable, str(REPO / "tools" / "sweep.py"), "--out", str(out), "--data-dir", str(data_root()),
         *settings, "--config", "beta-0.5:BETA=0.5", "--config", "bad:BETA=-1"],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 1, completed.stderr
    assert re.search(r"^beta-0.5 .* skipped \(done\)$", completed.stdout, re.MULTILINE)
    assert re.search(rf"^bad +FAILED {WALKTHROUGH_NAME}: ConfigError: parameter BETA=-1", completed.stdout,
                     re.MULTILINE)
    assert [row["configuration"] for row in table_rows((out / "summary.md").read_text())] == ["beta-0.5"]
    assert "without encryption" not in completed.stderr  # the kernels' start-up chatter stays out

