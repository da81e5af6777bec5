"""The walkthrough driven the way people use Jupyter: a real kernel (jupyter_client) running its cells one at a
time, interrupted mid-epoch, run again, run out of order, killed. Only what a kernel shows is tested here (the
refusals of bad settings and bad checkpoints are unit tests): each case must end in exactly the state of the
in-order run, or stop with one line naming the cell to run.

One kernel plays the cases in sequence, each leaving it as the in-order run left it; the last kills it mid-epoch,
and a second kernel, in a folder that at first holds the notebook alone, resumes that run. Settings are injected
as code after the parameters cell, as papermill does, in a quick configuration: 3 epochs on 4,000 images.
"""

import json
import queue
import shutil

import nbformat
import pytest
from jupyter_client.manager import start_new_kernel

from conftest import NOTEBOOK, REPO, data_root

pytestmark = [pytest.mark.slow, pytest.mark.notebook]

QUICK = {"EPOCHS": 3, "TRAIN_SUBSET": 4000}
# A unique piece of the source of each cell run by name.
CELLS = {
    "parameters": "EPOCHS: int =",
    "settings": "vh.check_settings(globals())  # the settings above",
    "model": "model = VAE(LATENT_DIM)",
    "optimizer": "optimizer = torch.optim.Adam(",
    "training": "history = vh.start_or_resume(",
    "samples": "samples = model.decode(codes)",
}
# What a run leaves, as JSON: the kernel's history, weights and random stream, and the checkpoint's contents
# (without the seconds each epoch took: the only numbers that may differ).
STATE = """
import hashlib as _h, json as _j
def _digest(tensors):
    _d = _h.sha256()
    for _t in tensors:
        _d.update(_t.detach().cpu().contiguous().numpy().tobytes())
    return _d.hexdigest()
def _losses(epochs):
    return [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in epochs]
_c = torch.load(out_dir / "vae.pt", weights_only=True)
print(_j.dumps({
    "history": _losses(history), "weights": _digest(model.parameters()), "rng": _digest([torch.get_rng_state()]),
    "checkpoint": {"history": _losses(_c["history"]), "model": _digest(_c["model"].values()),
                   "optimizer": _digest(t for s in _c["optimizer"]["state"].values() for t in s.values()),
                   "rng": _digest([_c["rng"]["cpu"]]), "EPOCHS": _c["config"]["EPOCHS"]}}))
"""


class Session:
    """A kernel running the walkthrough's cells in `folder` (the repository's, by default), like Jupyter does."""

    def __init__(self, out_dir, folder=REPO, **settings):
        self.manager, self.client = start_new_kernel(kernel_name="python3", cwd=str(folder))
        code = [cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code"]
        self.sources = {}
        for name, piece in CELLS.items():
            matches = [source for source in code if piece in source]
            assert len(matches) == 1, f"{name}: {len(matches)} cells contain {piece!r}"
            self.sources[name] = matches[0]
        # Every cell up to the training cell, in notebook order, with the settings after the parameters cell.
        self.in_order = code[: code.index(self.sources["training"])]
        self.out_dir = out_dir
        values = {**QUICK, "OUT_DIR": str(out_dir), "DATA_DIR": str(data_root()), **settings}
        self.sources["overrides"] = "\n".join(f"{name} = {value!r}" for name, value in values.items())
        self.in_order.insert(code.index(self.sources["parameters"]) + 1, self.sources["overrides"])

    def close(self):
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)

    def run(self, code, interrupt_at=None, kill_at=None):
        """Execute `code`: (printed text, (error name, message) or None). When the text `interrupt_at` has been
        printed, interrupt the kernel (as the stop button does); when `kill_at` has, kill it (kill -9)."""
        code = self.sources.get(code, code)
        msg_id = self.client.execute(code)
        text, error = [], None
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
                if interrupt_at and interrupt_at in "".join(text):
                    self.manager.interrupt_kernel()
                    interrupt_at = None
                if kill_at and kill_at in "".join(text):
                    self.manager.shutdown_kernel(now=True)  # SIGKILL: no cleanup, no last save
                    return "".join(text), None
            elif kind in ("display_data", "execute_result"):
                text.append(content["data"].get("text/plain", "") + "\n")
            elif kind == "error":
                error = (content["ename"], content["evalue"])
            elif kind == "status" and content["execution_state"] == "idle":
                return "".join(text), error

    def cells(self, *codes):
        """Run the named cells (or code) in the order given; fail on the first error. The last one's text."""
        for code in codes:
            text, error = self.run(code)
            assert error is None, f"{code[:60]!r}: {error}"
        return text

    def refused(self, cell, *phrases):
        """Run `cell`: it must raise a one-line NotebookOrderError that contains every phrase."""
        text, error = self.run(cell)
        assert error is not None and error[0] == "NotebookOrderError", (cell, text, error)
        assert "\n" not in error[1] and all(phrase in error[1] for phrase in phrases), (cell, error[1])

    def state(self):
        return json.loads(self.cells(STATE))


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    session = Session(tmp_path_factory.mktemp("kernel") / "out")
    yield session
    session.close()


@pytest.fixture(scope="module")
def straight(kernel):
    """The in-order run, never interrupted: (its training cell's text, its state), which every case must match."""
    text = kernel.cells(*kernel.in_order, "training")
    return text, kernel.state()


def test_the_in_order_run_trains_and_saves_every_epoch(straight):
    text, state = straight
    assert [f"epoch  {n}/3  train loss" in text for n in (1, 2, 3)] == [True] * 3
    assert len(state["history"]) == 3 and state["history"] == state["checkpoint"]["history"]
    assert state["checkpoint"]["EPOCHS"] == 3


def test_the_training_cell_run_again_trains_nothing(kernel, straight):
    text = kernel.cells("training")
    assert "nothing to train" in text and "raise EPOCHS" in text and "train loss" not in text
    assert kernel.state() == straight[1]


def test_the_optimizer_cell_run_again_changes_nothing_the_checkpoint_is_the_truth(kernel, straight):
    kernel.cells("optimizer")  # a fresh Adam, without the trained one's moments
    assert "nothing to train" in kernel.cells("training")
    assert kernel.state() == straight[1]  # the optimizer's state came back from the checkpoint too


@pytest.mark.parametrize(("change", "cell"), [
    ("LATENT_DIM = 8", "the model cell"),
    ("TRAIN_SUBSET = 3000", "the data cell"),
    ("BETA = 2.0", "the model cell"),
])
def test_a_changed_setting_stops_training_and_evaluation_naming_the_setting_and_the_cell(
        kernel, straight, change, cell):
    kernel.cells(change, "settings")
    setting = change.split(" = ")[0]
    try:
        for name in ("training", "samples"):
            kernel.refused(name, setting, cell)
    finally:
        kernel.cells("parameters", "overrides", "settings")  # the settings as they were: the trained model is back
    assert "nothing to train" in kernel.cells("training") and kernel.state() == straight[1]


def test_raising_epochs_continues_and_equals_the_longer_run(kernel, straight):
    kernel.cells("EPOCHS = 2", "settings", "model", "optimizer")
    assert "epoch  2/2" in kernel.cells("training") and kernel.state()["checkpoint"]["EPOCHS"] == 2
    text = kernel.cells("EPOCHS = 3", "settings", "training")
    assert "epoch  3/3" in text and "epoch  2/" not in text
    assert kernel.state() == straight[1]


def test_the_model_cell_run_again_needs_the_optimizer_cell_then_trains_afresh(kernel, straight):
    kernel.cells("model")
    kernel.refused("training", "the optimizer cell")
    kernel.refused("samples", "has not been trained")  # never evaluates the fresh model under the old run's name
    kernel.cells("optimizer", "training")
    assert kernel.state() == straight[1]


def test_an_interrupt_mid_epoch_2_then_the_training_cell_again_equals_the_straight_run(kernel, straight):
    kernel.cells("model", "optimizer")
    text, error = kernel.run("training", interrupt_at="epoch  1/3")  # lands in epoch 2, or just before it
    assert error is not None and error[0] == "KeyboardInterrupt" and "epoch  3/3" not in text, (text, error)
    text = kernel.cells("training")
    assert "epoch  1/3" not in text and "epoch  3/3" in text
    assert kernel.state() == straight[1]  # every loss, the weights, the optimizer, the random stream, the checkpoint


def test_a_killed_kernel_resumes_in_a_new_kernel_with_resume(kernel, straight, tmp_path):
    """Kill the kernel in epoch 2; then a reader who has the notebook alone gets the helpers and resumes."""
    kernel.cells("model", "optimizer")
    kernel.run("training", kill_at="epoch  1/3")
    alone = tmp_path / "uploaded"
    alone.mkdir()
    shutil.copy(NOTEBOOK, alone)
    new = Session(kernel.out_dir, folder=alone, RESUME=True)
    try:
        new.cells("parameters", "overrides")
        _, error = new.run("settings")
        assert error is not None and error[0] == "ModuleNotFoundError", error
        assert "vae_helpers.py is not next to this notebook" in error[1] and "whole project" in error[1]
        shutil.copy(REPO / "vae_helpers.py", alone)  # the reader fetches the whole project folder
        new.cells("import importlib; importlib.invalidate_caches()", *new.in_order)
        new.refused("samples", "has not been trained", "the optimizer cell", "the training cell")  # before training
        text = new.cells("training")
        assert "resuming from" in text and "after epoch 1" in text and "epoch  1/3" not in text
        assert new.state() == straight[1]
    finally:
        new.close()
