"""The walkthrough in a real kernel (jupyter_client), for what only a kernel shows: SIGINT mid-epoch, then the training
cell again; kill -9 mid-epoch, then RESUME = True in a new kernel; no vae_helpers.py. Each ends bit for bit as the
uninterrupted run. Settings (3 epochs on 4,000 images) are injected after the parameters cell, as papermill does."""

import re
import shutil

import nbformat
import pytest
import torch
from jupyter_client.manager import start_new_kernel
from torch.testing import assert_close

from conftest import NOTEBOOK, REPO, data_root, losses

pytestmark = [pytest.mark.slow, pytest.mark.notebook]

QUICK = {"EPOCHS": 3, "TRAIN_SUBSET": 4000}
# What a run leaves, saved by the kernel for the test to compare: its history, weights and Adam's state, as saved.
SAVE_STATE = ('torch.save({"history": history, "weights": model.state_dict(), '
              '"checkpoint": torch.load(out_dir / "vae.pt", weights_only=True)}, out_dir / "state.pt")')


class Interrupted(Exception):
    """The test stopped the kernel mid-cell."""


class Session:
    """A kernel running the walkthrough's cells in `folder` (the repository's, by default), as Jupyter does."""

    def __init__(self, out_dir, folder=REPO, **settings):
        self.manager, self.client = start_new_kernel(kernel_name="python3", cwd=str(folder))
        self.code = [cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code"]
        self.training = next(source for source in self.code if "vh.start_or_resume(" in source)
        values = {**QUICK, "OUT_DIR": str(out_dir), "DATA_DIR": str(data_root()), **settings}
        self.overrides = "\n".join(f"{name} = {value!r}" for name, value in values.items())
        self.out_dir = out_dir

    def close(self):
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)

    def run(self, code, stop_at=None, kill=False):
        """Execute `code`: (printed text, error or None); once `stop_at` is printed, interrupt (or `kill`: kill -9)."""
        text, error = [], None

        def output(msg):
            nonlocal error
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                text.append(content["text"])
                if stop_at and stop_at in "".join(text):
                    if kill:
                        self.manager.shutdown_kernel(now=True)  # SIGKILL: no cleanup, no last save
                        raise Interrupted
                    self.manager.interrupt_kernel()
            elif kind == "error":
                error = (content["ename"], re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(content["traceback"])))

        try:
            self.client.execute_interactive(code, output_hook=output, timeout=300)
        except Interrupted:
            pass
        return "".join(text), error

    def until_training(self):
        """The cells before the training cell, in order, with the settings after the parameters cell."""
        cells = self.code[: self.code.index(self.training)]
        for code in [cells[0], self.overrides, *cells[1:]]:
            _, error = self.run(code)
            assert error is None, f"{code[:60]!r}: {error}"

    def state(self):
        _, error = self.run(SAVE_STATE)
        assert error is None, error
        return torch.load(self.out_dir / "state.pt", weights_only=True)


def assert_same(state, expected):
    assert losses(state["history"]) == losses(expected["history"])
    assert_close(state["weights"], expected["weights"], rtol=0, atol=0)
    assert_close(*(run["checkpoint"]["optimizer"]["state"] for run in (state, expected)), rtol=0, atol=0)
    assert losses(state["checkpoint"]["history"]) == losses(expected["checkpoint"]["history"])


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    session = Session(tmp_path_factory.mktemp("kernel") / "out")
    yield session
    session.close()


@pytest.fixture(scope="module")
def straight(kernel):
    """The in-order run, never interrupted, which every case must match."""
    kernel.until_training()
    text, error = kernel.run(kernel.training)
    assert error is None and [f"epoch  {n}/3" in text for n in (1, 2, 3)] == [True] * 3, (text, error)
    return kernel.state()


def test_an_interrupt_mid_epoch_then_the_training_cell_again_equals_the_straight_run(kernel, straight):
    kernel.until_training()  # the model and optimizer cells again: a fresh model, as on a new run
    (kernel.out_dir / "vae.pt").unlink()
    text, error = kernel.run(kernel.training, stop_at="epoch  1/3")  # lands in epoch 2, or just before it
    assert error is not None and error[0] == "KeyboardInterrupt" and "epoch  3/3" not in text, (text, error)
    text, error = kernel.run(kernel.training)
    assert error is None and "epoch  1/3" not in text and "epoch  3/3" in text, (text, error)
    assert_same(kernel.state(), straight)


def test_a_killed_kernel_resumes_in_a_new_kernel_with_resume(kernel, straight, tmp_path):
    """Kill the kernel in epoch 2; a reader who has the notebook alone is told to get the project, then resumes."""
    kernel.until_training()
    (kernel.out_dir / "vae.pt").unlink()
    kernel.run(kernel.training, stop_at="epoch  1/3", kill=True)
    (alone := tmp_path / "uploaded").mkdir()
    shutil.copy(NOTEBOOK, alone)
    new = Session(kernel.out_dir, folder=alone, RESUME=True)
    try:
        _, error = new.run(new.code[1])  # the settings cell, which imports vae_helpers
        assert error is not None and error[0] == "ModuleNotFoundError" and "get the whole project folder" in error[1]
        shutil.copy(REPO / "vae_helpers.py", alone)  # the reader fetches the whole project folder
        new.run("import importlib; importlib.invalidate_caches()")
        new.until_training()
        text, error = new.run(new.training)
        assert error is None and "resuming from" in text and "after epoch 1" in text and "epoch  1/3" not in text
        assert_same(new.state(), straight)
    finally:
        new.close()
