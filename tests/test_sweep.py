"""The sweep (tools/sweep.py): its bookkeeping with a stand-in for the notebook (fast), then one quick sweep of
the real notebook (two configurations of 1 epoch on 2,000 images, and one made to fail), shared by the tests
that read its table, figure and metrics, rerun it, and drive the command line. Everything goes to tmp_path.
"""

import io
import json
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from conftest import REPO, data_root

sys.path.insert(0, str(REPO / "tools"))
import sweep  # noqa: E402

QUICK = {"EPOCHS": 1, "TRAIN_SUBSET": 2000, "IW_SAMPLES": 20, "IW_TEST_IMAGES": 20}
GOOD = {"beta-0.5": {"BETA": 0.5}, "beta-2": {"BETA": 2.0}}
BAD = {"bad-beta": {"BETA": -1}}  # refused by the notebook's settings cell
PNG = b"\x89PNG\r\n\x1a\n"


def table_rows(summary):
    """The rows of summary.md's table, as dicts keyed by the header's column names."""
    lines = [line for line in summary.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def made_up_metrics(settings, rec=90.0, kl=20.0, burda=None, epochs_done=None):
    """A metrics.json as the notebook writes it, for a run with `settings` on top of the notebook's defaults."""
    config = sweep.normalized({**sweep.notebook_defaults(), **settings})
    epochs = config["EPOCHS"] if epochs_done is None else epochs_done
    metrics = {
        "config": config,
        "history": {key: [100.0] * epochs for key in ("train_recon", "train_kl", "test_recon", "test_kl")},
        "final_test_loss": rec + config["BETA"] * kl,
        "final_test_recon": rec,
        "final_test_kl": kl,
        "importance_weighted": {"nll": rec + kl - 4.0, "elbo_loss_same_images": rec + kl, "K": config["IW_SAMPLES"],
                                "test_images": config["IW_TEST_IMAGES"]},
        "active_units": 11,
        "train_seconds": 118.6,
        "device": "cpu",
    }
    if burda is not None:
        metrics["active_units_burda"] = burda
    return metrics


def write_metrics(folder, metrics):
    """Put `metrics` in folder/metrics.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))


# --------------------------------------------------------------------------- bookkeeping, no notebook


@pytest.fixture(scope="module")
def expected():
    """The normalized settings of a quick beta = 0.5 run, as the completeness check compares them."""
    return sweep.normalized({**sweep.notebook_defaults(), **QUICK, "BETA": 0.5})


def test_complete_metrics_count_as_done(tmp_path, expected):
    write_metrics(tmp_path, made_up_metrics({**QUICK, "BETA": 0.5, "OUT_DIR": "elsewhere", "DEVICE": "cuda"}))
    assert sweep.incomplete_reason(tmp_path, expected) is None and sweep.is_complete(tmp_path, expected)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda folder: None, "no metrics.json"),
        (lambda folder: (folder / "metrics.json").write_text('{"config": {"EPOCHS": 1}, "hist'), "unreadable"),
        (lambda folder: (folder / "metrics.json").write_bytes(b"\xff\xfe\x00garbage"), "unreadable"),
        (lambda folder: (folder / "metrics.json").write_text("[1, 2]"), "not a JSON object"),
        (lambda folder: write_metrics(folder, {k: v for k, v in made_up_metrics({**QUICK, "BETA": 0.5}).items()
                                               if k != "importance_weighted"}), "lacks ['importance_weighted']"),
        (lambda folder: write_metrics(folder, made_up_metrics({**QUICK, "BETA": 2.0})), "BETA 2.0, wanted 0.5"),
        (lambda folder: write_metrics(folder, made_up_metrics({**QUICK, "BETA": 0.5, "IW_SAMPLES": 50})),
         "IW_SAMPLES 50, wanted 20"),
        (lambda folder: write_metrics(folder, made_up_metrics({**QUICK, "BETA": 0.5}, epochs_done=0)),
         "does not hold all 1 epochs"),
    ],
    ids=["missing", "truncated", "binary", "not-an-object", "missing-key", "other-beta", "other-K", "no-epochs"],
)
def test_incomplete_or_corrupt_metrics_are_not_done(tmp_path, expected, damage, reason):
    damage(tmp_path)
    assert reason in sweep.incomplete_reason(tmp_path, expected)
    assert not sweep.is_complete(tmp_path, expected)


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
def test_bad_configurations_are_refused_before_anything_runs(tmp_path, configurations, common, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sweep.run_sweep(configurations, tmp_path / "out", common, stream=io.StringIO())
    assert not (tmp_path / "out").exists()


def test_kernel_environment_drops_every_vae_variable():
    env, removed = sweep.kernel_environment({"VAE_EPOCHS": "1", "VAE_DATA_DIR": "/d", "PATH": "/bin", "VAEX": "1"})
    assert env == {"PATH": "/bin", "VAEX": "1"} and removed == ["VAE_DATA_DIR", "VAE_EPOCHS"]


@pytest.fixture
def stand_in(monkeypatch):
    """Replace the notebook run by a stand-in that records its calls and writes a finished run's metrics.json."""
    calls = []

    def run_configuration(name, parameters, out_dir, notebook=sweep.NOTEBOOK):
        calls.append(SimpleNamespace(name=name, parameters=parameters, environ=dict(os.environ)))
        if parameters.get("BETA") == -1:
            raise RuntimeError("boom\nsecond line")
        write_metrics(out_dir, made_up_metrics({k: v for k, v in parameters.items() if k != "RESUME"},
                                               rec=80.0 + parameters["BETA"], kl=20.0 / parameters["BETA"], burda=9))

    monkeypatch.setattr(sweep, "run_configuration", run_configuration)
    monkeypatch.setenv("VAE_EPOCHS", "7")  # must not reach the kernels
    monkeypatch.setenv("VAE_DEVICE", "cpu")  # honoured: passed on as the DEVICE parameter
    return calls


def test_sweep_runs_what_is_not_done_with_resume_and_goes_on_after_a_failure(tmp_path, stand_in):
    out = tmp_path / "out"
    configurations = {"done": {"BETA": 1.0}, "interrupted": {"BETA": 2.0}, "fails": {"BETA": -1}, "new": {"BETA": 4.0}}
    write_metrics(out / "done", made_up_metrics({**QUICK, "BETA": 1.0}))
    write_metrics(out / "interrupted", made_up_metrics({**QUICK, "BETA": 2.0}, epochs_done=0))  # stale, as if cut
    (out / "interrupted" / "vae.pt").write_bytes(b"checkpoint")
    stream = io.StringIO()
    result = sweep.run_sweep(configurations, out, QUICK, data_dir=tmp_path / "data", stream=stream)
    assert [call.name for call in stand_in] == ["interrupted", "fails", "new"]  # "done" is skipped
    for call in stand_in:
        assert call.parameters["RESUME"] is True and call.parameters["OUT_DIR"] == str(out / call.name)
        assert call.parameters["EPOCHS"] == 1 and call.parameters["DEVICE"] == "cpu"
        assert call.parameters["DATA_DIR"] == str(tmp_path / "data")
        assert not [name for name in call.environ if name.startswith("VAE_")]
    assert os.environ["VAE_EPOCHS"] == "7"  # restored afterwards
    lines = stream.getvalue().splitlines()
    assert re.match(r"note: ignoring .*VAE_EPOCHS.* in the notebook kernels", lines[0]) and "VAE_DEVICE" not in lines[0]
    assert lines[1].startswith("done ") and lines[1].endswith("skipped (done)")
    assert lines[2].startswith("interrupted ") and lines[2].endswith("(resumed)")
    assert lines[3] == "fails        FAILED RuntimeError: boom"
    assert lines[4].startswith("new ") and "active 11/20 (Burda 9)" in lines[4]
    assert not result.ok and result.failed == {"fails": "RuntimeError: boom"}
    assert list(result.metrics) == ["done", "interrupted", "new"]
    summary = result.summary.read_text()
    assert [row["configuration"] for row in table_rows(summary)] == ["done", "interrupted", "new"]
    assert "- fails: RuntimeError: boom" in summary
    assert result.figure.read_bytes().startswith(PNG)


def test_command_line_publishes_only_a_complete_sweep(tmp_path, stand_in, capsys):
    out, published = tmp_path / "out", tmp_path / "results"
    args = ["--out", str(out), "--publish", str(published), "--set", "EPOCHS=1", "--config", "a:BETA=0.5"]
    assert sweep.main([*args, "--config", "b:BETA=-1"]) == 1
    assert "not published" in capsys.readouterr().out and not published.exists()
    assert sweep.main(args) == 0
    assert sorted(p.name for p in published.iterdir()) == ["a.json", "rate_distortion.png", "summary.md"]
    assert json.loads((published / "a.json").read_text()) == json.loads((out / "a" / "metrics.json").read_text())
    assert "skipped (done)" in capsys.readouterr().out


def test_command_line_refuses_an_unknown_configuration_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--out", str(tmp_path / "out"), "--only", "beta-3"])
    assert exit_info.value.code == 2 and "no such configuration" in capsys.readouterr().err


def test_summary_and_figure_of_the_full_list(tmp_path):
    defaults = sweep.notebook_defaults()
    kls = {"beta-0.25": 30.0, "beta-0.5": 25.0, "beta-1": 19.7, "beta-2": 14.0, "beta-4": 9.0, "latent-2": 6.0}
    metrics = {name: made_up_metrics(settings, rec=100.0 - kls.get(name, 10.0) * 0.9, kl=kls.get(name, 10.0))
               for name, settings in sweep.CONFIGURATIONS.items()}
    metrics["beta-1"]["active_units_burda"] = 10
    metrics["beta-1"]["final_test_negative_elbo"] = 42.0  # the notebook's own value wins when it is there
    result = sweep.SweepResult(metrics=metrics, failed={}, skipped=[], not_run=[])
    summary = sweep.summary_markdown(result, sweep.CONFIGURATIONS, defaults, {})
    rows = {row["configuration"]: row for row in table_rows(summary)}
    assert list(rows) == list(sweep.CONFIGURATIONS)
    assert rows["beta-1"]["settings"] == "(defaults)" and rows["latent-2"]["settings"] == "LATENT_DIM=2"
    assert rows["beta-0.25"]["settings"] == "BETA=0.25" and rows["binarized"]["settings"] == "BINARIZE=True"
    assert rows["beta-1"]["−ELBO (β = 1)"] == "42.0" and rows["beta-2"]["−ELBO (β = 1)"] == "101.4"
    assert rows["beta-1"]["active (Burda)"] == "10" and rows["beta-2"]["active (Burda)"] == "–"
    assert rows["beta-2"]["K"] == "1,000" and rows["beta-2"]["training time"] == "1 min 59 s"
    assert "binarized row is measured on binary images" in summary and "not comparable" in summary
    beta_runs, others = sweep.rate_distortion_points(metrics, defaults)
    assert [p[0] for p in beta_runs] == ["beta-0.25", "beta-0.5", "beta-1", "beta-2", "beta-4"]
    assert [p[0] for p in others] == ["latent-2"]  # binarized is not drawn
    path = sweep.write_figure(metrics, defaults, tmp_path / "rate_distortion.png")
    assert path.read_bytes().startswith(PNG) and not list(tmp_path.glob(".*.tmp"))
    assert sweep.write_figure({"binarized": metrics["binarized"]}, defaults, path) is None and not path.exists()


# --------------------------------------------------------------------------- the real notebook


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    """One quick sweep of the notebook: two configurations and one that fails; VAE_BETA and VAE_LATENT_DIM set."""
    out = tmp_path_factory.mktemp("sweep") / "out"
    stream = io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("VAE_BETA", "4")  # would beat every -p BETA, and make bad-beta pass, if it got through
        monkeypatch.setenv("VAE_LATENT_DIM", "3")
        started = time.perf_counter()
        result = sweep.run_sweep({**GOOD, **BAD}, out, QUICK, data_dir=data_root(), stream=stream)
    seconds = time.perf_counter() - started
    return SimpleNamespace(out=out, result=result, output=stream.getvalue(), seconds=seconds,
                           summary=(out / "summary.md").read_text())  # later tests rewrite the file


@pytest.mark.notebook
def test_quick_sweep_writes_each_run_the_table_and_the_figure(quick_sweep):
    out = quick_sweep.out
    for name in GOOD:
        for file in ("executed.ipynb", "metrics.json", "vae.pt", "samples.png"):
            assert (out / name / file).stat().st_size > 0, (name, file)
    rows = table_rows(quick_sweep.summary)
    assert [row["configuration"] for row in rows] == list(GOOD)
    assert (out / "rate_distortion.png").read_bytes().startswith(PNG)
    assert not list(out.rglob(".*.tmp"))
    lines = quick_sweep.output.splitlines()
    assert "note: ignoring VAE_BETA, " in lines[0] and " VAE_LATENT_DIM, " in lines[0]
    for line, name in zip(lines[1:3], GOOD):
        assert re.fullmatch(rf"{re.escape(name)} +rec .* -ELBO .* -L_K .*\(K=20\)  active \d+/20 .*s", line)


@pytest.mark.notebook
def test_failing_configuration_is_reported_by_name_while_the_others_complete(quick_sweep):
    result = quick_sweep.result
    assert not result.ok and list(result.failed) == ["bad-beta"] and list(result.metrics) == list(GOOD)
    assert result.failed["bad-beta"].startswith("ConfigError: parameter BETA=-1")
    assert "\n" not in result.failed["bad-beta"]
    assert re.search(r"^bad-beta +FAILED ConfigError: parameter BETA=-1", quick_sweep.output, re.MULTILINE)
    assert "- bad-beta: ConfigError: parameter BETA=-1" in quick_sweep.summary


@pytest.mark.notebook
def test_summary_numbers_are_those_of_the_runs(quick_sweep):
    for row in table_rows(quick_sweep.summary):
        metrics = json.loads((quick_sweep.out / row["configuration"] / "metrics.json").read_text())
        config, iw = metrics["config"], metrics["importance_weighted"]
        assert config["BETA"] == GOOD[row["configuration"]]["BETA"] and config["LATENT_DIM"] == 20  # not VAE_*
        assert config["OUT_DIR"] == str(quick_sweep.out / row["configuration"]) and config["RESUME"] is True
        assert {key: config[key] for key in QUICK} == QUICK
        rec, kl = metrics["final_test_recon"], metrics["final_test_kl"]
        assert float(row["rec"]) == pytest.approx(rec, abs=0.05)  # the table shows one decimal
        assert float(row["KL"]) == pytest.approx(kl, abs=0.05)
        assert float(row["−ELBO (β = 1)"]) == pytest.approx(rec + kl, abs=0.05)
        assert float(row["−L_K"]) == pytest.approx(iw["nll"], abs=0.05)
        assert int(row["K"].replace(",", "")) == iw["K"] == 20 and iw["test_images"] == 20
        assert int(row["active (KL)"]) == metrics["active_units"]
        assert row["active (Burda)"] == str(metrics.get("active_units_burda", "–"))
        assert row["settings"] == f"BETA={config['BETA']:g}"


@pytest.mark.notebook
def test_rerun_skips_finished_configurations_in_seconds(quick_sweep):
    before = {name: (quick_sweep.out / name / "metrics.json").stat().st_mtime_ns for name in GOOD}
    stream = io.StringIO()
    started = time.perf_counter()
    result = sweep.run_sweep(GOOD, quick_sweep.out, QUICK, data_dir=data_root(), stream=stream)
    assert time.perf_counter() - started < 20  # no kernel started; a notebook run takes minutes
    assert result.ok and result.skipped == list(GOOD)
    assert [line.split()[0] for line in stream.getvalue().splitlines() if "skipped (done)" in line] == list(GOOD)
    assert before == {name: (quick_sweep.out / name / "metrics.json").stat().st_mtime_ns for name in GOOD}


@pytest.mark.notebook
def test_command_line_skips_done_runs_reports_a_failure_and_exits_non_zero(quick_sweep, tmp_path):
    out = tmp_path / "out"
    (out / "beta-0.5").mkdir(parents=True)
    (out / "beta-0.5" / "metrics.json").write_bytes((quick_sweep.out / "beta-0.5" / "metrics.json").read_bytes())
    settings = [arg for key, value in QUICK.items() for arg in ("--set", f"{key}={value}")]
    completed = subprocess.run(
        [sys.executable, str(REPO / "tools" / "sweep.py"), "--out", str(out), "--data-dir", str(data_root()),
         *settings, "--config", "beta-0.5:BETA=0.5", "--config", "bad:BETA=-1"],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 1, completed.stderr
    assert re.search(r"^beta-0.5 .* skipped \(done\)$", completed.stdout, re.MULTILINE)
    assert re.search(r"^bad +FAILED ConfigError: parameter BETA=-1", completed.stdout, re.MULTILINE)
    assert [row["configuration"] for row in table_rows((out / "summary.md").read_text())] == ["beta-0.5"]
    assert "without encryption" not in completed.stderr  # the kernels' start-up chatter stays out
