"""The committed notebooks and results: each notebook reads as one finished, in-order run at the defaults, with
nothing of the machine that ran it, and the walkthrough stays short, each section ending with its takeaway."""

import ast
import json
import re
import statistics
import subprocess

import pytest
import sweep  # tools/sweep.py, on the path through conftest
from PIL import Image

import vae_helpers as vh
from conftest import COMPANION, NOTEBOOK, REPO, losses

MAX_TEST_LOSS = float(re.search(r"^MAX_TEST_LOSS \?= ([\d.]+)$", (REPO / "Makefile").read_text(), re.M)[1])
OUTPUTS = REPO / "outputs"  # the committed run's OUT_DIR
EPOCH_LINE = re.compile(r"^epoch +(\d+)/(\d+)  train loss +[\d.]+  test loss +([\d.]+) ", re.MULTILINE)


def load(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module", params=[NOTEBOOK, COMPANION], ids=["walkthrough", "companion"])
def notebook(request):
    return load(request.param)


def code_cells(notebook):
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def text_of(cell):
    """All text a cell printed or returned."""
    parts = ["".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", "")) for o in cell["outputs"]]
    return "\n".join(part for part in parts if part)


def test_every_code_cell_ran_once_in_order_without_an_error_after_one_tagged_parameters_cell(notebook):
    cells = code_cells(notebook)
    assert [cell["execution_count"] for cell in cells] == list(range(1, len(cells) + 1))
    assert not [cell for cell in cells if any(o["output_type"] == "error" for o in cell["outputs"])]
    assert [i for i, cell in enumerate(cells) if "parameters" in cell["metadata"].get("tags", [])] == [0]


def test_no_widget_state_timing_metadata_or_nbval_comment(notebook):
    """nbval reads its cell tags (nbval-check-output); learners never read past a comment meant for the tests."""
    assert "widgets" not in notebook["metadata"]  # the sliders' view stays; without its state it shows as text
    for cell in notebook["cells"]:
        assert set(cell["metadata"]) <= {"tags"}, cell["metadata"]  # no execution, ExecuteTime, collapsed...
    assert not [c for c in code_cells(notebook) if re.search(r"#\s*NBVAL", "".join(c["source"]))]


def test_a_static_copy_shows_the_sliders_picture_not_a_widget_repr():
    """GitHub, nbviewer and nbconvert have no kernel: they show the slider cell's image and a line, no Python repr."""
    from nbconvert import HTMLExporter

    html, _ = HTMLExporter().from_filename(str(NOTEBOOK))
    assert not re.search(r"(HBox|VBox|FloatSlider)\(", html)
    assert "The sliders move in Jupyter, with a running kernel" in html and "data:image/png;base64," in html


def test_no_path_of_the_machine_that_ran_it(notebook):
    """Readers elsewhere should see nothing machine-specific: OUT_DIR and DATA_DIR as given, not resolved."""
    absolute = re.compile(r"""(?:^|[\s'"(=\[])(/(?:home|root|work|tmp|Users|var|srv|mnt|opt|data)\b[^\s'",)]*)""")
    texts = {"the outputs": json.dumps([cell.get("outputs", []) for cell in notebook["cells"]])}
    texts |= {name: (OUTPUTS / name).read_text() for name in ("metrics.json", "evaluation.json")}
    for name, text in texts.items():
        assert str(REPO) not in text and not absolute.findall(text), f"{name}: {absolute.findall(text)[:3]}"


def test_every_numbered_section_ends_with_its_takeaway(notebook):
    markdown = "\n\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "markdown")
    sections = re.split(r"^(?=## )", markdown, flags=re.MULTILINE)
    numbered = [section for section in sections if re.match(r"## \d+\.", section)]
    assert numbered
    for section in numbered:
        last = re.split(r"\n\s*\n", section.strip())[-1]
        assert last.startswith("**Takeaway"), f"{section.splitlines()[0]!r} ends with {last[:100]!r}"


def test_the_walkthrough_is_at_most_3000_words_of_markdown():
    markdown = [cell for cell in load(NOTEBOOK)["cells"] if cell["cell_type"] == "markdown"]
    assert sum(len("".join(cell["source"]).split()) for cell in markdown) <= 3000


def test_the_committed_walkthrough_ran_at_the_defaults_every_epoch_within_the_bound():
    cells, namespace, metrics = code_cells(load(NOTEBOOK)), {}, load(OUTPUTS / "metrics.json")
    for cell in cells[:2]:  # the parameters cell and the cell that checks them
        exec("".join(cell["source"]), namespace)
    settings = namespace["vh"].check_settings(namespace)
    assert text_of(cells[0]) == "" and ast.literal_eval(text_of(cells[1])) == settings
    checked = [cell for cell in cells if "nbval-check-output" in cell["metadata"].get("tags", [])]
    assert len(checked) == 2 and all(text_of(cell) for cell in checked)
    assert "1,082,680 parameters" in text_of(checked[-1])
    assert metrics["config"] == settings
    assert load(OUTPUTS / "evaluation.json")["checkpoint_config"] == metrics["config"]  # the companion evaluated it
    epochs = [(int(n), int(of), float(loss)) for n, of, loss in EPOCH_LINE.findall("\n".join(map(text_of, cells)))]
    assert [(epoch, of) for epoch, of, _ in epochs] == [(n, 20) for n in range(1, 21)]
    assert len(metrics["history"]) == 20 and metrics["final_test_loss"] <= MAX_TEST_LOSS
    assert epochs[-1][2] == round(metrics["final_test_loss"], 1)  # the printed loss is the saved one
    with Image.open(OUTPUTS / "samples.png") as samples:
        assert samples.size == (242, 242)  # 8 x 8 digits of 28 pixels with 2-pixel gaps


def sweep_runs():
    """Every configuration's runs in results/sweep: {name: {seed: (metrics, evaluation)}}."""
    return sweep.CONFIGURATIONS, vh.read_sweep(sweep.CONFIGURATIONS)


def span(values, decimals=1):
    """A range over seeds as the notebooks quote it: 'low–high' (each end one seed's value), or one value if equal."""
    low, high = f"{min(values):.{decimals}f}", f"{max(values):.{decimals}f}"
    return low if low == high else f"{low}–{high}"


def test_the_sweep_has_three_seeds_or_more_of_every_configuration_and_backs_what_the_walkthrough_quotes():
    """Every configuration has 3 seeds or more and figures; the walkthrough's answers quote existing files and runs."""
    configurations, runs = sweep_runs()
    for name in configurations:
        assert len(runs.get(name, {})) >= 3, f"{name}: fewer than 3 seeds; run `make sweep`"
        assert all((vh.SWEEP_DIR / name / f"{part}.png").is_file() for part in ("samples", "reconstructions")), name
    markdown = "\n".join("".join(c["source"]) for c in load(NOTEBOOK)["cells"] if c["cell_type"] == "markdown")
    named = re.findall(r"\((results/sweep/[^)\s]+)\)", markdown)
    assert named and all((REPO / path).is_file() for path in named), named
    keys = ("final_test_recon", "final_test_kl", "final_test_negative_elbo", "entropy_floor")  # what answers quote
    values = {f"{metrics[key]:.1f}" for seeds in runs.values() for metrics, _ in seeds.values() for key in keys}
    answers = "\n".join(re.findall(r"<details>(.*?)</details>", markdown, re.DOTALL))
    quoted = set(re.findall(r"(?<![\d.])\d+\.\d(?![\d])", answers))
    assert quoted and quoted <= values, sorted(quoted - values)


def test_the_sweeps_default_run_is_the_committed_run():
    """Same settings, seed, machine and code: the sweep's beta-1 seed 1234 trained as outputs/ did, bit for bit."""
    # its evaluation ran at one thread (two runs side by side), so its sums agree to about 1e-7
    committed, (metrics, evaluation) = REPO / "outputs", vh.read_sweep(["beta-1"])["beta-1"][1234]
    assert losses(load(committed / "metrics.json")["history"]) == losses(metrics["history"])
    assert losses(vh.read_sweep(["lab"])["lab"][1234][0]["history"]) == losses(metrics["history"][:5])  # EPOCHS = 5
    assert (committed / "samples.png").read_bytes() == (REPO / "results/sweep/beta-1/samples.png").read_bytes()
    ours = load(committed / "evaluation.json")["importance_weighted"]
    assert ours["nll"] == pytest.approx(evaluation["importance_weighted"]["nll"], rel=1e-6)


def test_the_numbers_the_walkthrough_quotes_are_those_of_the_committed_files():
    """The beta-0 comparison, as the walkthrough's text quotes it: ranges over the sweep's seeds."""
    text = " ".join(" ".join("".join(c["source"]) for c in load(NOTEBOOK)["cells"] if c["cell_type"] == "markdown")
                    .split())
    runs = vh.read_sweep(["beta-0", "beta-1"])
    rec0, rec1 = ([m["final_test_recon"] for m, _ in runs[name].values()] for name in ("beta-0", "beta-1"))
    bound0, bound1 = ([e["marginal_kl_gaussian_lower_bound"] for _, e in runs[name].values()]
                      for name in ("beta-0", "beta-1"))
    assert f"(rec {span(rec0)} nats against {span(rec1)})" in text
    prior = "$\\mathcal{N}(0, I)$"
    assert f"at least {min(bound0):.1f} nats from {prior}, where the defaults' bound is {span(bound1, 2)}." in text


def test_the_readme_quotes_the_committed_run_and_the_sweep():
    readme, (metrics, evaluation) = (REPO / "README.md").read_text(), vh.read_run(OUTPUTS)
    iw = evaluation["importance_weighted"]
    assert (f"**{metrics['final_test_negative_elbo']:.1f}** = {metrics['final_test_recon']:.1f} + "
            f"{metrics['final_test_kl']:.1f}") in readme
    assert f"**{iw['nll']:.1f}** (negative ELBO on those images: {iw['elbo_loss_same_images']:.1f})" in readme
    assert f"| {metrics['entropy_floor']:.1f} |" in readme and f"| {metrics['train_seconds']:.0f} s |" in readme
    assert f"| {sum(e['seconds'] for e in metrics['history'][:5]):.0f} s | {metrics['train_seconds']:.0f} s |" in readme
    assert f"{evaluation['active_units']} / {evaluation['active_units_burda']} of 20" in readme
    assert f"move it by {evaluation['test_loss_redraw_sd']:.2f} nats" in readme
    runs = sweep_runs()[1]
    rows = re.findall(r"^\| `([\w.-]+)`: [^|]*\| (\d+) \|" + r" ([^|]+) \|" * 5 + "$", readme, re.M)
    assert len(rows) == len(runs)  # the sweep's table: each row as results/sweep has it
    for name, seeds, *quoted in rows:
        columns = [[m[key] for m, _ in runs[name].values()]
                   for key in ("final_test_recon", "final_test_kl", "final_test_negative_elbo")]
        columns.append([e["importance_weighted"]["nll"] for _, e in runs[name].values()])
        units = [[e[key] for _, e in runs[name].values()] for key in ("active_units", "active_units_burda")]
        expected = [f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.2f}" for v in columns]
        expected.append(" / ".join(f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.2f}" for v in units))
        assert int(seeds) == len(runs[name]) and [q.strip() for q in quoted] == expected, name


def test_teachings_hand_out_command_clears_outputs_and_removes_the_answers(tmp_path):
    teaching = (REPO / "TEACHING.md").read_text()
    command = re.search(r"```bash\n(\.venv/bin/jupyter nbconvert.*?)```", teaching, re.DOTALL)[1].replace("\\\n", " ")
    command = command.replace("--output-dir handout", f"--output-dir {tmp_path}")
    subprocess.run(command, shell=True, cwd=REPO, check=True, capture_output=True)
    for path in (NOTEBOOK, COMPANION):
        handout = load(tmp_path / path.name)
        assert not [c for c in handout["cells"] if c["cell_type"] == "code" and c["outputs"]]
        assert "<details><summary>Check your answer" not in json.dumps(handout)
        assert len(handout["cells"]) < len(load(path)["cells"]) or path == COMPANION
