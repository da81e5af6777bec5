"""Checks of the committed notebook files: each must read as one finished, in-order run at the defaults."""

import json
import os
import re

import pytest
from PIL import Image

from conftest import COMPANION, NOTEBOOK, REPO


@pytest.fixture(scope="module")
def notebook():
    return json.loads(NOTEBOOK.read_text())


@pytest.fixture(scope="module", params=[NOTEBOOK, COMPANION], ids=["walkthrough", "companion"])
def each_notebook(request):
    return json.loads(request.param.read_text())


def code_cells_of(notebook):
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


@pytest.fixture(scope="module")
def code_cells(notebook):
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def text_of(cell):
    """All text a cell printed or returned."""
    parts = []
    for output in cell["outputs"]:
        parts.append("".join(output.get("text", "")))
        parts.append("".join(output.get("data", {}).get("text/plain", "")))
    return "\n".join(part for part in parts if part)


def test_every_code_cell_ran_once_in_order(each_notebook):
    code_cells = code_cells_of(each_notebook)
    assert [cell["execution_count"] for cell in code_cells] == list(range(1, len(code_cells) + 1))
    assert not [cell for cell in code_cells if any(o["output_type"] == "error" for o in cell["outputs"])]


def test_no_widget_state_or_timing_metadata(each_notebook):
    notebook, code_cells = each_notebook, code_cells_of(each_notebook)
    assert "widgets" not in notebook["metadata"]
    for cell in notebook["cells"]:
        assert set(cell["metadata"]) <= {"tags"}, cell["metadata"]  # no execution, ExecuteTime, collapsed...
    for cell in code_cells:
        assert not any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in cell["outputs"])


def test_one_tagged_parameters_cell_comes_first(each_notebook):
    code_cells = code_cells_of(each_notebook)
    tagged = [i for i, cell in enumerate(code_cells) if "parameters" in cell["metadata"].get("tags", [])]
    assert tagged == [0]


def test_walkthrough_outputs_come_from_the_default_settings(code_cells, monkeypatch):
    for name in [name for name in os.environ if name.startswith("VAE_")]:
        monkeypatch.delenv(name)
    namespace = {}
    for cell in code_cells[:2]:  # the parameters cell and the cell that reads them, with no overrides
        exec("".join(cell["source"]), namespace)
    assert text_of(code_cells[0]) == ""
    assert text_of(code_cells[1]) == repr(namespace["config"])


def test_model_summary_is_checked_by_nbval_and_shows_the_parameter_count(code_cells):
    checked = [cell for cell in code_cells if "# NBVAL_CHECK_OUTPUT" in "".join(cell["source"])]
    assert len(checked) == 1 and "1,082,680 parameters" in text_of(checked[0])


def test_committed_run_reached_the_reproduction_bound_and_its_samples_are_committed(code_cells):
    printed = "\n".join(text_of(cell) for cell in code_cells)
    losses = [float(x) for x in re.findall(r"final test loss ([0-9.]+)", printed)]
    assert len(losses) == 1 and losses[0] <= 101.5
    assert len(re.findall(r"^epoch +\d+/20 ", printed, flags=re.MULTILINE)) == 20
    with Image.open(REPO / "samples.png") as samples:
        assert samples.size == (242, 242)


def test_no_path_of_the_machine_that_ran_it(each_notebook):
    """Readers elsewhere should see nothing machine-specific: OUT_DIR and DATA_DIR as given, not resolved."""
    outputs = json.dumps([cell.get("outputs", []) for cell in each_notebook["cells"]])
    results = {name: (REPO / name).read_text() for name in ("metrics.json", "evaluation.json")}
    absolute = re.compile(r"""(?:^|[\s'"(=\[])(/(?:home|root|work|tmp|Users|var|srv|mnt|opt|data)\b[^\s'",)]*)""")
    for name, text in (("the notebook's outputs", outputs), *results.items()):
        assert str(REPO) not in text, name
        assert not absolute.findall(text), f"{name} shows absolute paths: {absolute.findall(text)[:3]}"
