"""The plumbing: settings, devices, data, atomic writes, the sweep reader (vae_helpers.py); tools/make_commands.py."""

import collections
import errno
import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys

import make_commands
import numpy as np
import pytest
import torch

import vae_helpers as vh
from conftest import DEFAULTS, NOTEBOOK, REPO, require_strict_mkl


def test_the_settings_are_read_by_name_from_a_namespace_and_take_their_types():
    namespace = dict(DEFAULTS[NOTEBOOK], BETA=2, DATA_DIR="~/mnist", IW_SAMPLES=50, model=object(), x=1)
    settings = vh.check_settings(namespace)  # as `globals()`: other variables are not settings
    assert set(settings) == set(DEFAULTS[NOTEBOOK]) | {"IW_SAMPLES"} and settings["EPOCHS"] == 20
    assert settings["BETA"] == 2.0 and type(settings["BETA"]) is float and settings["DATA_DIR"] == "~/mnist"


@pytest.mark.parametrize(("change", "expected"), [
    ({"EPOCHS": 0}, "EPOCHS = 0 is invalid: EPOCHS must be a whole number >= 1. Correct it in the parameters cell"),
    ({"EPOCHS": 2.0}, "EPOCHS = 2.0 is invalid"), ({"SEED": True}, "SEED = True is invalid"),
    ({"BATCH_SIZE": "2.5"}, "BATCH_SIZE = '2.5' is invalid"), ({"EPOCHS": "20"}, "EPOCHS = '20' is invalid"),
    ({"DEVICE": "tpu"}, "DEVICE = 'tpu' is invalid: DEVICE must be auto, cpu, cuda, cuda:N or mps"),
    ({"LEARNING_RATE": float("nan")}, "LEARNING_RATE = nan is invalid"), ({"BINARIZE": 1}, "BINARIZE = 1 is invalid"),
    ({"RESUME": "maybe"}, "RESUME = 'maybe' is invalid: RESUME must be True or False"),
    ({"IW_TEST_IMAGES": 99}, "IW_TEST_IMAGES = 99 is invalid: IW_TEST_IMAGES must be a whole number from 100"),
    ({"TRAIN_SUBSET": 60_001}, "TRAIN_SUBSET = 60001 is invalid: TRAIN_SUBSET must be a whole number from 0 (all)")])
def test_each_bad_value_names_the_setting_and_the_fix(change, expected):
    with pytest.raises(vh.ConfigError) as error:
        vh.check_settings(dict(DEFAULTS[NOTEBOOK], **change))
    assert expected in str(error.value) and "papermill: -p" in str(error.value)


def test_an_absent_device_or_cuda_index_is_refused_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(vh.ConfigError, match="no such device"):
        vh.choose_device("cuda")
    assert vh.choose_device("auto").type in ("cpu", "mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert vh.choose_device("cuda:1") == torch.device("cuda:1") and vh.choose_device("auto") == torch.device("cuda")
    with pytest.raises(vh.ConfigError, match="DEVICE='cuda:2', but this machine has no such device"):
        vh.choose_device("cuda:2")


def test_the_setup_cell_run_again_restores_the_thread_count_fair_threads_lowered():
    require_strict_mkl()  # FairThreads starts only where the thread count changes no bit
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
    loaded = dict(DATA_DIR=str(tiny_mnist), DATASET="mnist", TRAIN_SUBSET=4, BINARIZE=True)
    train, test, class_names = vh.load_splits(tiny_mnist, "mnist", torch.device("cpu"), 4, True, allow_download=False)
    pixels = np.frombuffer((tiny_mnist / "MNIST/raw/train-images-idx3-ubyte").read_bytes()[16:], np.uint8)
    assert torch.equal(train.images, torch.from_numpy(pixels[: 4 * 784] / np.float32(255)).reshape(4, 784))
    assert train.labels.dtype == torch.int64 and len(class_names) == 10
    assert test.images.shape == (3, 784) and set(test.images.unique().tolist()) <= {0.0, 1.0}
    again = vh.load_splits(tiny_mnist, "mnist", torch.device("cpu"), 4, True, allow_download=False)[1]
    assert torch.equal(test.images, again.images) and train.settings == test.settings == loaded


@pytest.mark.parametrize("allow_download", [False, True])
def test_missing_files_name_the_folder_and_why_nothing_was_fetched(tiny_mnist, monkeypatch, allow_download):
    from torchvision import datasets

    offline = OSError("Name or service not known")
    monkeypatch.setattr(datasets.MNIST, "download", lambda self: (_ for _ in ()).throw(offline))
    (tiny_mnist / "MNIST/raw/t10k-labels-idx1-ubyte").unlink()
    why = "the download failed .*Name or service" if allow_download else "downloading is switched off"
    with pytest.raises(vh.DataError, match=f"MNIST is not in {tiny_mnist / 'MNIST' / 'raw'} and {why}.*set DATA_DIR"):
        vh.load_splits(tiny_mnist, "mnist", "cpu", allow_download=allow_download)


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])
def test_a_damaged_file_is_named_and_left_alone(tiny_mnist, damage):
    path = tiny_mnist / "MNIST/raw/t10k-images-idx3-ubyte"
    data = bytearray(path.read_bytes())
    data = data[:100] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 0xFF])
    path.write_bytes(data)
    with pytest.raises(vh.DataError, match=f"{path} is not the published file.*Delete it"):
        vh.load_splits(tiny_mnist, "mnist", "cpu", allow_download=False)
    assert path.read_bytes() == data


def test_unpack_fashion_unzips_debians_files_into_torchvisions_layout(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    debian.mkdir()
    contents = {name: name.encode() * 3 for name in vh.DATASETS["fashion"][1]}
    for name, data in contents.items():
        (debian / f"{name}.gz").write_bytes(gzip.compress(data))
    raw = make_commands.unpack_fashion(tmp_path / "data", debian)
    assert raw == tmp_path / "data" / "FashionMNIST" / "raw"
    assert {p.name: p.read_bytes() for p in raw.iterdir()} == contents
    with pytest.raises(vh.DataError, match=f"{tmp_path / 'nowhere'}.*apt-get install dataset-fashion-mnist"):
        make_commands.unpack_fashion(tmp_path / "other", tmp_path / "nowhere")


@pytest.mark.parametrize("step", ["fsync", "replace"])
def test_a_full_disk_keeps_the_old_file_and_says_nothing_was_damaged(tmp_path, monkeypatch, step):
    path = vh.write_bytes_atomically(b"good checkpoint", tmp_path / "vae.pt")
    monkeypatch.setattr(os, step, lambda *_: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(OSError, match="disk is full or over quota") as error:
        vh.write_bytes_atomically(b"x" * 2_000_000, path)
    message = str(error.value)
    assert all(part in message for part in ("Could not write vae.pt (2.0 MB) into", str(tmp_path), "MB free",
                                            "Nothing was damaged")) and error.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"good checkpoint" and os.listdir(tmp_path) == ["vae.pt"]


def test_a_write_replaces_the_file_whole_and_other_write_errors_propagate_unchanged(tmp_path, monkeypatch):
    vh.write_bytes_atomically(b"old", tmp_path / "vae.pt")
    assert vh.write_bytes_atomically(b"new", tmp_path / "vae.pt").read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["vae.pt"]  # no temporary left
    injected = OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(injected))
    with pytest.raises(OSError) as error:
        vh.write_bytes_atomically(b"data", tmp_path / "metrics.json")
    assert error.value is injected and os.listdir(tmp_path) == ["vae.pt"]


def test_binarized_once_is_one_fixed_draw_with_the_grey_levels_as_probabilities():
    torch.manual_seed(18)
    grey = torch.rand(300, 784) * (torch.rand(300, 784) > 0.3)
    grey[:, :10] = 1.0
    state = torch.get_rng_state()
    binary = vh.binarized_once(grey, 1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(binary, vh.binarized_once(grey, 1)) and not torch.equal(binary, vh.binarized_once(grey, 2))
    assert set(binary.unique().tolist()) == {0.0, 1.0}
    assert (binary[grey == 0] == 0).all() and (binary[grey == 1] == 1).all()
    # each pixel is 1 with probability equal to its grey level: the mean over 235,200 pixels within 4 s.e.
    assert abs(binary.mean() - grey.mean()) < 4 * (0.25 / grey.numel()) ** 0.5


def test_read_sweep_reads_the_evaluated_runs_by_seed_and_names_a_missing_configuration(tmp_path):
    for seed, files in ((7, dict(metrics=1, evaluation=2)), (12, dict(metrics=3, evaluation=4)), (3, dict(metrics=5))):
        (tmp_path / "beta-1" / f"seed-{seed}").mkdir(parents=True)  # seed 3 has no evaluation: not a result
        for name, value in files.items():
            (tmp_path / "beta-1" / f"seed-{seed}" / f"{name}.json").write_text(json.dumps(value))
    assert vh.read_sweep(["beta-1"], tmp_path) == {"beta-1": {7: (1, 2), 12: (3, 4)}}
    with pytest.raises(FileNotFoundError, match=r"no evaluated run of \['fashion'\].*run `make sweep`"):
        vh.read_sweep(["beta-1", "fashion"], tmp_path)
    (tmp_path / "beta-1" / "seed-12" / "evaluation.json").write_text('{"active_')  # cut short: an error, not absent
    with pytest.raises(ValueError):
        vh.read_sweep(["beta-1"], tmp_path)


def test_check_run_accepts_a_finished_run_within_the_bound_only(tmp_path, capsys):
    with pytest.raises(SystemExit, match="lacks a finished, evaluated run"):
        make_commands.check_run(tmp_path, 101.5)
    (tmp_path / "metrics.json").write_text(json.dumps({"final_test_loss": 100.4}))
    (tmp_path / "evaluation.json").write_text(json.dumps({"importance_weighted": {"nll": 95.0, "K": 1000}}))
    with pytest.raises(SystemExit, match="lacks samples.png"):
        make_commands.check_run(tmp_path, 101.5)
    (tmp_path / "samples.png").write_bytes(b"png")
    assert make_commands.check_run(tmp_path, 101.5) == {"final_test_loss": 100.4} and "OK" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="above the bound 100"):
        make_commands.check_run(tmp_path, 100)


def test_fair_threads_counts_only_the_cores_this_process_may_use(monkeypatch):
    cpu = collections.namedtuple("scputimes", "user nice system idle iowait")
    monkeypatch.setattr(vh.psutil, "cpu_times", lambda percpu: [cpu(1, 0, 1, 5, 3), cpu(8, 0, 8, 1, 0)])
    monkeypatch.setattr(vh.psutil.Process, "cpu_affinity", lambda self: [0, 1], raising=False)  # any machine: 2 CPUs
    policy = vh.FairThreads()
    policy.cpus = [0]  # as under `taskset -c 0`: cpu1's work is not competing with us
    assert policy._sample()[1] == 2  # user + system of cpu0: idle and iowait are not work
    policy.cpus = [0, 1]
    assert policy._sample()[1] == 18


OLD_PYTHON = """#!/bin/sh
# A stand-in for Python 3.10 (Ubuntu 22.04's python3): this interpreter, reporting itself as 3.10.12.
exec "{python}" -c 'import sys; sys.version_info = (3, 10, 12, "final", 0); sys.version = "3.10.12"
code = sys.argv[2]; del sys.argv[1:3]; exec(code)' "$@"
"""


def test_make_setup_refuses_an_old_python_at_once_naming_it_and_the_fix(tmp_path):
    old_python = tmp_path / "python3.10"
    old_python.write_text(OLD_PYTHON.format(python=sys.executable))
    old_python.chmod(0o755)
    done = subprocess.run(["make", "--no-print-directory", "setup", f"PYTHON={old_python}", f"VENV={tmp_path}/venv"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and not (tmp_path / "venv").exists()
    assert all(part in done.stderr for part in ("needs Python 3.11 or newer", "is Python 3.10.12", "PYTHON=python3.12"))
