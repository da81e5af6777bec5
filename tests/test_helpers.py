"""Unit tests of the plumbing: settings, finding and checking the data, atomic writes (vae_helpers.py); check_run
and unpack_fashion (tools/make_commands.py)."""

import errno
import gzip
import hashlib
import os
import struct

import make_commands
import numpy as np
import pytest
import torch
from PIL import Image

import vae_helpers as vh

DEFAULTS = dict(EPOCHS=20, BATCH_SIZE=128, LATENT_DIM=20, LEARNING_RATE=1e-3, SEED=1234, DATA_DIR="data", OUT_DIR=".",
                TRAIN_SUBSET=0, DEVICE="auto", DATASET="mnist", BETA=1.0, BINARIZE=False, RESUME=False)
COMPANION_DEFAULTS = dict(OUT_DIR=".", DATA_DIR="data", DATASET="mnist", DEVICE="auto", IW_SAMPLES=1000,
                          IW_TEST_IMAGES=1000)

# --------------------------------------------------------------------------- settings


def test_defaults_pass_through_as_a_config():
    config = vh.read_config(DEFAULTS, {"PATH": "/bin"})
    assert config.as_dict() == DEFAULTS and config.EPOCHS == 20 and config.DATASET == "mnist"


def test_environment_overrides_win_and_take_the_defaults_type():
    environ = {"VAE_EPOCHS": " 3", "VAE_LEARNING_RATE": "5e-4", "VAE_BETA": "2", "VAE_RESUME": "yes",
               "VAE_BINARIZE": "0", "VAE_DATASET": "fashion", "VAE_DATA_DIR": "~/mnist"}
    config = vh.read_config(DEFAULTS, environ)
    values = (config.EPOCHS, config.LEARNING_RATE, config.BETA, config.RESUME, config.BINARIZE, config.DATASET)
    assert values == (3, 5e-4, 2.0, True, False, "fashion")
    assert [type(v) for v in values] == [int, float, float, bool, bool, str]
    assert config.DATA_DIR == os.path.expanduser("~/mnist")


@pytest.mark.parametrize(("cell", "environ", "expected"), [
    ({}, {"VAE_EPOCHS": "0"}, "environment variable VAE_EPOCHS='0' is invalid: EPOCHS must be a whole number >= 1"),
    ({}, {"VAE_EPOCHS": "abc"}, "environment variable VAE_EPOCHS='abc'"),
    ({}, {"VAE_BATCH_SIZE": "2.5"}, "environment variable VAE_BATCH_SIZE='2.5'"),
    ({"EPOCHS": 2.0}, {}, "parameter EPOCHS=2.0 (from the parameters cell"),
    ({"SEED": True}, {}, "parameter SEED=True (from the parameters cell"),
    ({}, {"VAE_DEVICE": "tpu"}, "VAE_DEVICE='tpu' is invalid: DEVICE must be auto, cpu, cuda, cuda:N or mps"),
    ({"DEVICE": "cuda:x"}, {}, "parameter DEVICE='cuda:x'"),
    ({}, {"VAE_LEARNING_RATE": "nan"}, "VAE_LEARNING_RATE='nan' is invalid"),
    ({}, {"VAE_RESUME": "maybe"}, "VAE_RESUME='maybe' is invalid: RESUME must be True or False"),
    ({"EPOCH": 3}, {}, "Unknown setting(s) ['EPOCH']"),
    ({}, {"VAE_EPOCH": "3"}, "Unknown setting(s) ['VAE_EPOCH']"),
])
def test_each_bad_value_names_the_setting_and_where_it_came_from(cell, environ, expected):
    with pytest.raises(vh.ConfigError) as error:
        vh.read_config(dict(DEFAULTS, **cell), environ)
    assert expected in str(error.value)


@pytest.mark.parametrize(("environ", "valid"), [({"VAE_IW_TEST_IMAGES": "99"}, False), ({}, True)])
def test_the_companion_needs_at_least_100_test_images(environ, valid):
    if valid:
        assert vh.read_config(COMPANION_DEFAULTS, environ).IW_TEST_IMAGES == 1000
    else:
        with pytest.raises(vh.ConfigError, match="VAE_IW_TEST_IMAGES='99'.*from 100 to 10000"):
            vh.read_config(COMPANION_DEFAULTS, environ)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_an_unavailable_device_is_refused_and_auto_falls_back():
    with pytest.raises(vh.ConfigError, match="no such device"):
        vh.choose_device("cuda")
    assert vh.choose_device("auto").type in ("cpu", "mps")


def test_a_cuda_index_beyond_the_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert vh.device_available("cuda") and vh.device_available("cuda:1") and not vh.device_available("cuda:2")


@pytest.mark.filterwarnings("ignore")
def test_the_setup_cell_run_again_restores_the_thread_count_fair_threads_lowered():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        vh.configure_torch()
        torch.set_num_threads(1)  # as FairThreads does while another program is busy
        vh.configure_torch()  # the setup cell again
        assert torch.get_num_threads() == 2 and vh._fair_threads[0].max_threads == 2
    finally:
        vh.configure_torch(fair_threads=False)
        torch.set_num_threads(threads)


def test_an_unwritable_out_dir_is_refused_before_any_work(tmp_path):
    assert vh.prepare_out_dir(tmp_path / "a" / "b").is_dir()
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(OSError, match="cannot be written to.*nothing was trained"):
        vh.prepare_out_dir(tmp_path / "file" / "out")
    assert (tmp_path / "file").read_text() == "keep me"


# --------------------------------------------------------------------------- data


def idx_bytes(array):
    """A uint8 array as an IDX file (the MNIST format): magic, dimensions, then the bytes."""
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch):
    """A 5 + 3 image MNIST in tmp_path/MNIST/raw, and vh.DATASETS made to expect exactly its files."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 5), ("t10k", 3)):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(rng.integers(0, 256, (count, 28, 28), np.uint8)))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(rng.integers(0, 10, count, np.uint8)))
    table = {p.name: (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(raw.iterdir())}
    monkeypatch.setattr(vh, "DATASETS", {"mnist": ("MNIST", table), "fashion": ("FashionMNIST", table)})
    return tmp_path


def test_load_splits_gives_the_subset_and_a_seeded_binary_test_set(tiny_mnist):
    config = vh.read_config(dict(DEFAULTS, DATA_DIR=str(tiny_mnist), TRAIN_SUBSET=4, BINARIZE=True, DEVICE="cpu"), {})
    train, test, class_names = vh.load_splits(config, torch.device("cpu"), allow_download=False)
    pixels = np.frombuffer((tiny_mnist / "MNIST/raw/train-images-idx3-ubyte").read_bytes()[16:], np.uint8)
    assert torch.equal(train.images, torch.from_numpy(pixels[: 4 * 784] / np.float32(255)).reshape(4, 784))
    assert train.labels.dtype == torch.int64 and len(class_names) == 10
    assert test.images.shape == (3, 784) and set(test.images.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(test.images, vh.load_splits(config, torch.device("cpu"), allow_download=False)[1].images)
    assert train.settings == test.settings == {name: config.as_dict()[name] for name in vh.DATA_SETTINGS}


@pytest.mark.parametrize("allow_download", [False, True])
def test_missing_files_name_the_folder_and_why_nothing_was_fetched(tiny_mnist, monkeypatch, allow_download):
    from torchvision import datasets

    def no_network(self):
        raise OSError("Name or service not known")

    monkeypatch.setattr(datasets.MNIST, "download", no_network)
    (tiny_mnist / "MNIST/raw/t10k-labels-idx1-ubyte").unlink()
    why = "the download failed .*Name or service" if allow_download else "downloading is switched off"
    with pytest.raises(vh.DataError, match=f"MNIST is not in {tiny_mnist / 'MNIST' / 'raw'} and {why}.*VAE_DATA_DIR"):
        vh.load_dataset(tiny_mnist, "mnist", "cpu", allow_download=allow_download)


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])
def test_a_damaged_file_is_named_and_left_alone(tiny_mnist, damage):
    path = tiny_mnist / "MNIST/raw/t10k-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data = data[:100] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 0xFF])
    path.write_bytes(data)
    with pytest.raises(vh.DataError, match=f"{path} is not the published file.*Delete it"):
        vh.load_dataset(tiny_mnist, "mnist", "cpu", allow_download=False)
    assert path.read_bytes() == data


def test_unpack_fashion_unzips_debians_files_into_torchvisions_layout(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    debian.mkdir()
    contents = {name: name.encode() * 3 for name in vh.FASHION_MNIST_FILES}
    for name, data in contents.items():
        (debian / f"{name}.gz").write_bytes(gzip.compress(data))
    raw = make_commands.unpack_fashion(tmp_path / "data", debian)
    assert raw == tmp_path / "data" / "FashionMNIST" / "raw"
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == contents
    with pytest.raises(vh.DataError, match=f"{tmp_path / 'nowhere'}.*apt-get install dataset-fashion-mnist"):
        make_commands.unpack_fashion(tmp_path / "other", tmp_path / "nowhere")


# --------------------------------------------------------------------------- atomic writes


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    vh.write_bytes_atomically(b"old", tmp_path / "vae.pt")
    assert vh.write_bytes_atomically(b"new", tmp_path / "vae.pt").read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["vae.pt"]


def fail(code):
    def raise_it(*_args):
        raise OSError(code, os.strerror(code))

    return raise_it


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_full_disk_keeps_the_old_file_and_says_nothing_was_damaged(tmp_path, monkeypatch, step):
    path = vh.write_bytes_atomically(b"good checkpoint", tmp_path / "vae.pt")
    monkeypatch.setattr(os, step, fail(errno.ENOSPC))
    with pytest.raises(vh.DiskFullError) as error:
        vh.write_bytes_atomically(b"x" * 2_000_000, path)
    message = str(error.value)
    assert "Could not write vae.pt (2.0 MB) into" in message and str(tmp_path) in message and "MB free" in message
    assert "Nothing was damaged" in message and error.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"good checkpoint" and os.listdir(tmp_path) == ["vae.pt"]


def test_other_write_errors_propagate_unchanged(tmp_path, monkeypatch):
    injected = OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(injected))
    with pytest.raises(OSError) as error:
        vh.write_bytes_atomically(b"data", tmp_path / "metrics.json")
    assert error.value is injected and os.listdir(tmp_path) == []


def test_an_image_grid_of_64_digits_is_242_pixels_square(tmp_path):
    with Image.open(vh.save_image_grid(torch.rand(64, 784), tmp_path / "samples.png", nrow=8)) as image:
        assert image.size == (242, 242) and image.format == "PNG"


# --------------------------------------------------------------------------- check_run


def test_check_run_accepts_a_finished_run_within_the_bound_only(tmp_path, capsys):
    with pytest.raises(SystemExit, match="lacks a finished, evaluated run"):
        make_commands.check_run(tmp_path, 101.5)
    vh.write_json({"final_test_loss": 100.4}, tmp_path / "metrics.json")
    vh.write_json({"importance_weighted": {"nll": 95.0, "K": 1000}}, tmp_path / "evaluation.json")
    with pytest.raises(SystemExit, match="lacks samples.png"):
        make_commands.check_run(tmp_path, 101.5)
    (tmp_path / "samples.png").write_bytes(b"png")
    assert make_commands.check_run(tmp_path, 101.5) == {"final_test_loss": 100.4} and "OK" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="above the bound 100"):
        make_commands.check_run(tmp_path, 100)


def test_fair_threads_counts_only_the_cores_this_process_may_use(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    monkeypatch.setattr(vh.FairThreads, "STAT", str(stat))
    lines = ["cpu  900 0 900 0 0 0 0 0", "cpu0 100 0 100 0 0 0 0 0", "cpu1 800 0 800 0 0 0 0 0", "intr 5"]
    stat.write_text("\n".join(lines) + "\n")
    policy = vh.FairThreads()
    policy.cpus = {0}  # as under `taskset -c 0`: cpu1's work is not competing with us
    assert policy._sample()[1] * os.sysconf("SC_CLK_TCK") == 200
