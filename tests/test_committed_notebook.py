"""The committed notebooks and results: each notebook reads as one finished, in-order run at the defaults, with
nothing of the machine that ran it, and the walkthrough stays short, each section ending with its takeaway."""

import ast
import json
import re

import pytest
from PIL import Image

from conftest import COMPANION, NOTEBOOK, REPO

MAX_TEST_LOSS = float(re.search(r"^MAX_TEST_LOSS \?= ([\d.]+)$", (REPO / "Makefile").read_text(), re.M)[1])
OUTPUTS = REPO / "outputs"  # the committed run's OUT_DIR
MAX_WORDS = 3_000  # of the walkthrough's markdown
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


def test_every_code_cell_ran_once_in_order_without_an_error(notebook):
    cells = code_cells(notebook)
    assert [cell["execution_count"] for cell in cells] == list(range(1, len(cells) + 1))
    assert not [cell for cell in cells if any(o["output_type"] == "error" for o in cell["outputs"])]


def test_no_widget_state_or_timing_metadata(notebook):
    assert "widgets" not in notebook["metadata"]  # the sliders' view stays; without its state it shows as text
    for cell in notebook["cells"]:
        assert set(cell["metadata"]) <= {"tags"}, cell["metadata"]  # no execution, ExecuteTime, collapsed...


def test_one_tagged_parameters_cell_comes_first(notebook):
    tagged = [i for i, cell in enumerate(code_cells(notebook)) if "parameters" in cell["metadata"].get("tags", [])]
    assert tagged == [0]


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


def test_the_walkthrough_is_short():
    words = sum(len("".join(c["source"]).split()) for c in load(NOTEBOOK)["cells"] if c["cell_type"] == "markdown")
    assert words <= MAX_WORDS


def test_walkthrough_outputs_come_from_the_default_settings():
    cells, namespace = code_cells(load(NOTEBOOK)), {}
    for cell in cells[:2]:  # the parameters cell and the cell that checks them
        exec("".join(cell["source"]), namespace)
    settings = namespace["vh"].check_settings(namespace)
    assert text_of(cells[0]) == "" and ast.literal_eval(text_of(cells[1])) == settings
    checked = [cell for cell in cells if "# NBVAL_CHECK_OUTPUT" in "".join(cell["source"])]
    assert all(text_of(cell) for cell in checked) and "1,082,680 parameters" in text_of(checked[-1])
    metrics = load(OUTPUTS / "metrics.json")
    assert metrics["config"] == settings
    assert load(OUTPUTS / "evaluation.json")["checkpoint_config"] == metrics["config"]  # the companion evaluated it


def test_the_committed_run_trained_every_epoch_within_the_bound():
    printed = "\n".join(text_of(cell) for cell in code_cells(load(NOTEBOOK)))
    epochs = [(int(epoch), int(of), float(loss)) for epoch, of, loss in EPOCH_LINE.findall(printed)]
    assert [(epoch, of) for epoch, of, _ in epochs] == [(n, 20) for n in range(1, 21)]
    metrics = load(OUTPUTS / "metrics.json")
    assert len(metrics["history"]) == 20 and metrics["final_test_loss"] <= MAX_TEST_LOSS
    assert epochs[-1][2] == round(metrics["final_test_loss"], 1)  # the printed loss is the saved one
    with Image.open(OUTPUTS / "samples.png") as samples:
        assert samples.size == (242, 242)  # 8 x 8 digits of 28 pixels with 2-pixel gaps


def test_the_sweep_results_back_what_the_walkthrough_shows_and_quotes():
    """Every configuration is published with its figures; each results/sweep file the walkthrough's text names
    exists, and each number its exercise answers quote is one of the sweep's, rounded to one decimal."""
    import sweep  # tools/sweep.py

    published = REPO / "results" / "sweep"
    for name in sweep.CONFIGURATIONS:
        for suffix in ("json", "evaluation.json", "samples.png", "reconstructions.png"):
            assert (published / f"{name}.{suffix}").is_file(), f"{name}.{suffix}: run `make sweep`"
    markdown = "\n".join("".join(c["source"]) for c in load(NOTEBOOK)["cells"] if c["cell_type"] == "markdown")
    named = re.findall(r"\((results/sweep/[^)\s]+)\)", markdown)
    assert named and all((REPO / path).is_file() for path in named), named
    values = {f"{float(number):.1f}" for path in published.glob("*.json")  # every float the sweep wrote
              for number in re.findall(r"\d+\.\d+(?:e[-+]?\d+)?", path.read_text())}
    answers = "\n".join(re.findall(r"<details>(.*?)</details>", markdown, re.DOTALL))
    quoted = set(re.findall(r"(?<![\d.])\d+\.\d(?![\d])", answers))
    assert quoted and quoted <= values, sorted(quoted - values)


def test_the_sweeps_default_run_is_the_committed_run():
    """Same defaults, same machine, same code: outputs/ and the sweep's beta-1 were trained and evaluated alike."""
    committed, swept = OUTPUTS, REPO / "results" / "sweep"
    losses = [[{k: v for k, v in epoch.items() if k != "seconds"} for epoch in load(path)["history"]]
              for path in (committed / "metrics.json", swept / "beta-1.json")]
    assert losses[0] == losses[1]
    assert load(committed / "evaluation.json")["importance_weighted"] == load(swept / "beta-1.evaluation.json")[
        "importance_weighted"]
    assert (committed / "samples.png").read_bytes() == (swept / "beta-1.samples.png").read_bytes()


def test_the_numbers_the_walkthrough_quotes_are_those_of_the_committed_files():
    """The companion's bound on the committed run, and the beta-0 comparison, as the walkthrough's text quotes them."""
    text = " ".join(" ".join("".join(c["source"]) for c in load(NOTEBOOK)["cells"] if c["cell_type"] == "markdown")
                    .split())
    iw = load(OUTPUTS / "evaluation.json")["importance_weighted"]
    assert (f"is {iw['nll']:.1f} nats, {iw['elbo_loss_same_images'] - iw['nll']:.1f} below their negative ELBO of "
            f"{iw['elbo_loss_same_images']:.1f}") in text
    sweep = REPO / "results" / "sweep"
    rec0, rec1 = (load(sweep / f"{name}.json")["final_test_recon"] for name in ("beta-0", "beta-1"))
    kl0, kl1 = (load(sweep / f"{name}.evaluation.json")["marginal_kl_gaussian_lower_bound"]
                for name in ("beta-0", "beta-1"))
    assert f"better ({rec0:.1f} nats against {rec1:.1f})" in text
    assert f"at least {kl0:.1f} nats from $\\mathcal{{N}}(0, I)$, against {kl1:.2f}." in text


def test_the_readme_quotes_the_committed_run():
    readme, metrics = (REPO / "README.md").read_text(), load(OUTPUTS / "metrics.json")
    iw = load(OUTPUTS / "evaluation.json")["importance_weighted"]
    assert (f"**{metrics['final_test_negative_elbo']:.1f}** = {metrics['final_test_recon']:.1f} + "
            f"{metrics['final_test_kl']:.1f}") in readme
    assert f"**{iw['nll']:.1f}** (negative ELBO on those images: {iw['elbo_loss_same_images']:.1f})" in readme
    assert f"| {metrics['entropy_floor']:.1f} |" in readme and f"| {metrics['train_seconds']:.0f} s |" in readme
    evaluation = load(OUTPUTS / "evaluation.json")
    assert f"{evaluation['active_units']} / {evaluation['active_units_burda']} of 20" in readme
    assert f"move it by {evaluation['test_loss_redraw_sd']:.2f} nats" in readme
    number = r" \| ([\d.]+)"
    rows = re.findall(r"^\| `([\w.-]+)`: .*" + number * 4 + r" \| (\d+) / (\d+) \|$", readme, re.M)
    assert len(rows) == 10  # the sweep's table: each row as results/sweep has it
    for name, *quoted in rows:
        run, ev = (load(REPO / "results" / "sweep" / f"{name}.{kind}") for kind in ("json", "evaluation.json"))
        assert quoted == [f"{run['final_test_recon']:.1f}", f"{run['final_test_kl']:.1f}",
                          f"{run['final_test_negative_elbo']:.1f}", f"{ev['importance_weighted']['nll']:.1f}",
                          str(ev["active_units"]), str(ev["active_units_burda"])], name

