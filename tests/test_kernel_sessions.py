"""The walkthrough driven the way people use Jupyter: a real kernel (jupyter_client), cells run one at a time,
interrupted mid-epoch, run again, and run out of order. Each case must give exactly the result of the in-order
run, or stop with one line naming the cell to run.

Settings are injected as code after the parameters cell, as papermill does (not as VAE_* variables, which would
override a changed value in the kernel), in a quick configuration: 3 epochs on 4,000 images.
"""

import json
import os
import queue
import shutil

import nbformat
import pytest
from jupyter_client.manager import start_new_kernel

from conftest import NOTEBOOK, REPO, data_root

pytestmark = pytest.mark.notebook

QUICK = {"EPOCHS": 3, "TRAIN_SUBSET": 4000}
# A unique piece of each cell's source, in notebook order: the cells these tests run by name.
CELLS = {
    "parameters": "EPOCHS: int =",
    "settings": "config = vh.read_config(",
    "setup": "vh.seed_everything(",
    "data": "vh.load_splits(",
    "vae": "class VAE(nn.Module)",
    "model": "model = VAE(config.latent_dim)",
    "entropy": "def pixel_entropy(",
    "loss": "def loss_terms(",
    "train_defs": "def train_one_epoch(",
    "optimizer": "run = vh.TrainingRun(",
    "training": "run.epochs_to_train(",
    "samples": "vh.save_image_grid(samples,",
}
IN_ORDER = ["parameters", "overrides", "settings", "setup", "data", "vae", "model", "entropy", "loss", "train_defs",
            "optimizer", "training"]
# The state a run leaves: its history, the checkpoint's epoch and a digest of the weights, printed as JSON.
STATE = """
import hashlib as _h, json as _j
_weights = b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())
print(_j.dumps({"history": run.history, "epochs": run.epochs_done,
                "checkpoint_epoch": torch.load(out_dir / "vae.pt", weights_only=True)["epoch"],
                "weights": _h.sha256(_weights).hexdigest()}))
"""


def cell_sources():
    """{name: source} for the cells in CELLS, each found by its unique piece of source."""
    cells = [cell for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code"]
    sources = {}
    for name, piece in CELLS.items():
        matches = [cell.source for cell in cells if piece in cell.source]
        assert len(matches) == 1, f"{name}: {len(matches)} cells contain {piece!r}"
        sources[name] = matches[0]
    return sources


class Session:
    """A kernel running the walkthrough's cells in the repository's folder, like Jupyter does."""

    def __init__(self, out_dir, folder=REPO, **settings):
        env = {k: v for k, v in os.environ.items() if not k.startswith("VAE_")}
        self.manager, self.client = start_new_kernel(kernel_name="python3", cwd=str(folder), env=env)
        self.sources = cell_sources()
        values = {**QUICK, "OUT_DIR": str(out_dir), "DATA_DIR": str(data_root()), **settings}
        self.sources["overrides"] = "\n".join(f"{name} = {value!r}" for name, value in values.items())

    def close(self):
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)

    def run(self, code, interrupt_at=None):
        """Execute `code`; returns (printed text, error or None). With `interrupt_at`, interrupt when it shows."""
        msg_id = self.client.execute(code)
        text, error, interrupted = [], None, False
        while True:
            try:
                msg = self.client.get_iopub_msg(timeout=120)
            except queue.Empty:
                raise AssertionError(f"no output for 120 s from: {code[:80]}") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                text.append(content["text"])
            elif kind in ("display_data", "update_display_data", "execute_result"):
                shown = content["data"].get("text/plain", "")
                text.append(shown + "\n")
                if interrupt_at and not interrupted and interrupt_at in shown:
                    self.manager.interrupt_kernel()
                    interrupted = True
            elif kind == "error":
                error = (content["ename"], content["evalue"])
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(text), error

    def cells(self, *names):
        """Run the named cells in the order given; fail on the first error."""
        for name in names:
            _, error = self.run(self.sources[name])
            assert error is None, f"cell {name!r}: {error}"

    def state(self):
        """The run's history, epochs, checkpoint epoch and weights digest."""
        text, error = self.run(STATE)
        assert error is None, error
        return json.loads(text)


@pytest.fixture
def session(tmp_path):
    """Open a Session (more than one may be opened); closes them all at the end."""
    opened = []

    def open_session(**settings):
        opened.append(Session(tmp_path / f"out{len(opened)}", **settings))
        return opened[-1]

    yield open_session
    for each in opened:
        each.close()


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The in-order run of QUICK, never interrupted: what every other case must reproduce."""
    session = Session(tmp_path_factory.mktemp("straight"))
    try:
        session.cells(*IN_ORDER)
        return session.state()
    finally:
        session.close()


def test_interrupt_mid_epoch_rolls_back_and_running_again_equals_the_straight_run(session, straight_run):
    s = session()
    s.cells(*IN_ORDER[:-1])
    text, error = s.run(s.sources["training"], interrupt_at="epoch 2: batch 20/")
    assert error is not None and error[0] == "KeyboardInterrupt", (text, error)
    assert "Stopped in epoch 2" in error[1] and "end of epoch 1" in error[1] and "Run this cell again" in error[1]
    rolled_back = s.state()
    assert rolled_back["epochs"] == rolled_back["checkpoint_epoch"] == 1
    assert rolled_back["history"] == {key: values[:1] for key, values in straight_run["history"].items()}
    text, error = s.run(s.sources["training"])
    assert error is None and "epoch  2/3" in text and "epoch  1/3" not in text
    assert s.state() == straight_run  # every loss, the weights and the checkpoint, to the last bit


def test_running_the_training_cell_again_after_it_finished_trains_nothing(session, straight_run):
    s = session()
    s.cells(*IN_ORDER)
    text, error = s.run(s.sources["training"])
    assert error is None and "nothing to train" in text and "raise EPOCHS" in text and "epoch  1/3" not in text
    assert s.state() == straight_run


def test_raising_epochs_continues_and_equals_a_longer_run_from_the_start(session, straight_run):
    s = session(EPOCHS=2)
    s.cells(*IN_ORDER)
    assert s.state()["epochs"] == 2
    s.run("EPOCHS = 3")
    s.cells("settings", "setup", "training")
    assert s.state() == straight_run


def test_model_cell_run_again_after_training_stops_the_training_cell_until_the_optimizer_cell_runs(
        session, straight_run):
    s = session()
    s.cells(*IN_ORDER, "model")
    text, error = s.run(s.sources["training"])
    assert error == ("NotebookOrderError", error[1]) and "the cell that creates the optimizer" in error[1]
    _, error = s.run(s.sources["samples"])  # never evaluates the fresh, untrained model under the old run's name
    assert error is not None and error[0] == "NotebookOrderError" and "has not been trained" in error[1]
    s.cells("optimizer", "training")
    assert s.state() == straight_run  # the new model, trained from the start, exactly as in order


def test_optimizer_cell_run_again_after_training_refuses_the_trained_model(session):
    s = session()
    s.cells(*IN_ORDER)
    _, error = s.run(s.sources["optimizer"])
    assert error is not None and error[0] == "NotebookOrderError"
    assert "initial weights" in error[1] and "the model cell" in error[1]


@pytest.mark.parametrize(("change", "cell"), [
    ("LATENT_DIM = 8", "the model cell"),
    ("BETA = 2.0", "the cell that creates the optimizer"),
    ("TRAIN_SUBSET = 3000", "the data cell"),
])
def test_a_changed_setting_stops_training_and_evaluation_naming_the_cell_to_run(session, change, cell):
    s = session()
    s.cells(*IN_ORDER)
    s.run(change)
    s.cells("settings", "setup")
    for name in ("training", "samples"):
        _, error = s.run(s.sources[name])
        assert error is not None and error[0] == "NotebookOrderError", (name, error)
        assert cell in error[1] and change.split(" = ")[0] in error[1] and "\n" not in error[1]


def test_an_evaluation_cell_before_training_names_the_training_cells(session):
    s = session()
    s.cells(*IN_ORDER[:-2])  # up to the model: no optimizer, no training
    _, error = s.run(s.sources["samples"])
    assert error[0] == "NotebookOrderError" and "section 6" in error[1]
    s.cells("optimizer")
    _, error = s.run(s.sources["samples"])
    assert error[0] == "NotebookOrderError" and "0 of EPOCHS = 3" in error[1] and "the training cell" in error[1]


def test_the_notebook_alone_without_vae_helpers_says_what_is_missing(tmp_path):
    alone = tmp_path / "uploaded"
    alone.mkdir()
    shutil.copy(NOTEBOOK, alone)
    s = Session(tmp_path / "out", folder=alone)
    try:
        s.cells("parameters")
        _, error = s.run(s.sources["settings"])
    finally:
        s.close()
    assert error is not None and error[0] == "ModuleNotFoundError"
    assert "vae_helpers.py is not next to this notebook" in error[1] and "whole project" in error[1]


def test_cells_are_found_in_notebook_order():
    sources = cell_sources()
    cells = [cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code"]
    order = [cells.index(sources[name]) for name in IN_ORDER if name != "overrides"]
    assert order == sorted(order)

