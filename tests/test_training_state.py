"""The training cell's state, tested without a kernel: vh.start_or_resume / vh.save_checkpoint (the checkpoint is
the truth), the cell-order checks, and that the thread count changes no bit (issue 16).

The cells are re-enacted here in the walkthrough's pattern, with the notebook's own VAE (its layers swapped for tiny
ones: the same forward code), train_one_epoch and evaluate, on 256 random 16-pixel images: a run is a blink.
"""

import hashlib
import json
import subprocess
import sys

import pytest
import torch

import vae_helpers as vh
from conftest import NOTEBOOK, REPO, data_root

# The parameters cell's variables, as the training cell passes them (globals()).
CONFIG = dict(EPOCHS=3, BATCH_SIZE=64, LATENT_DIM=2, LEARNING_RATE=1e-3, SEED=7, DATA_DIR="data", OUT_DIR=".",
              TRAIN_SUBSET=0, DEVICE="cpu", DATASET="mnist", BETA=1.0, BINARIZE=False, RESUME=False)
PIXELS = 16


def settings(**changes):
    return {**CONFIG, **changes}


def data_cell(config=CONFIG):
    """Stand-in Splits (256 + 64 random images) carrying the data settings, as vh.load_splits returns them."""
    generator = torch.Generator().manual_seed(0)
    loaded = {name: config[name] for name in vh.DATA_SETTINGS}
    return (vh.Split(torch.rand(count, PIXELS, generator=generator), torch.zeros(count, dtype=torch.long), loaded)
            for count in (256, 64))


def model_cell(nb, config=CONFIG):
    """The model cell (a tiny VAE), then the optimizer cell."""
    torch.manual_seed(config["SEED"])
    model, hidden, latent = nb["VAE"](config["LATENT_DIM"]), 8, config["LATENT_DIM"]
    for name, sizes in dict(enc1=(PIXELS, hidden), enc2=(hidden, hidden), enc_mu=(hidden, latent),
                            enc_log_var=(hidden, latent), dec1=(latent, hidden), dec2=(hidden, hidden),
                            dec3=(hidden, PIXELS)).items():
        setattr(model, name, torch.nn.Linear(*sizes))
    return model, torch.optim.Adam(model.parameters(), lr=config["LEARNING_RATE"], fused=True)


def training_cell(nb, path, model, optimizer, config=CONFIG, interrupt_at_step=None):
    """The walkthrough's training cell (without timing); KeyboardInterrupt before optimizer step `interrupt_at_step`."""
    train, test = data_cell(config)
    steps = 0

    def step(*args, **kwargs):
        nonlocal steps
        steps += 1
        if steps == interrupt_at_step:
            raise KeyboardInterrupt
        return type(optimizer).step(optimizer, *args, **kwargs)

    optimizer.step = step
    try:
        history = vh.start_or_resume(path, model, optimizer, config, train, test)
        for _epoch in range(len(history) + 1, config["EPOCHS"] + 1):
            train_recon, train_kl = nb["train_one_epoch"](model, optimizer, train.images, config["BATCH_SIZE"],
                                                          config["BETA"], config["BINARIZE"])
            test_recon, test_kl = nb["evaluate"](model, test.images, config["BATCH_SIZE"])
            history.append(dict(train_recon=train_recon, train_kl=train_kl, test_recon=test_recon, test_kl=test_kl))
            vh.save_checkpoint(path, model, optimizer, config["EPOCHS"], history)
    finally:
        del optimizer.step
    return history, steps


def digest(value, hasher=None):
    """SHA-256 of nested dicts, lists, tensors and numbers: equal digests mean bit-identical contents."""
    hasher = hasher or hashlib.sha256()
    if isinstance(value, torch.Tensor):
        hasher.update(value.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            hasher.update(repr(key).encode()), digest(value[key], hasher)
    elif isinstance(value, list | tuple):
        for item in value:
            digest(item, hasher)
    else:
        hasher.update(repr(value).encode())
    return hasher.hexdigest()


def fingerprint(path, model):
    """The weights and every checkpoint entry but run_id (random per run), as SHA-256 digests."""
    state = torch.load(path, weights_only=True)
    return {"weights": digest(list(model.parameters()))} | {k: digest(v) for k, v in state.items() if k != "run_id"}


@pytest.fixture(scope="module")
def straight(nb, tmp_path_factory):
    """Uninterrupted runs of 3 and of 4 epochs: {epochs: (history, fingerprint, checkpoint path)}."""
    runs = {}
    for epochs in (3, 4):
        path = tmp_path_factory.mktemp(f"straight{epochs}") / "vae.pt"
        model, optimizer = model_cell(nb, settings(EPOCHS=epochs))
        history, _ = training_cell(nb, path, model, optimizer, settings(EPOCHS=epochs))
        runs[epochs] = history, fingerprint(path, model), path
    return runs


def test_a_straight_run_saves_every_epoch(straight):
    history, _, path = straight[3]
    assert len(history) == 3 and torch.load(path, weights_only=True)["history"] == history


def test_an_interrupted_run_continues_bit_identically(nb, straight, tmp_path):
    model, optimizer = model_cell(nb)
    with pytest.raises(KeyboardInterrupt):
        training_cell(nb, tmp_path / "vae.pt", model, optimizer, interrupt_at_step=6)  # epoch 2's second step
    with pytest.raises(vh.NotebookOrderError, match=r"completed 1 of EPOCHS = 3 epochs: run the training cell"):
        vh.require_trained(model, CONFIG)
    history, _ = training_cell(nb, tmp_path / "vae.pt", model, optimizer)
    assert history == straight[3][0]
    assert fingerprint(tmp_path / "vae.pt", model) == straight[3][1]
    vh.require_trained(model, CONFIG, *data_cell())


def test_training_draws_from_a_stream_of_its_own_not_the_weights_one(nb, tmp_path):
    model, optimizer = model_cell(nb)  # SEED drew the initial weights
    vh.start_or_resume(tmp_path / "vae.pt", model, optimizer, CONFIG, *data_cell())
    first_draws = torch.randn(8)  # epoch 1's first batch order and noise come from here
    torch.manual_seed(CONFIG["SEED"])
    assert not torch.equal(first_draws, torch.randn(8))


def test_running_the_cell_again_when_done_trains_nothing(nb, straight, tmp_path, capsys):
    model, optimizer = model_cell(nb)
    training_cell(nb, tmp_path / "vae.pt", model, optimizer)
    history, steps = training_cell(nb, tmp_path / "vae.pt", model, optimizer)
    assert steps == 0 and history == straight[3][0] and "nothing to train" in capsys.readouterr().out
    assert fingerprint(tmp_path / "vae.pt", model) == straight[3][1]


def test_raising_epochs_continues_like_a_longer_straight_run(nb, straight, tmp_path):
    model, optimizer = model_cell(nb)
    training_cell(nb, tmp_path / "vae.pt", model, optimizer)
    history, steps = training_cell(nb, tmp_path / "vae.pt", model, optimizer, settings(EPOCHS=4))
    assert steps == 4 and history == straight[4][0]  # one epoch of 256 images in batches of 64
    assert fingerprint(tmp_path / "vae.pt", model) == straight[4][1]


def test_resume_in_a_fresh_process_continues_from_the_file(nb, straight, tmp_path, capsys):
    model, optimizer = model_cell(nb)
    with pytest.raises(KeyboardInterrupt):
        training_cell(nb, tmp_path / "vae.pt", model, optimizer, interrupt_at_step=10)  # in epoch 3
    vh._runs.clear()  # a restarted kernel knows nothing of the run but the file
    torch.manual_seed(999)  # and its global random stream is elsewhere
    model, optimizer = model_cell(nb, settings(RESUME=True))
    history, _ = training_cell(nb, tmp_path / "vae.pt", model, optimizer, settings(RESUME=True))
    assert "resuming from" in capsys.readouterr().out
    assert history == straight[3][0] and fingerprint(tmp_path / "vae.pt", model) == straight[3][1]


def test_resume_refuses_a_checkpoint_from_other_settings_and_leaves_it(nb, straight, tmp_path):
    path = tmp_path / "vae.pt"
    path.write_bytes(straight[3][2].read_bytes())
    model, optimizer = model_cell(nb, settings(RESUME=True, LATENT_DIM=3, BETA=2.0))
    with pytest.raises(vh.CheckpointError, match=r"other settings \(LATENT_DIM: 2 -> 3; BETA: 1.0 -> 2.0\)"):
        training_cell(nb, path, model, optimizer, settings(RESUME=True, LATENT_DIM=3, BETA=2.0))
    assert path.read_bytes() == straight[3][2].read_bytes()
    state = torch.load(path, weights_only=True)
    torch.save(state | {"device": "cuda:0"}, path)  # trained on a GPU: here it would draw other noise
    model, optimizer = model_cell(nb, settings(RESUME=True))
    with pytest.raises(vh.CheckpointError, match=r"other settings \(device: 'cuda:0' -> 'cpu'\)"):
        training_cell(nb, path, model, optimizer, settings(RESUME=True))


def test_an_optimizer_of_another_model_names_the_optimizer_cell(nb, tmp_path):
    model, _ = model_cell(nb)
    _, stale_optimizer = model_cell(nb)  # the model cell was run again after the optimizer cell
    with pytest.raises(vh.NotebookOrderError, match="belongs to another `model`.*Run the optimizer cell"):
        training_cell(nb, tmp_path / "vae.pt", model, stale_optimizer)


@pytest.mark.parametrize("change", [dict(BETA=2.0), dict(LATENT_DIM=4), dict(LEARNING_RATE=1e-2)])
def test_a_changed_run_setting_names_the_model_cell_in_one_line(nb, tmp_path, change):
    model, optimizer = model_cell(nb, settings(EPOCHS=1))
    training_cell(nb, tmp_path / "vae.pt", model, optimizer, settings(EPOCHS=1))
    with pytest.raises(vh.NotebookOrderError, match=f"{next(iter(change))}: .*Run the model cell") as error:
        training_cell(nb, tmp_path / "vae.pt", model, optimizer, settings(EPOCHS=1, **change))
    assert "\n" not in str(error.value)


def test_a_changed_data_setting_names_the_data_cell(nb, tmp_path):
    model, optimizer = model_cell(nb, settings(EPOCHS=1))
    training_cell(nb, tmp_path / "vae.pt", model, optimizer, settings(EPOCHS=1))
    train, test = data_cell(settings(EPOCHS=1))
    with pytest.raises(vh.NotebookOrderError, match=r"TRAIN_SUBSET: 0 -> 100\).*Run the data cell"):
        vh.start_or_resume(tmp_path / "vae.pt", model, optimizer, settings(EPOCHS=1, TRAIN_SUBSET=100), train, test)
    with pytest.raises(vh.NotebookOrderError, match="Run the data cell"):
        vh.require_trained(model, settings(EPOCHS=1, TRAIN_SUBSET=100), test)


def test_an_untrained_model_names_the_cells_to_run(nb):
    model, _ = model_cell(nb)
    with pytest.raises(vh.NotebookOrderError, match="has not been trained: run the optimizer cell .* training cell"):
        vh.require_trained(model, CONFIG)


def test_a_checkpoint_overwritten_by_another_run_is_refused(nb, tmp_path):
    model, optimizer = model_cell(nb, settings(EPOCHS=1))
    training_cell(nb, tmp_path / "vae.pt", model, optimizer, settings(EPOCHS=1))
    other, other_optimizer = model_cell(nb, settings(EPOCHS=1))  # another notebook, the same OUT_DIR
    vh.start_or_resume(tmp_path / "vae.pt", other, other_optimizer, settings(EPOCHS=1), *data_cell())
    with pytest.raises(vh.CheckpointError, match="now holds another training run"):
        training_cell(nb, tmp_path / "vae.pt", model, optimizer, settings(EPOCHS=2))


def test_a_nan_loss_is_not_saved_and_the_previous_checkpoint_is_kept(nb, tmp_path):
    model, optimizer = model_cell(nb, settings(EPOCHS=1))
    history, _ = training_cell(nb, tmp_path / "vae.pt", model, optimizer, settings(EPOCHS=1))
    before = (tmp_path / "vae.pt").read_bytes()
    history.append(dict(history[-1], train_recon=float("nan")))
    with pytest.raises(FloatingPointError, match=r"epoch 2 .*still holds epoch 1.*LEARNING_RATE"):
        vh.save_checkpoint(tmp_path / "vae.pt", model, optimizer, 2, history)
    assert (tmp_path / "vae.pt").read_bytes() == before


# --------------------------------------------------------------------------- thread-count invariance (issue 16)

THREADS_SCRIPT = """
import hashlib, json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
import vae_helpers as vh

subnormal_before = (torch.tensor([1e-39]) * 1).item() != 0
vh.configure_torch(fair_threads=False)  # the thread counts are the test's to set
nb = vh.load_notebook_definitions(sys.argv[2])
root = sys.argv[3]
if not vh.missing_files(root, "mnist"):
    train, test, _ = vh.load_dataset(root, "mnist", "cpu", allow_download=False)
    images = train.images[:3000]
else:
    images = torch.rand(3000, 784, generator=torch.Generator().manual_seed(0))
results = {}
for variant in ("1", "2", "switching"):
    torch.set_num_threads(2 if variant == "2" else 1)
    steps = 0
    def switch(*_):
        global steps
        steps += 1
        if variant == "switching" and steps % 3 == 0:
            torch.set_num_threads(3 - torch.get_num_threads())
    hook = register_optimizer_step_pre_hook(switch)
    torch.manual_seed(1)
    model = nb["VAE"](20)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)  # as the walkthrough builds it
    losses = nb["train_one_epoch"](model, optimizer, images, 128) + nb["evaluate"](model, images[:256], 128)
    hook.remove()
    weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    results[variant] = {"losses": losses, "weights": weights}
print(json.dumps({"results": results, "mkl_cbwr": os.environ.get("MKL_CBWR"), "mode": vh.mkl_cbwr_mode(),
                  "subnormal_before": subnormal_before, "flushed_after": (torch.tensor([1e-39]) * 1).item() == 0}))
"""


def test_the_thread_count_changes_no_bit(tmp_path):
    """One epoch on 3,000 images at 1 thread, at 2, and switching every 3 steps (as FairThreads does when the cores
    are shared), in a fresh process: MKL reads MKL_CBWR at its first call. On CPUs whose matrix products happen to
    agree anyway (this project's AMD EPYC) the mode check still fails without the setting: run this test with
    `MKL_CBWR=` (empty, which configure_torch leaves alone) to see it fail as the code before issue 16 did."""
    script = tmp_path / "threads.py"
    script.write_text(THREADS_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(REPO), str(NOTEBOOK), str(data_root())], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["subnormal_before"] and report["flushed_after"], "configure_torch did not flush subnormals to zero"
    cause = (f"CPU: {vh.cpu_name()}; MKL_CBWR={report['mkl_cbwr']!r}; MKL mode {report['mode']!r}. Without MKL's "
             "strict conditional numerical reproducibility (MKL_CBWR=AUTO,STRICT, which vh.configure_torch sets "
             "before the first matrix product) a product's last bits may depend on the thread count, as they do on "
             "Intel Xeons with AVX-512; without MKL (another BLAS) nothing promises they do not.")
    if report["mode"] is None:
        pytest.skip("torch has no MKL here: nothing promises the same bits at any thread count (README)")
    assert report["mode"] == vh.MKL_CBWR_AUTO_STRICT, f"MKL's strict CNR mode is off. {cause}"
    differing = [v for v in ("2", "switching") if report["results"][v] != report["results"]["1"]]
    assert not differing, f"{' and '.join(differing)} thread(s) gave other losses or weights than 1 thread. {cause}"
