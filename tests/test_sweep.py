"""The sweep (tools/sweep.py): its parts on made-up JSON files, then, slow, end to end with two stand-in notebooks,
several seeds and two runs at a time. Everything is written under tmp_path; nothing is downloaded."""

import json
import re

import make_commands  # tools/, on the path through conftest
import nbformat
import numpy as np
import pytest
import sweep

import vae_helpers as vh
from conftest import REPO, require

EVALUATION_SETTINGS = ("OUT_DIR", "DATA_DIR", "DATASET", "DEVICE", "IW_SAMPLES", "IW_TEST_IMAGES")  # the companion's


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """sweep.plan of the real notebooks and configurations: ({(name, seed): settings}, defaults)."""
    return sweep.plan(tmp_path_factory.mktemp("plan") / "out", "data")


def fake_run(folder, settings, rec=80.0, kl=20.0, nll=95.0, change=None):
    """Write metrics.json and evaluation.json as the notebooks would for `settings`; `change` edits them first."""
    training = {k: v for k, v in settings.items() if k not in ("IW_SAMPLES", "IW_TEST_IMAGES")}
    metrics = {"config": training, "history": [], "final_test_recon": rec, "final_test_kl": kl,
               "final_test_negative_elbo": rec + kl, "entropy_floor": 50.0, "train_seconds": 100.0}
    evaluation = {"config": {k: settings[k] for k in EVALUATION_SETTINGS}, "checkpoint_config": dict(training),
                  "importance_weighted": {"nll": nll, "K": settings["IW_SAMPLES"],
                                          "test_images": settings["IW_TEST_IMAGES"]},
                  "active_units": 12, "active_units_burda": 15, "seconds": 40.0}
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


def test_configurations_and_their_seeds_are_valid_settings_of_the_real_notebooks(planned):
    wanted, defaults = planned
    names = [name for name, _ in wanted]
    assert list(dict.fromkeys(names)) == list(sweep.CONFIGURATIONS)
    for name in sweep.CONFIGURATIONS:
        seeds = [seed for other, seed in wanted if other == name]
        assert seeds == sweep.seeds(defaults["SEED"], sweep.MORE_SEEDS.get(name, sweep.SEEDS)) and len(set(seeds)) >= 3
        assert seeds[0] == defaults["SEED"]  # the committed run is one of them
    for (name, seed), settings in wanted.items():
        changed = {k: v for k, v in settings.items() if k not in ("OUT_DIR", "RESUME", "SEED") and v != defaults[k]}
        assert changed == sweep.CONFIGURATIONS[name] and settings["SEED"] == seed, name
        assert settings["RESUME"] is True and settings["OUT_DIR"].endswith(f"out/{name}/seed-{seed}")
    assert len(sweep.plan(REPO / "build" / "unused", most=1)[0]) == len(sweep.CONFIGURATIONS)  # --seeds 1


@pytest.mark.parametrize(("configurations", "message"), [
    ({"bad": {"BETA": -1}}, "bad: BETA = -1 is invalid"),
    ({"typo": {"LATENTDIM": 2}}, "typo: unknown setting.s. LATENTDIM")])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, configurations, message):
    with pytest.raises(vh.ConfigError, match=message):
        sweep.run_sweep(tmp_path / "out", configurations=configurations)
    assert not (tmp_path / "out").exists()


def test_a_run_is_complete_wherever_it_was_made_but_not_with_a_file_unreadable_or_gone(tmp_path, planned):
    settings = planned[0]["beta-0.5", 1234]
    elsewhere = {**settings, "OUT_DIR": "/elsewhere", "DATA_DIR": "/d", "DEVICE": "cuda", "RESUME": False}
    fake_run(tmp_path, elsewhere)
    assert sweep.is_complete(tmp_path, settings)
    (tmp_path / "evaluation.json").write_text('{"config": {')
    assert not sweep.is_complete(tmp_path, settings)
    (tmp_path / "evaluation.json").unlink()
    assert not sweep.is_complete(tmp_path, settings) and not sweep.is_complete(tmp_path / "none", settings)


@pytest.mark.parametrize("change", [
    lambda m, e: m["config"].update(BETA=2.0),  # trained with other settings
    lambda m, e: m["config"].update(SEED=5),  # another seed
    lambda m, e: e["config"].update(IW_SAMPLES=50),  # evaluated with other settings
    lambda m, e: e["checkpoint_config"].update(EPOCHS=5),  # evaluated an earlier model
    lambda m, e: e.pop("checkpoint_config"), lambda m, e: m.pop("config")])  # no record of the settings
def test_a_run_with_other_settings_is_not_complete(tmp_path, planned, change):
    settings = planned[0]["beta-0.5", 1234]
    fake_run(tmp_path, settings, change=change)
    assert not sweep.is_complete(tmp_path, settings)


@pytest.fixture
def runs(tmp_path, planned):
    """Made-up finished runs: three seeds of beta-1, one of beta-0.5, binarized and fashion."""
    numbers = {("beta-1", 0): (80.5, 20.0, 95.2), ("beta-1", 1): (81.25, 19.5, 95.6), ("beta-1", 2): (79.0, 21.0, 94.9),
               ("beta-0.5", 0): (72.7, 28.6, 95.6), ("binarized", 0): (77.5, 20.6, 92.3),
               ("fashion", 0): (226.5, 13.1, 236.7)}
    made = {}
    for (name, index), values in numbers.items():
        seed = [seed for other, seed in planned[0] if other == name][index]
        made[name, seed] = fake_run(tmp_path / name / f"seed-{seed}", planned[0][name, seed], *values)
    return made


def test_summary_gives_each_configuration_the_mean_sd_and_range_over_its_seeds(runs, planned):
    rows = table_rows(sweep.summary_markdown(runs, planned[1]))
    assert list(rows) == ["beta-1", "beta-0.5", "binarized", "fashion"]
    recs = np.array([80.5, 81.25, 79.0])  # numpy's arithmetic, the oracle: the sample standard deviation (ddof=1)
    assert rows["beta-1"]["seeds"] == "3" and rows["beta-1"]["changed settings"] == "(defaults)"
    for column, values in (("rec", recs), ("−ELBO", recs + np.array([20.0, 19.5, 21.0]))):
        spread = f"{values.mean():.1f} ± {values.std(ddof=1):.2f} ({values.min():.1f} to {values.max():.1f})"
        assert rows["beta-1"][column] == spread
    assert rows["beta-0.5"]["rec"] == "72.7" and rows["beta-0.5"]["seeds"] == "1"  # one seed: no spread to show
    assert [rows[name]["changed settings"] for name in ("beta-0.5", "binarized", "fashion")] == [
        "BETA=0.5", "BINARIZE=True", "DATASET=fashion"]
    seeds = re.search(r"\*\*Seeds\.\*\* .*?: ([\d, ]+)\.", sweep.summary_markdown(runs, planned[1]))[1]
    assert seeds.split(", ")[0] == "1234" and len(seeds.split(", ")) == 3


def test_figure_has_a_point_for_every_seed_of_each_grey_level_mnist_run(runs):
    ax = sweep.rate_distortion_figure(runs).axes[0]
    points = {line.get_label(): sorted(map(tuple, line.get_xydata())) for line in ax.lines if line.get_marker() == "o"}
    assert points == {"beta-1 (3 seeds)": [(19.5, 81.25), (20.0, 80.5), (21.0, 79.0)],
                      "beta-0.5 (1 seed)": [(28.6, 72.7)]}
    assert sweep.rate_distortion_figure({key: runs[key] for key in runs if key[0] == "fashion"}) is None


def test_publish_replaces_the_folder_with_each_runs_json_and_the_first_seeds_figures(tmp_path, runs):
    out, keys = tmp_path, [key for key in runs if key[0] in ("beta-1", "fashion")]
    first = {"beta-1": keys[0][1], "fashion": keys[-1][1]}
    (out / "summary.md").write_text("table")
    (out / "beta-1" / f"seed-{first['beta-1']}" / "vae.pt").write_bytes(b"checkpoint")  # not published
    (out / "beta-1" / f"seed-{first['beta-1']}" / "samples.png").write_bytes(b"samples")
    (out / "beta-1" / f"seed-{keys[1][1]}" / "samples.png").write_bytes(b"another seed's")  # not published
    (tmp_path / "published").mkdir()
    (tmp_path / "published" / "beta-4.json").write_text("{}")  # an earlier publish: replaced as a whole
    (tmp_path / "published").rename(tmp_path / ".published.old")  # and a publish stopped between its two renames
    with pytest.MonkeyPatch.context() as patch:  # a publish that fails half-way leaves the published folder as it was
        patch.setattr(sweep.shutil, "copyfile", lambda *_: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError):
            sweep.publish(out, keys, tmp_path / "published", first)
    assert [path.name for path in (tmp_path / "published").iterdir()] == ["beta-4.json"]
    sweep.publish(out, keys, tmp_path / "published", first)
    published = {str(path.relative_to(tmp_path / "published")): path.read_bytes()
                 for path in (tmp_path / "published").rglob("*") if path.is_file()}
    expected = {"summary.md": b"table", "beta-1/samples.png": b"samples"}
    for name, seed in keys:
        for file in vh.RUN_FILES:
            expected[f"{name}/seed-{seed}/{file}"] = (out / name / f"seed-{seed}" / file).read_bytes()
    assert published == expected


def test_fashion_missing_from_data_dir_is_unpacked_into_the_sweeps_own_data_folder(tmp_path, planned):
    require("Debian's dataset-fashion-mnist is not installed", make_commands.DEBIAN_FASHION.is_dir())
    settings = sweep.local_fashion({**planned[0]["fashion", 1234], "DATA_DIR": str(tmp_path / "empty")}, tmp_path)
    assert vh.missing_files(tmp_path / "data", "fashion") == [] and not (tmp_path / "empty").exists()
    assert settings["DATA_DIR"] == str(tmp_path / "data")


@pytest.mark.parametrize("argv", [["--only", "nope"], ["--set", "BETA=-1"], ["--set", "BETA"], ["--jobs", "0"]])
def test_command_line_refuses_bad_arguments(tmp_path, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2 and "error" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# The stand-in notebooks' code: the walkthrough's writes metrics.json and samples.png, the companion's evaluation.json.
WALKTHROUGH = """\
import json, os, pathlib
assert LATENT_DIM != 7, "no such model"
rec, kl = 80 + 10 * BETA + SEED % 7, 20 / (1 + BETA)
config = dict(EPOCHS=EPOCHS, LATENT_DIM=LATENT_DIM, BETA=BETA, BINARIZE=BINARIZE, DATASET=DATASET, SEED=SEED,
              DATA_DIR=DATA_DIR, OUT_DIR=OUT_DIR, RESUME=RESUME)
pathlib.Path(OUT_DIR, "metrics.json").write_text(json.dumps({
    "config": config, "final_test_recon": rec, "final_test_kl": kl, "final_test_negative_elbo": rec + kl,
    "train_seconds": 1.0, "cwd": os.getcwd(), "threads": os.environ.get("OMP_NUM_THREADS")}))
pathlib.Path(OUT_DIR, "samples.png").write_bytes(f"samples of seed {SEED}".encode())
"""
COMPANION = """\
import json, pathlib
out = pathlib.Path(OUT_DIR)
(out / "evaluation.json").write_text(json.dumps({
    "config": dict(OUT_DIR=OUT_DIR, DATA_DIR=DATA_DIR, DATASET=DATASET, IW_SAMPLES=IW_SAMPLES),
    "checkpoint_config": json.loads((out / "metrics.json").read_text())["config"],
    "importance_weighted": {"nll": 90.0, "K": IW_SAMPLES, "test_images": 100}, "active_units": 3,
    "active_units_burda": 3, "seconds": 1.0}))
"""


def stand_in(path, parameters, code):
    """A notebook of a parameters cell (`parameters`) and `code`."""
    cells = [nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()),
                                       metadata={"tags": ["parameters"]}), nbformat.v4.new_code_cell(code)]
    nbformat.write(nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}}), path)
    return str(path)


@pytest.mark.slow
def test_sweep_end_to_end_with_stand_in_notebooks_several_seeds_and_two_jobs(tmp_path, monkeypatch, capsys):
    walkthrough = {"EPOCHS": 20, "LATENT_DIM": 20, "SEED": 1234, "BETA": 1.0, "BINARIZE": False, "DATASET": "mnist",
                   "DATA_DIR": "data", "OUT_DIR": ".", "RESUME": False}
    companion = {"OUT_DIR": ".", "DATA_DIR": "data", "DATASET": "mnist", "IW_SAMPLES": 1000}
    notebooks = [stand_in(tmp_path / "walkthrough.ipynb", walkthrough, WALKTHROUGH),
                 stand_in(tmp_path / "companion.ipynb", companion, COMPANION)]
    out, published = tmp_path / "out", tmp_path / "published"
    argv = ["--out", str(out), "--data-dir", str(tmp_path / "data"), "--notebooks", *notebooks]
    monkeypatch.setattr(sweep, "SEEDS", 2)
    monkeypatch.setattr(sweep, "MORE_SEEDS", {"beta-1": 3})
    seeds = sweep.seeds(1234, 3)
    monkeypatch.setattr(sweep, "CONFIGURATIONS", {"beta-1": {}, "beta-2": {"BETA": 2.0}, "broken": {"LATENT_DIM": 7}})
    first_seeds = ["--only", "beta-2,broken", "--seeds", "1", "--jobs", "2"]
    assert sweep.main([*argv, *first_seeds, "--publish", str(published)]) == 1
    printed = capsys.readouterr().out
    assert "broken/seed-1234: FAILED AssertionError: no such model" in printed and "not published" in printed
    assert not published.exists() and not (out / "beta-1").exists()
    threads = json.loads((out / "beta-2" / "seed-1234" / "metrics.json").read_text())["threads"]
    assert threads == str(max(1, len(vh.FairThreads().cpus) // 2))  # two runs side by side share the cores
    assert sweep.main([*argv, "--only", f"beta-1/seed-{seeds[1]}"]) == 0  # one run alone, as a job array would
    assert sorted(p.name for p in (out / "beta-1").iterdir()) == [f"seed-{seeds[1]}"]
    capsys.readouterr()

    monkeypatch.setattr(sweep, "CONFIGURATIONS", {"beta-1": {}, "beta-2": {"BETA": 2.0}})
    assert sweep.main([*argv, "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == [f"beta-1/seed-{seeds[0]}", f"beta-1/seed-{seeds[2]}", f"beta-2/seed-{seeds[1]}"]
    done = (out / "beta-2" / "seed-1234" / "evaluation.json").stat().st_mtime_ns
    assert sweep.main([*argv, "--publish", str(published)]) == 0  # the rest, then published
    assert "3 runs to do" in capsys.readouterr().out  # the finished ones are not redone
    assert (out / "beta-2" / "seed-1234" / "evaluation.json").stat().st_mtime_ns == done
    metrics = json.loads((out / "beta-1" / f"seed-{seeds[2]}" / "metrics.json").read_text())
    assert metrics["cwd"] == str(REPO) and metrics["config"]["RESUME"] and metrics["config"]["SEED"] == seeds[2]
    summary = (out / "summary.md").read_text()
    assert table_rows(summary)["beta-1"]["seeds"] == "3" and "took" in summary
    assert (published / "beta-1" / "samples.png").read_bytes() == b"samples of seed 1234"

    assert sweep.main(argv) == 0 and "0 runs to do" in capsys.readouterr().out  # run again: redoes nothing
