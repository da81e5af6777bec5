"""The training state behind the walkthrough's re-runnable training cell (vh.TrainingRun) and the thread policy
(vh.FairThreads), tested without a kernel: rollback, order checks, and that the thread count changes no number.
"""

import pytest
import torch

import vae_helpers as vh
from conftest import NOTEBOOK

CONFIG = vh.Config(epochs=2, batch_size=64, latent_dim=4, learning_rate=1e-3, seed=7, data_dir="data", out_dir=".",
                   train_subset=0, device="cpu", dataset="mnist", beta=1.0, binarize=False, resume=False)


@pytest.fixture(scope="module")
def nb():
    return vh.load_notebook_definitions(NOTEBOOK)


def images(count=640, seed=0):
    """Grey-level stand-in images in [0, 1] (no data set needed)."""
    return torch.rand(count, 784, generator=torch.Generator().manual_seed(seed))


def new_run(nb, tmp_path, config=CONFIG):
    """A fresh model built as the model cell builds it, and its TrainingRun."""
    tmp_path.mkdir(exist_ok=True)
    torch.manual_seed(config.seed)
    model = nb["VAE"](config.latent_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    return vh.TrainingRun(model, optimizer, config, tmp_path / "vae.pt", torch.device("cpu"))


def train_epochs(nb, run, data, cores=None):
    """The walkthrough's training cell, without printing."""
    for epoch in run.epochs_to_train(CONFIG, run.model):
        with run.epoch(epoch):
            terms = nb["train_one_epoch"](run.model, run.optimizer, data, 64, run.generators, epoch=epoch,
                                          cores=cores)
            run.finish_epoch(terms / len(data), nb["evaluate"](run.model, data, 64) / len(data), 0.0)


class SwitchingThreads:
    """Stands in for vh.FairThreads: alternates between 1 thread and all of them at every check."""

    def __init__(self):
        self.calls = 0

    def adjust(self):
        self.calls += 1
        torch.set_num_threads(1 if self.calls % 2 else self.max_threads)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs at least 2 CPU threads")
def test_switching_the_thread_count_changes_no_number(nb, tmp_path):
    threads = torch.get_num_threads()
    data = images(1920)  # 30 batches: 3 checks an epoch, so the epochs end, and are evaluated, on 1 and on all threads
    fixed = new_run(nb, tmp_path / "fixed")
    train_epochs(nb, fixed, data)
    switching, cores = new_run(nb, tmp_path / "switching"), SwitchingThreads()
    cores.max_threads = threads
    try:
        train_epochs(nb, switching, data, cores)
    finally:
        torch.set_num_threads(threads)
    assert cores.calls == 6
    assert switching.history == fixed.history  # every loss, train and test, to the last bit
    assert all(torch.equal(a, b) for a, b in zip(switching.model.parameters(), fixed.model.parameters()))


def test_fair_threads_uses_the_cores_others_leave_free(monkeypatch):
    threads = torch.get_num_threads()
    fair = vh.FairThreads()
    fair.cores = fair.max_threads = 2
    samples = iter([(10.0, 100.0, 50.0), (11.0, 101.9, 50.9), (12.0, 102.1, 51.1), (12.1, 200.0, 51.1)])
    monkeypatch.setattr(fair, "_sample", lambda: next(samples))
    fair._last = (9.0, 98.0, 49.0)
    try:
        fair.adjust()  # in the last second the machine worked 2.0 CPU-seconds, this process 1.0: one core left
        assert torch.get_num_threads() == 1
        fair.adjust()  # 1.9 and 0.9: still one
        assert torch.get_num_threads() == 1
        fair.adjust()  # 0.2 and 0.2: the other job stopped
        assert torch.get_num_threads() == 2
        fair.adjust()  # 0.1 s later: too soon to look again, whatever the numbers say
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_fair_threads_changes_nothing_without_proc_stat(monkeypatch):
    monkeypatch.setattr(vh.FairThreads, "_sample", staticmethod(lambda: None))
    threads = torch.get_num_threads()
    fair = vh.FairThreads(interval=0)
    fair.adjust()
    assert torch.get_num_threads() == threads


def test_initial_weights_are_recognised(nb):
    torch.manual_seed(3)
    model = nb["VAE"](4)
    assert vh.has_initial_weights(model, 3)
    assert not vh.has_initial_weights(model, 4)
    state = torch.get_rng_state()
    with torch.no_grad():
        model.dec3.bias.add_(1e-7)
    assert not vh.has_initial_weights(model, 3)
    assert torch.equal(torch.get_rng_state(), state)  # the check leaves the global stream alone


def test_a_failed_epoch_leaves_the_state_of_the_epoch_before(nb, tmp_path):
    run = new_run(nb, tmp_path)
    data = images()
    train_epochs(nb, run, data[:128])  # 2 epochs done
    before = run.state_dict()
    weights = [p.clone() for p in run.model.parameters()]
    shuffle_state = run.generators["shuffle"].get_state()
    run.config = vh.Config(**{**CONFIG.__dict__, "epochs": 3})
    with pytest.raises(RuntimeError, match="boom") as raised:
        with run.epoch(3):
            nb["train_one_epoch"](run.model, run.optimizer, data, 64, run.generators)  # moves everything
            raise RuntimeError("boom")
    assert "Stopped in epoch 3" in raised.value.__notes__[0] and "end of epoch 2" in raised.value.__notes__[0]
    assert all(torch.equal(a, b) for a, b in zip(run.model.parameters(), weights))
    assert torch.equal(run.generators["shuffle"].get_state(), shuffle_state)
    assert run.epochs_done == 2 and run.history == before["history"]
    assert torch.load(tmp_path / "vae.pt", weights_only=True)["epoch"] == 2


def test_an_interrupt_becomes_one_message_saying_what_to_do(nb, tmp_path):
    run = new_run(nb, tmp_path)
    with pytest.raises(KeyboardInterrupt, match=r"Stopped in epoch 1; .* end of epoch 0\. Run this cell again"):
        with run.epoch(1):
            raise KeyboardInterrupt


def test_evaluation_needs_a_finished_run_of_the_same_settings(nb, tmp_path):
    torch.manual_seed(CONFIG.seed)
    model = nb["VAE"](CONFIG.latent_dim)
    with pytest.raises(vh.NotebookOrderError, match="has not been trained"):
        vh.trained_run(model, CONFIG)
    run = vh.TrainingRun(model, torch.optim.Adam(model.parameters()), CONFIG, tmp_path / "vae.pt",
                         torch.device("cpu"))
    with pytest.raises(vh.NotebookOrderError, match="0 of EPOCHS = 2"):
        vh.trained_run(model, CONFIG)
    train_epochs(nb, run, images(128))
    assert vh.trained_run(model, CONFIG) is run
    changed = vh.Config(**{**CONFIG.__dict__, "learning_rate": 1e-2})
    with pytest.raises(vh.NotebookOrderError, match=r"LEARNING_RATE: 0.001 -> 0.01.*the optimizer"):
        vh.trained_run(model, changed)
    data = vh.Split(images(10), torch.zeros(10, dtype=torch.long), {"DATA_DIR": "data", "DATASET": "fashion",
                                                                      "TRAIN_SUBSET": 0, "BINARIZE": False,
                                                                      "DEVICE": "cpu"})
    with pytest.raises(vh.NotebookOrderError, match="DATASET: 'fashion' -> 'mnist'.*the data cell"):
        vh.trained_run(model, CONFIG, data)
