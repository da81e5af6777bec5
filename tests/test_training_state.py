"""The walkthrough's own training cell, run without a kernel on a tiny VAE and 256 random 16-pixel images, with the
cell-order checks (an interrupt and a kill -9 need a kernel: test_kernel_sessions.py); threads change no bit."""

import json
import subprocess
import sys
import time

import nbformat
import pytest
import torch
from torch.testing import assert_close

import vae_helpers as vh
from conftest import NOTEBOOK, REPO, data_root, losses, require_strict_mkl, tiny_vae

pytestmark = pytest.mark.usefixtures("one_thread")

# The parameters cell's variables, in a quick configuration.
CONFIG = dict(EPOCHS=3, BATCH_SIZE=64, LATENT_DIM=2, LEARNING_RATE=1e-3, SEED=7, DATA_DIR="data",
              TRAIN_SUBSET=0, DEVICE="cpu", DATASET="mnist", BETA=1.0, BINARIZE=False, RESUME=False, PRETRAINED=False)
CELLS = [cell.source for cell in nbformat.read(NOTEBOOK, as_version=4).cells if cell.cell_type == "code"]
TRAINING_CELL, OPTIMIZER_CELL = (next(s for s in CELLS if m in s) for m in ("vh.start_or_resume(", "torch.optim."))


def data_cell(config=CONFIG):
    """Stand-in Splits (256 + 64 random images) recording the data settings, as vh.load_splits returns them."""
    generator = torch.Generator().manual_seed(0)
    loaded = {name: config[name] for name in vh.DATA_SETTINGS}
    return [vh.Split(torch.rand(count, 16, generator=generator), torch.zeros(count, dtype=torch.long), loaded)
            for count in (256, 64)]


def optimizer_cell(model, config=CONFIG):
    """Execute the walkthrough's optimizer cell for `model`: the optimizer it builds."""
    exec(OPTIMIZER_CELL, namespace := {"torch": torch, "model": model, "LEARNING_RATE": config["LEARNING_RATE"]})
    return namespace["optimizer"]


def model_cell(nb, config=CONFIG):
    """The model cell (a tiny VAE seeded with SEED), then the optimizer cell."""
    model = tiny_vae(nb, latent_dim=config["LATENT_DIM"], seed=config["SEED"])
    return model, optimizer_cell(model, config)


def training_cell(nb, out_dir, model, optimizer, config=CONFIG, data=None):
    """Execute the walkthrough's training cell on these objects: (history, optimizer steps taken)."""
    train, test = data or data_cell(config)
    steps = []
    hook = optimizer.register_step_pre_hook(lambda *_: steps.append(1))
    namespace = {**nb, "OUT_DIR": str(out_dir), **config, "vh": vh, "torch": torch, "time": time, "out_dir": out_dir,
                 "model": model, "optimizer": optimizer, "train": train, "test": test}
    try:
        exec(TRAINING_CELL, namespace)
    finally:
        hook.remove()
    return namespace["history"], len(steps)


def saved(out_dir):
    """What a run leaves in vae.pt and model.pt: weights, Adam's state, every epoch's losses, the settings."""
    checkpoint, finished = (torch.load(out_dir / name, weights_only=True) for name in ("vae.pt", "model.pt"))
    config = {key: value for key, value in checkpoint["config"].items() if key != "OUT_DIR"}
    return {"weights": checkpoint["model"], "adam": checkpoint["optimizer"]["state"], "finished": finished["model"],
            "history": losses(checkpoint["history"]), "finished history": losses(finished["history"]), "config": config,
            "finished keys": sorted(finished)}


def assert_same_run(out_dir, expected):
    """`out_dir` holds the run `expected` (as saved() reads it) bit for bit."""
    actual, tensors = saved(out_dir), ("weights", "adam", "finished")
    assert_close({k: actual.pop(k) for k in tensors}, {k: expected[k] for k in tensors}, rtol=0, atol=0)
    assert actual == {k: v for k, v in expected.items() if k not in tensors}


@pytest.fixture(scope="module")
def straight(nb, tmp_path_factory):
    """Uninterrupted runs of 3 and of 4 epochs: {epochs: what they saved}."""
    out_dirs = {epochs: tmp_path_factory.mktemp(f"straight{epochs}") for epochs in (3, 4)}
    for epochs, out_dir in out_dirs.items():
        training_cell(nb, out_dir, *model_cell(nb), dict(CONFIG, EPOCHS=epochs))
    return {epochs: saved(out_dir) for epochs, out_dir in out_dirs.items()}


def test_a_run_saves_every_epoch_and_then_the_model_alone(straight):
    run = straight[3]
    assert len(run["history"]) == 3 and run["adam"] and run["finished history"] == run["history"]
    assert_close(run["finished"], run["weights"], rtol=0, atol=0)
    assert run["finished keys"] == sorted(vh.MODEL_KEYS)  # the weights and the run's record: no optimizer


def test_the_cell_run_again_trains_nothing_and_more_epochs_continue_as_a_longer_run(nb, straight, tmp_path, capsys):
    model, optimizer = model_cell(nb)
    training_cell(nb, tmp_path, model, optimizer)
    _, steps = training_cell(nb, tmp_path, model, optimizer)
    assert steps == 0 and "nothing to train" in capsys.readouterr().out
    assert_same_run(tmp_path, straight[3])
    _, steps = training_cell(nb, tmp_path, model, optimizer, dict(CONFIG, EPOCHS=4))
    assert steps == 4  # one epoch of 256 images in batches of 64
    assert_same_run(tmp_path, straight[4])
    (tmp_path / "model.pt").unlink()  # as if the kernel died between the two writes of the last epoch
    training_cell(nb, tmp_path, model, optimizer, dict(CONFIG, EPOCHS=4))
    assert_same_run(tmp_path, straight[4])  # written again
    with pytest.raises(vh.NotebookOrderError, match="holds 4 epochs, more than EPOCHS = 3. Raise EPOCHS again"):
        training_cell(nb, tmp_path, model, optimizer)


@pytest.mark.parametrize("cells", ["model and optimizer", "optimizer"])
def test_the_model_or_optimizer_cell_run_again_gives_the_same_result(nb, straight, tmp_path, cells):
    model, optimizer = model_cell(nb)
    training_cell(nb, tmp_path, model, optimizer)
    if cells == "model and optimizer":
        model, optimizer = model_cell(nb)
    else:
        optimizer = optimizer_cell(model)
    _, steps = training_cell(nb, tmp_path, model, optimizer)
    assert steps == 0 and optimizer.state  # Adam's state came back from the checkpoint
    assert_close(model.state_dict(), straight[3]["weights"], rtol=0, atol=0)
    vh.require_trained(model, dict(CONFIG, OUT_DIR=str(tmp_path)), *data_cell())


def test_an_untrained_model_or_an_optimizer_of_another_model_names_the_cell_to_run(nb, tmp_path):
    model, _ = model_cell(nb)
    with pytest.raises(vh.NotebookOrderError, match="has not finished training: run the training cell"):
        vh.require_trained(model, dict(CONFIG, OUT_DIR=str(tmp_path)))
    _, stale_optimizer = model_cell(nb)  # the model cell was run again after the optimizer cell
    with pytest.raises(vh.NotebookOrderError, match="belongs to another `model`.*Run the optimizer cell"):
        training_cell(nb, tmp_path, model, stale_optimizer)
    with pytest.raises(vh.NotebookOrderError, match="OUT_DIR changed after the setup cell"):
        training_cell(nb, tmp_path, *model_cell(nb), dict(CONFIG, OUT_DIR=str(tmp_path / "elsewhere")))
    with pytest.raises(vh.NotebookOrderError, match="DEVICE changed after the setup cell .* chose meta"):
        vh.require_trained(tiny_vae(nb).to("meta"), dict(CONFIG, OUT_DIR=str(tmp_path)))  # DEVICE = 'cpu'


@pytest.mark.parametrize(("change", "cell"), [(dict(BETA=2.0), "model"), (dict(LATENT_DIM=4), "model"),
                                              (dict(LEARNING_RATE=1e-2), "model"), (dict(TRAIN_SUBSET=100), "data")])
def test_a_changed_setting_is_refused_in_one_line_naming_it_and_the_cell(nb, tmp_path, change, cell):
    model, optimizer = model_cell(nb, dict(CONFIG, EPOCHS=1))
    data = data_cell()
    training_cell(nb, tmp_path, model, optimizer, dict(CONFIG, EPOCHS=1), data)
    changed = dict(CONFIG, EPOCHS=1, OUT_DIR=str(tmp_path), **change)
    pattern = f"{next(iter(change))}: .*Run the {cell} cell"
    with pytest.raises(vh.NotebookOrderError, match=pattern) as error:
        training_cell(nb, tmp_path, model, optimizer, changed, data)
    with pytest.raises(vh.NotebookOrderError, match=pattern):
        vh.require_trained(model, changed, *data)  # the loss-curve and samples cells
    assert "\n" not in str(error.value)


def test_after_a_changed_setting_the_model_and_optimizer_cells_start_a_new_run(nb, tmp_path, capsys):
    training_cell(nb, tmp_path, *model_cell(nb))
    assert "it replaces" not in capsys.readouterr().out  # no model.pt yet
    model, optimizer = model_cell(nb, dict(CONFIG, BETA=2.0))
    history, steps = training_cell(nb, tmp_path, model, optimizer, dict(CONFIG, BETA=2.0))
    assert steps == 12 and len(history) == 3 and f"it replaces {tmp_path / 'model.pt'}" in capsys.readouterr().out
    assert torch.load(tmp_path / "model.pt", weights_only=True)["config"]["BETA"] == 2.0


def test_a_checkpoint_another_process_wrote_is_refused_and_replaced_only_afresh(nb, tmp_path, monkeypatch, capsys):
    model, optimizer = model_cell(nb)
    training_cell(nb, tmp_path, model, optimizer)
    monkeypatch.setattr(vh, "_this_process", lambda: "another notebook")  # as if another kernel wrote vae.pt last
    training_cell(nb, tmp_path, *model_cell(nb, dict(CONFIG, EPOCHS=1)), dict(CONFIG, EPOCHS=1))
    monkeypatch.undo()
    with pytest.raises(vh.NotebookOrderError, match="holds trained weights, and .*vae.pt does not hold their run"):
        training_cell(nb, tmp_path, model, optimizer, dict(CONFIG, EPOCHS=4))
    _, steps = training_cell(nb, tmp_path, *model_cell(nb))  # a fresh model, RESUME = False: a new run
    torch.save({"model": {}, "run_id": "an older release's"}, tmp_path / "vae.pt")
    assert steps == 12 and training_cell(nb, tmp_path, *model_cell(nb))[1] == 12  # replaced by a new run


def test_resume_refuses_a_checkpoint_from_other_settings_or_device_and_leaves_it(nb, tmp_path, monkeypatch):
    training_cell(nb, tmp_path, *model_cell(nb))
    before = (tmp_path / "vae.pt").read_bytes()
    resume = dict(CONFIG, RESUME=True, LATENT_DIM=3, BETA=2.0)
    with pytest.raises(vh.CheckpointError, match=r"other settings \(LATENT_DIM: 2 -> 3"):  # this kernel's file too
        training_cell(nb, tmp_path, *model_cell(nb, resume), resume)
    monkeypatch.setattr(vh, "_this_process", lambda: "a new kernel")
    with pytest.raises(vh.CheckpointError, match=r"other settings \(LATENT_DIM: 2 -> 3; BETA: 1.0 -> 2.0\)"):
        training_cell(nb, tmp_path, *model_cell(nb, resume), resume)
    assert (tmp_path / "vae.pt").read_bytes() == before
    torch.save(torch.load(tmp_path / "vae.pt", weights_only=True) | {"device": "cuda:0"}, tmp_path / "vae.pt")
    with pytest.raises(vh.CheckpointError, match=r"other settings \(device: 'cuda:0' -> 'cpu'\)"):
        training_cell(nb, tmp_path, *model_cell(nb), dict(CONFIG, RESUME=True))


def test_pretrained_loads_the_finished_model_and_trains_nothing(nb, straight, tmp_path, capsys):
    training_cell(nb, tmp_path, *model_cell(nb))
    (tmp_path / "vae.pt").unlink()  # only model.pt, as in a fresh copy of the project
    model, optimizer = model_cell(nb)
    history, steps = training_cell(nb, tmp_path, model, optimizer, dict(CONFIG, PRETRAINED=True))
    assert steps == 0 and losses(history) == straight[3]["history"] and "PRETRAINED" in capsys.readouterr().out
    assert_close(model.state_dict(), straight[3]["finished"], rtol=0, atol=0)
    vh.require_trained(model, dict(CONFIG, OUT_DIR=str(tmp_path), PRETRAINED=True), *data_cell())
    with pytest.raises(vh.CheckpointError, match=r"other settings \(EPOCHS: 3 -> 5\).*PRETRAINED = False"):
        training_cell(nb, tmp_path, *model_cell(nb), dict(CONFIG, PRETRAINED=True, EPOCHS=5))
    with pytest.raises(vh.NotebookOrderError, match="holds trained weights.*Run the model cell"):
        training_cell(nb, tmp_path, model, optimizer)  # PRETRAINED = False, without the model cell: no new run from it
    with pytest.raises(vh.CheckpointError, match="Cannot read .*model.pt.*outputs/ holds the committed run's"):
        training_cell(nb, tmp_path / "elsewhere", *model_cell(nb), dict(CONFIG, PRETRAINED=True))


def test_a_nan_loss_is_not_saved_and_the_previous_checkpoint_is_kept(nb, tmp_path):
    model, optimizer = model_cell(nb, dict(CONFIG, EPOCHS=1))
    history, _ = training_cell(nb, tmp_path, model, optimizer, dict(CONFIG, EPOCHS=1))
    before = (tmp_path / "vae.pt").read_bytes()
    history.append(dict(history[-1], train_recon=float("nan")))
    with pytest.raises(FloatingPointError, match=r"epoch 2, not saved: .*still holds epoch 1.*LEARNING_RATE"):
        vh.save_checkpoint(tmp_path / "vae.pt", model, optimizer, history, dict(CONFIG, EPOCHS=2))
    assert (tmp_path / "vae.pt").read_bytes() == before


THREADS_SCRIPT = """
import itertools, json, sys
sys.path.insert(0, sys.argv[1])
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
import vae_helpers as vh

subnormal_before = (torch.tensor([1e-39]) * 1).item() != 0
vh.configure_torch(fair_threads=False)  # the thread counts are the test's to set
nb = vh.load_notebook_definitions(sys.argv[2])
images = torch.rand(3000, 784, generator=torch.Generator().manual_seed(0))  # stand-ins where MNIST is not on disk
if not vh.missing_files(sys.argv[3], "mnist"):
    images = vh.load_splits(sys.argv[3], "mnist", "cpu", allow_download=False)[0].images[:3000]
results = {}
for variant in ("1", "2", "switching"):
    torch.set_num_threads(2 if variant == "2" else 1)
    steps = itertools.count(1)
    def switch(*_):
        if variant == "switching" and next(steps) % 3 == 0:
            torch.set_num_threads(3 - torch.get_num_threads())
    hook = register_optimizer_step_pre_hook(switch)
    torch.manual_seed(1)
    model = nb["VAE"](20)
    exec(sys.argv[5], namespace := {"torch": torch, "model": model, "LEARNING_RATE": 1e-3})  # the optimizer cell
    optimizer = namespace["optimizer"]
    results[variant] = nb["train_one_epoch"](model, optimizer, images, 128) + nb["evaluate"](model, images[:256], 128)
    hook.remove()
    torch.save(model.state_dict(), f"{sys.argv[4]}/{variant}.pt")
print(json.dumps({"results": results, "mode": vh.mkl_cbwr_mode(), "subnormal_before": subnormal_before,
                  "flushed_after": (torch.tensor([1e-39]) * 1).item() == 0}))
"""


def test_the_thread_count_changes_no_bit(tmp_path):
    """One epoch at 1 thread, at 2, and switching every 3 steps (as FairThreads does): the same bits."""
    # In a fresh process: MKL reads MKL_CBWR at its first call. With `MKL_CBWR=` (empty, which configure_torch leaves
    # alone) it fails, as the code before MKL's strict mode did.
    require_strict_mkl()
    done = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(REPO), str(NOTEBOOK), str(data_root()),
                           str(tmp_path), OPTIMIZER_CELL], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["subnormal_before"] and report["flushed_after"], "configure_torch did not flush subnormals to zero"
    cause = (f"CPU: {vh.library_versions()['cpu']}; MKL mode {report['mode']!r}. Without MKL's strict conditional "
             "numerical reproducibility (MKL_CBWR=AUTO,STRICT, which vh.configure_torch sets before the first matrix "
             "product) a product's last bits may depend on the thread count, as they do on Intel Xeons with AVX-512.")
    assert report["mode"] == vh.MKL_CBWR_AUTO_STRICT, f"MKL's strict CNR mode is off. {cause}"
    for variant in ("2", "switching"):
        assert report["results"][variant] == report["results"]["1"], f"{variant}: {cause}"
        weights = [torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in ("1", variant)]
        assert_close(weights[1], weights[0], rtol=0, atol=0, msg=lambda text, variant=variant: f"{variant}: {cause}")


def test_under_ci_a_hidden_mkl_symbol_fails_the_thread_tests_by_name(monkeypatch):
    """The thread tests begin with require_strict_mkl: a torch whose MKL lacks the symbol must fail them under CI."""
    monkeypatch.setattr(vh.ctypes, "CDLL", lambda path: object())  # a libtorch_cpu without mkl_serv_cbwr_get
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="mkl_serv_cbwr_get.*CI is set"):
        require_strict_mkl()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="mkl_serv_cbwr_get"):
        require_strict_mkl()
