"""Unit tests of vae_helpers: configuration, data finding and checking, batches, artifacts, checkpoints."""

import errno
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

import vae_helpers as vh
from conftest import NOTEBOOK, REPO, snapshot

DEFAULTS = dict(
    EPOCHS=20, BATCH_SIZE=128, LATENT_DIM=20, LEARNING_RATE=1e-3, SEED=1234, DATA_DIR="data", OUT_DIR=".",
    TRAIN_SUBSET=0, DEVICE="auto", DATASET="mnist", BETA=1.0, BINARIZE=False, RESUME=False,
)


# --------------------------------------------------------------------------- configuration


def test_defaults_pass_through_unchanged():
    config = vh.read_config(DEFAULTS, environ={})
    assert config.as_dict() == DEFAULTS


def test_environment_overrides_are_parsed():
    environ = {"VAE_EPOCHS": "3", "VAE_LEARNING_RATE": "5e-4", "VAE_TRAIN_SUBSET": "0", "VAE_DEVICE": "CPU",
               "VAE_RESUME": "yes", "VAE_DATA_DIR": "/srv/mnist", "VAE_DATASET": "fashion", "PATH": "/bin"}
    config = vh.read_config(DEFAULTS, environ)
    assert (config.epochs, config.learning_rate, config.train_subset) == (3, 5e-4, 0)
    assert (config.device, config.resume, config.data_dir, config.dataset) == ("cpu", True, "/srv/mnist", "fashion")


@pytest.mark.parametrize("value", ["abc", "0", "-3", "2.5", ""])
def test_bad_epochs_names_the_variable_and_what_it_accepts(value):
    with pytest.raises(vh.ConfigError) as error:
        vh.read_config(DEFAULTS, {"VAE_EPOCHS": value})
    assert "VAE_EPOCHS" in str(error.value) and "a whole number >= 1" in str(error.value)


@pytest.mark.parametrize(
    ("name", "value", "accepts"),
    [("VAE_DEVICE", "tpu", "auto, cpu, cuda"), ("VAE_LEARNING_RATE", "0", "> 0"), ("VAE_LEARNING_RATE", "nan", "> 0"),
     ("VAE_DATASET", "cifar", "mnist or fashion"), ("VAE_RESUME", "maybe", "0 or 1"), ("VAE_SEED", "-1", ">= 0")],
)
def test_other_bad_values_are_refused(name, value, accepts):
    with pytest.raises(vh.ConfigError, match=name) as error:
        vh.read_config(DEFAULTS, {name: value})
    assert accepts in str(error.value)


def test_bad_value_in_the_parameters_cell_is_reported_as_such():
    with pytest.raises(vh.ConfigError, match="parameter BATCH_SIZE=0 .from the parameters cell or papermill"):
        vh.read_config(dict(DEFAULTS, BATCH_SIZE=0), {})


def test_unknown_vae_variable_is_refused_rather_than_ignored():
    with pytest.raises(vh.ConfigError, match="VAE_EPOCH'"):
        vh.read_config(DEFAULTS, {"VAE_EPOCH": "1"})  # a typo would otherwise silently train 20 epochs


def test_explicit_unavailable_device_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(vh.ConfigError, match="no CUDA GPU"):
        vh.choose_device("cuda")
    assert vh.choose_device("auto").type in ("cpu", "mps")


# --------------------------------------------------------------------------- data


def write_idx(path, array):
    """Write a uint8 array as an IDX file (the MNIST format): magic, dimensions, then the bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_mnist(tmp_path):
    """A 5 + 3 image MNIST in tmp_path, in torchvision's layout; returns (root, expected_files)."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 5), ("t10k", 3)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, count))
    expected = {p.name: (p.stat().st_size, vh.sha256_of(p)) for p in raw.iterdir()}
    return tmp_path, expected


def test_loads_synthetic_idx_files_as_float_tensors_in_unit_range(tiny_mnist):
    root, expected = tiny_mnist
    train, test, classes = vh.load_dataset(root, "mnist", "cpu", allow_download=False, expected_files=expected)
    assert train.images.shape == (5, 784) and test.images.shape == (3, 784)
    assert train.images.dtype == torch.float32 and 0 <= train.images.min() and train.images.max() <= 1
    raw = np.frombuffer((root / "MNIST/raw/train-images-idx3-ubyte").read_bytes()[16:], np.uint8)
    assert torch.equal(train.images.flatten(), torch.from_numpy(raw.astype(np.float32) / 255))  # = ToTensor()
    assert train.labels.dtype == torch.int64 and len(classes) == 10


def test_missing_file_message_names_folder_files_and_variable(tiny_mnist):
    root, expected = tiny_mnist
    (root / "MNIST/raw/t10k-labels-idx1-ubyte").unlink()
    before = snapshot(root)
    with pytest.raises(vh.DataError) as error:
        vh.load_dataset(root, "mnist", "cpu", allow_download=False, expected_files=expected)
    message = str(error.value)
    assert str(root / "MNIST" / "raw") in message and "VAE_DATA_DIR" in message
    assert all(name in message for name in vh.MNIST_FILES)
    assert snapshot(root) == before


def test_failed_download_becomes_a_clear_message(tmp_path, monkeypatch):
    from torchvision import datasets

    def no_network(self):
        raise URLError("Name or service not known")

    monkeypatch.setattr(datasets.MNIST, "download", no_network)  # and so nothing is fetched
    with pytest.raises(vh.DataError) as error:
        vh.load_dataset(tmp_path, "mnist", "cpu", allow_download=True)
    message = str(error.value)
    assert "download failed" in message and "Name or service not known" in message and "VAE_DATA_DIR" in message


def test_truncated_file_is_named_and_left_alone(tiny_mnist):
    root, expected = tiny_mnist
    path = root / "MNIST/raw/train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:100])
    before = snapshot(root)
    with pytest.raises(vh.DataError, match="train-images-idx3-ubyte is 100 bytes") as error:
        vh.load_dataset(root, "mnist", "cpu", allow_download=False, expected_files=expected)
    assert "Delete the file" in str(error.value) and "VAE_DATA_DIR" in str(error.value)
    assert snapshot(root) == before


def test_altered_file_fails_its_checksum(tiny_mnist):
    root, expected = tiny_mnist
    path = root / "MNIST/raw/t10k-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    before = snapshot(root)
    with pytest.raises(vh.DataError, match="t10k-images-idx3-ubyte has the right size but the wrong SHA-256"):
        vh.load_dataset(root, "mnist", "cpu", allow_download=False, expected_files=expected)
    assert snapshot(root) == before


def test_known_digests_match_the_shared_checksum_list():
    sums = REPO.parent / "shared" / "data" / "MNIST" / "SHA256SUMS"
    if not sums.exists():
        pytest.skip(f"no {sums} to compare with")
    listed = dict(reversed(line.split()) for line in sums.read_text().splitlines() if line.strip())
    assert listed == {name: digest for name, (_, digest) in vh.MNIST_FILES.items()}


# --------------------------------------------------------------------------- batches


def test_shuffled_batches_cover_every_row_once_in_a_seeded_order():
    images = torch.arange(300.0).unsqueeze(1)
    batches = list(vh.shuffled_batches(images, 128, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [128, 128, 44]
    assert sorted(torch.cat(batches).flatten().tolist()) == list(range(300))
    again = list(vh.shuffled_batches(images, 128, torch.Generator().manual_seed(0)))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert not torch.equal(torch.cat(batches), images)


def test_check_finite_names_the_first_bad_batch():
    losses = torch.tensor([[1.0, 2.0], [3.0, 4.0], [float("nan"), 1.0], [float("inf"), 1.0]])
    vh.check_finite(losses[:2], epoch=3)
    with pytest.raises(FloatingPointError, match="epoch 3, batch 3"):
        vh.check_finite(losses, epoch=3)


# --------------------------------------------------------------------------- artifacts


def test_image_grid_of_64_digits_is_242_pixels_square(tmp_path):
    path = vh.save_image_grid(torch.rand(64, 784), tmp_path / "samples.png", nrow=8)
    with Image.open(path) as image:
        assert image.size == (242, 242) and image.format == "PNG"
    assert list(tmp_path.iterdir()) == [path]


def test_metrics_are_written_as_json(tmp_path):
    metrics = {"final_test_loss": 100.25, "history": {"test_recon": [120.0, 95.5]}}
    path = vh.write_json(metrics, tmp_path / "metrics.json")
    assert json.loads(path.read_text()) == metrics


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = vh.write_json({"good": True}, tmp_path / "metrics.json")
    with pytest.raises(TypeError):
        vh.write_json({"bad": object()}, path)  # not JSON-serialisable: fails mid-write
    assert json.loads(path.read_text()) == {"good": True}
    assert list(tmp_path.iterdir()) == [path]


def test_out_dir_is_created_or_refused_before_any_work(tmp_path):
    assert vh.prepare_out_dir(tmp_path / "a" / "b").is_dir()
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    with pytest.raises(OSError, match="cannot be written to.*VAE_OUT_DIR"):
        vh.prepare_out_dir(blocker / "out")
    assert blocker.read_text() == "keep me"


# --------------------------------------------------------------------------- full disks


WRITERS = {  # name -> a function that writes that artifact into a folder; all four paths the notebook uses
    "metrics.json": lambda folder: vh.write_json({"final_test_loss": 99.5}, folder / "metrics.json"),
    "loss_curves.png": lambda folder: vh.save_figure(plt_figure(), folder / "loss_curves.png"),
    "samples.png": lambda folder: vh.save_image_grid(torch.rand(64, 784), folder / "samples.png", nrow=8),
    "vae.pt": lambda folder: vh.save_checkpoint(make_checkpoint(DEFAULTS, width=100), folder / "vae.pt"),
}


def plt_figure():
    """A small matplotlib figure, made without pyplot (so no display or backend is involved)."""
    from matplotlib.figure import Figure

    figure = Figure()
    figure.add_subplot().plot([3, 1, 2])
    return figure


def assert_explains_full_disk(error, path, wording="disk is full"):
    """The DiskFullError names the problem, the file, the folder, the space needed and free, and the fix."""
    message = str(error)
    assert isinstance(error, OSError) and error.filename == str(path)
    assert wording in message and "free" in message and " MB" in message, message
    assert path.name in message and str(path.parent) in message and "VAE_OUT_DIR" in message, message


def fail_fsync_with(monkeypatch, code):
    """Make os.fsync raise OSError(code): the disk reports it is full after the bytes went to the temp file."""
    seen = []

    def fsync(fd):
        seen.append(os.fstat(fd).st_size)  # a partly (here wholly) written temporary file exists at this point
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


@pytest.mark.parametrize("name", WRITERS)
def test_injected_full_disk_is_explained_and_the_old_file_kept(tmp_path, monkeypatch, name):
    WRITERS[name](tmp_path)  # the previous run's good file
    for other in WRITERS:
        if other != name:
            WRITERS[other](tmp_path)
    before = snapshot(tmp_path)
    seen = fail_fsync_with(monkeypatch, errno.ENOSPC)
    with pytest.raises(vh.DiskFullError) as error:
        WRITERS[name](tmp_path)
    assert seen and seen[0] > 0 and error.value.errno == errno.ENOSPC
    assert_explains_full_disk(error.value, tmp_path / name)
    assert f"{name} is {vh._format_bytes(seen[0])}" in str(error.value)  # sized from what was being written
    assert snapshot(tmp_path) == before  # every old file whole, and no temporary file left


@pytest.mark.skipif(not hasattr(errno, "EDQUOT"), reason="this platform has no EDQUOT")
def test_injected_quota_is_called_a_quota(tmp_path, monkeypatch):
    fail_fsync_with(monkeypatch, errno.EDQUOT)
    with pytest.raises(vh.DiskFullError) as error:
        vh.write_json({"final_test_loss": 99.5}, tmp_path / "metrics.json")
    assert error.value.errno == errno.EDQUOT
    assert_explains_full_disk(error.value, tmp_path / "metrics.json", wording="over your disk quota")
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_are_not_called_a_full_disk(tmp_path, monkeypatch):
    fail_fsync_with(monkeypatch, errno.EIO)
    with pytest.raises(OSError) as error:
        vh.write_json({}, tmp_path / "metrics.json")
    assert not isinstance(error.value, vh.DiskFullError) and error.value.errno == errno.EIO
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A function that mounts a real tmpfs of the given size (e.g. '256k') and returns it; root on Linux only."""
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root on Linux")
    mounted = []

    def mount(size):
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:  # e.g. a container without CAP_SYS_ADMIN
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def test_real_full_disk_stops_the_json_write_and_keeps_the_old_file(small_disk):
    disk = small_disk("256k")
    path = vh.write_json({"final_test_loss": 99.5}, disk / "metrics.json")
    before = snapshot(disk)
    with pytest.raises(vh.DiskFullError) as error:
        vh.write_json({"values": list(range(100_000))}, path)  # about 1.3 MB of JSON
    assert error.value.errno == errno.ENOSPC
    assert_explains_full_disk(error.value, path)
    assert snapshot(disk) == before


def test_real_full_disk_stops_torch_save_and_keeps_the_old_checkpoint(small_disk):
    disk = small_disk("512k")
    path = vh.save_checkpoint(make_checkpoint(DEFAULTS), disk / "vae.pt")
    before = snapshot(disk)
    with pytest.raises(vh.DiskFullError) as error:  # plain torch.save says "RuntimeError: ... unexpected pos"
        vh.save_checkpoint(make_checkpoint(DEFAULTS, width=500), path)  # 1.0 MB of weights
    assert error.value.errno == errno.ENOSPC
    assert_explains_full_disk(error.value, path)
    assert "vae.pt is 1.0 MB" in str(error.value) and "needs about 4.0 MB free" in str(error.value)
    assert snapshot(disk) == before
    assert vh.load_checkpoint(path, DEFAULTS)["epoch"] == 2  # still resumable


def test_nearly_full_out_dir_is_warned_about_before_training(tmp_path, monkeypatch):
    disk_usage = type(shutil.disk_usage(tmp_path))
    assert vh.prepare_out_dir(tmp_path / "roomy", needed_bytes=1).is_dir()  # no warning: pytest.ini shows any
    cramped = disk_usage(total=10**9, used=10**9 - 5 * 10**6, free=5 * 10**6)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: cramped)
    with pytest.warns(vh.LowDiskSpaceWarning, match=r"only 5\.0 MB free.*about 28\.0 MB.*VAE_OUT_DIR"):
        assert vh.prepare_out_dir(tmp_path / "cramped").is_dir()


def test_checkpoint_size_estimate_matches_the_notebooks_model():
    nb = vh.load_notebook_definitions(NOTEBOOK)
    torch.manual_seed(0)
    model = nb["VAE"](latent_dim=DEFAULTS["LATENT_DIM"])
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.rand(4, 784))[0].sum().backward()
    optimizer.step()  # Adam's moment estimates exist from the first step on
    history = {key: [100.0] * 20 for key in ("train_recon", "train_kl", "test_recon", "test_kl")}
    state = make_checkpoint(DEFAULTS) | {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                         "history": history}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert abs(len(buffer.getvalue()) - vh.CHECKPOINT_BYTES_AT_DEFAULTS) < 0.02 * vh.CHECKPOINT_BYTES_AT_DEFAULTS


# --------------------------------------------------------------------------- checkpoints


def make_checkpoint(config_dict, width=3):
    """A small but complete checkpoint dict (width*width*12 bytes of weights and Adam state, roughly)."""
    model = torch.nn.Linear(width, width if width > 3 else 2)
    optimizer = torch.optim.Adam(model.parameters())
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2, "config": config_dict,
            "history": {"test_recon": [1.5, 1.25]}, "train_seconds": 3.5,
            "rng": vh.capture_rng_state({"shuffle": torch.Generator().manual_seed(1)})}


def test_checkpoint_round_trip_and_rng_restore(tmp_path):
    generator = torch.Generator().manual_seed(5)
    state = make_checkpoint(DEFAULTS) | {"rng": vh.capture_rng_state({"shuffle": generator})}
    expected_draws = torch.rand(3, generator=generator)
    vh.save_checkpoint(state, tmp_path / "vae.pt")
    loaded = vh.load_checkpoint(tmp_path / "vae.pt", DEFAULTS)
    assert loaded["epoch"] == 2 and loaded["history"] == state["history"]
    vh.restore_rng_state(loaded["rng"], {"shuffle": generator})
    assert torch.equal(expected_draws, torch.rand(3, generator=generator))


def test_checkpoint_from_other_settings_is_refused_with_the_differences(tmp_path):
    path = vh.save_checkpoint(make_checkpoint(DEFAULTS), tmp_path / "vae.pt")
    before = path.read_bytes()
    with pytest.raises(vh.CheckpointError, match="LATENT_DIM: checkpoint 20, now 2.*VAE_RESUME=0"):
        vh.load_checkpoint(path, dict(DEFAULTS, LATENT_DIM=2))
    vh.load_checkpoint(path, dict(DEFAULTS, EPOCHS=30, OUT_DIR="elsewhere"))  # may extend the same run
    assert path.read_bytes() == before


def test_truncated_checkpoint_is_refused_and_kept(tmp_path):
    path = vh.save_checkpoint(make_checkpoint(DEFAULTS), tmp_path / "vae.pt")
    path.write_bytes(path.read_bytes()[:2000])
    before = path.read_bytes()
    with pytest.raises(vh.CheckpointError, match="truncated or corrupt"):
        vh.load_checkpoint(path, DEFAULTS)
    assert path.read_bytes() == before


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "vae.pt"
    torch.save(make_checkpoint(DEFAULTS) | {"extra": Payload()}, path)
    with pytest.raises(vh.CheckpointError, match="truncated or corrupt"):
        vh.load_checkpoint(path, DEFAULTS)


def test_checkpoint_without_its_entries_is_refused(tmp_path):
    torch.save({"model": {}}, tmp_path / "vae.pt")
    with pytest.raises(vh.CheckpointError, match="lacks the entries"):
        vh.load_checkpoint(tmp_path / "vae.pt", DEFAULTS)


# --------------------------------------------------------------------------- tools


def test_check_run_accepts_a_good_run_and_refuses_a_bad_one(tmp_path):
    with pytest.raises(SystemExit, match="lacks"):
        vh.check_run(tmp_path, 101.5)
    (tmp_path / "samples.png").write_bytes(b"png")
    vh.write_json({"final_test_loss": 100.4}, tmp_path / "metrics.json")
    with pytest.raises(SystemExit, match=r"lacks \['evaluation.json'\]"):  # the companion has not run
        vh.check_run(tmp_path, 101.5)
    vh.write_json({"importance_weighted": {}}, tmp_path / "evaluation.json")
    with pytest.raises(SystemExit, match="no importance-weighted bound"):
        vh.check_run(tmp_path, 101.5)
    vh.write_json({"importance_weighted": {"nll": 95.0, "K": 1000, "test_images": 1000}}, tmp_path / "evaluation.json")
    metrics, evaluation = vh.check_run(tmp_path, 101.5)
    assert metrics["final_test_loss"] == 100.4 and evaluation["importance_weighted"]["nll"] == 95.0
    vh.write_json({"final_test_loss": 101.6}, tmp_path / "metrics.json")
    with pytest.raises(SystemExit, match="above the bound"):
        vh.check_run(tmp_path, 101.5)
