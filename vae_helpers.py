"""Plumbing for Variational_autoencoder.ipynb and its companion, so the notebooks stay about the VAE.

Each guarantee the notebooks make is one mechanism here, and nothing runs at import:
  settings      check_settings: the parameters cell's constants (or papermill's -p), each checked
  torch setup   configure_torch: deterministic kernels, the same bits at any thread count, no slow-down from
                subnormal numbers, and fewer threads while other programs keep the cores busy (FairThreads)
  data          load_splits: MNIST or Fashion-MNIST, SHA-256 verified, as tensors
  checkpoints   start_or_resume / save_checkpoint: the checkpoint, written atomically, is the truth; the training
                cell always continues from its last completed epoch (after an interrupt, an error or a restart)
  cell order    require_trained, NotebookOrderError: a cell run out of order names the cell to run
  companion     load_trained_checkpoint, load_notebook_definitions (the walkthrough's definitions), read_sweep
"""

import ast
import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import platform
import secrets
import shutil
import tempfile
import time
import warnings
import weakref
import zlib
from pathlib import Path

import psutil
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

# --------------------------------------------------------------------------- settings

class ConfigError(ValueError):
    """A setting has a value the notebook cannot use."""


def _device_name(value):
    return value in ("auto", "cpu", "mps", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())


# NAME: (type, check, what it accepts). The parameters cells hold the values; papermill's -p replaces them.
SETTINGS = {
    "EPOCHS": (int, lambda v: v >= 1, "a whole number >= 1"),
    "BATCH_SIZE": (int, lambda v: v >= 1, "a whole number >= 1"),
    "LATENT_DIM": (int, lambda v: v >= 1, "a whole number >= 1"),
    "LEARNING_RATE": (float, lambda v: 0 < v < math.inf, "a number > 0, such as 1e-3"),
    "SEED": (int, lambda v: v >= 0, "a whole number >= 0"),
    "DATA_DIR": (str, lambda v: v.strip() != "", "a folder path"),
    "OUT_DIR": (str, lambda v: v.strip() != "", "a folder path"),
    "TRAIN_SUBSET": (int, lambda v: v >= 0, "a whole number >= 0 (0 = all training images)"),
    "DEVICE": (str, _device_name, "auto, cpu, cuda, cuda:N or mps"),
    "DATASET": (str, lambda v: v in ("mnist", "fashion"), "mnist or fashion"),
    "BETA": (float, lambda v: 0 <= v < math.inf, "a number >= 0 (1 = the plain VAE)"),
    "BINARIZE": (bool, lambda v: True, "True or False"),
    "RESUME": (bool, lambda v: True, "True or False"),
    # the companion notebook's own
    "IW_SAMPLES": (int, lambda v: v >= 1, "a whole number >= 1"),
    # the bound's check uses a standard error over these images: a handful would make it fail by chance
    "IW_TEST_IMAGES": (int, lambda v: 100 <= v <= 10_000, "a whole number from 100 to 10000"),
}

# Settings that change a training run's numbers: a checkpoint continues only with the same (raising EPOCHS continues)
RUN_SETTINGS = ("BATCH_SIZE", "LATENT_DIM", "LEARNING_RATE", "SEED", "TRAIN_SUBSET", "DATASET", "BETA", "BINARIZE")
DATA_SETTINGS = ("DATA_DIR", "DATASET", "TRAIN_SUBSET", "BINARIZE")  # what the loaded tensors depend on
BINARIZED_TEST_SEED = 20_161_105  # the one binary draw of the test set when BINARIZE
BINARIZED_TRAIN_SEED = 1  # the one binary draw of training images scored as the test set is, when BINARIZE


def seed_for(seed, purpose):
    """A seed of its own for each purpose ("training", "samples", ...), made from SEED: no stream reuses another's."""
    return zlib.crc32(f"{seed}/{purpose}".encode())


def check_settings(namespace):
    """The settings among a notebook's variables (`globals()`), each checked: {NAME: value}; ConfigError if bad."""
    values = {}
    for name in [name for name in SETTINGS if name in namespace]:
        kind, check, accepts = SETTINGS[name]
        value = namespace[name]
        if kind is float and type(value) is int:  # papermill's -p BETA 4 gives an int
            value = float(value)
        if type(value) is not kind or not check(value):  # 2.0 or True for a count, or 1 for a flag, hides a typo
            raise ConfigError(f"{name} = {namespace[name]!r} is invalid: {name} must be {accepts}. Correct it in "
                              f"the parameters cell (papermill: -p {name} <value>), then run it and the next cells.")
        values[name] = value
    return values


# --------------------------------------------------------------------------- torch setup


def device_available(name):
    """True if this machine has the device `name` ('cpu', 'cuda', 'cuda:1', 'mps')."""
    if name.startswith("cuda"):  # 'cuda:N' needs N GPUs or more
        return torch.cuda.is_available() and int(name.partition(":")[2] or 0) < torch.cuda.device_count()
    return name == "cpu" or (name in ("mps", "mps:0") and torch.backends.mps.is_available())


def choose_device(name, prefer=None):
    """Resolve 'auto' to `prefer` if this machine has it, else cuda, then mps, then cpu; refuse an absent device."""
    if name == "auto":
        name = next(n for n in (prefer, "cuda", "mps", "cpu") if n and device_available(n))
    elif not device_available(name):
        raise ConfigError(f"DEVICE={name!r}, but this machine has no such device. Use DEVICE='auto' or 'cpu'.")
    return torch.device(name)


class FairThreads:
    """Lower torch's CPU thread count while other processes keep the cores busy; restore it when they stop.

    PyTorch's OpenMP threads spin while they wait for each other: beside another busy process a spinning thread
    takes turns from the thread it waits for, and an epoch can take four times longer. Reads the load of this
    process's cores through psutil (Linux, macOS, Windows), before every optimizer step."""

    def __init__(self, interval=0.5):
        process = psutil.Process()  # its cores: all, or those a cpuset or taskset left it (no affinity on macOS)
        self.cpus = process.cpu_affinity() if hasattr(process, "cpu_affinity") else range(psutil.cpu_count())
        self.max_threads, self.cores, self.interval = torch.get_num_threads(), len(self.cpus), interval
        self._last = self._sample()

    def _sample(self):
        """(seconds, CPU-seconds of work on this process's cores, CPU-seconds of this process)."""
        per_cpu = psutil.cpu_times(percpu=True)
        idle = ("idle", "iowait", "steal", "guest", "guest_nice")  # guest time is counted in user time already
        busy = sum(sum(t) - sum(getattr(t, name, 0.0) for name in idle) for t in (per_cpu[i] for i in self.cpus))
        return time.monotonic(), busy, time.process_time()

    def adjust(self, *_hook_args):
        """Set the thread count to the cores other processes left free since the last look (at least 1)."""
        if time.monotonic() - self._last[0] < self.interval:  # most steps stop here
            return
        now = self._sample()
        others = ((now[1] - self._last[1]) - (now[2] - self._last[2])) / (now[0] - self._last[0])  # busy cores
        self._last = now
        threads = max(1, min(self.max_threads, round(self.cores - max(others, 0.0))))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)


_fair_threads = None  # (the FairThreads policy, its hook handle) while configure_torch has one on
MKL_CBWR_AUTO_STRICT = 0x10002  # what mkl_cbwr_get reports for MKL_CBWR=AUTO,STRICT


def mkl_cbwr_mode():
    """MKL's reproducibility mode (mkl_cbwr_get), fixing it by MKL's first call; None if torch has no MKL."""
    try:  # libtorch_cpu.so, .dylib or .dll
        library = next((Path(torch.__file__).parent / "lib").glob("*torch_cpu.*"))
        mode = ctypes.CDLL(str(library)).mkl_serv_cbwr_get
    except (StopIteration, OSError, AttributeError):
        return None
    torch.ones(2, 2) @ torch.ones(2, 2)  # MKL reads MKL_CBWR at its first call
    return mode(-1)


def configure_torch(fair_threads=True):
    """Deterministic kernels, bits that do not depend on the thread count, no subnormals; FairThreads on steps."""
    global _fair_threads
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with this
    torch.use_deterministic_algorithms(True)
    # MKL's conditional numerical reproducibility: its matrix products give the same bits at any thread count. MKL
    # reads this when it first computes, so it must be set before the first matrix product (checked below).
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    mode = mkl_cbwr_mode()
    if mode not in (None, MKL_CBWR_AUTO_STRICT):  # None: torch without MKL; then nothing to promise
        cause = ("a matrix product ran before configure_torch" if os.environ["MKL_CBWR"] == "AUTO,STRICT" else
                 f"the environment sets MKL_CBWR={os.environ['MKL_CBWR']!r}")
        warnings.warn(f"MKL is not in its AUTO,STRICT mode ({cause}): results may change with the thread count. "
                      "Unset MKL_CBWR (or set it to AUTO,STRICT), restart the kernel and run the setup cell first.",
                      stacklevel=2)
    # A trained decoder and Adam's averages for dead units hold subnormal floats (below 1.2e-38), and arithmetic
    # on them is many times slower on some x86 CPUs: epochs slowed by 40-50% as training went on, on an Intel Xeon.
    # Flushing them to zero removes that cost (benchmarks/bench_train.py times every epoch).
    torch.set_flush_denormal(True)
    if _fair_threads is not None:  # the setup cell run again: back to the thread count before the first policy
        policy, hook = _fair_threads
        hook.remove()
        torch.set_num_threads(policy.max_threads)
        _fair_threads = None
    if fair_threads and mode == MKL_CBWR_AUTO_STRICT:  # only then are the bits the same at any thread count
        policy = FairThreads()
        _fair_threads = policy, register_optimizer_step_pre_hook(policy.adjust)


def library_versions():
    """Versions of Python and the libraries whose numbers a run depends on."""
    import numpy
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "cpu": cpu_name()}


def cpu_name():
    """The CPU's model name (Linux), else platform.processor()."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def prepare_out_dir(path):
    """Create the output folder and prove it is writable now, not after training."""
    out = Path(path).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise OSError(f"OUT_DIR {str(out)!r} cannot be written to ({err.strerror or err}). Point OUT_DIR at a "
                      "writable folder; nothing was trained or written.") from err
    return out


# --------------------------------------------------------------------------- data

# DATASET -> (torchvision class and folder name, {file: (bytes, SHA-256)} of its four uncompressed files, as published)
DATASETS = {
    "mnist": ("MNIST", {
        "train-images-idx3-ubyte": (47040016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        "train-labels-idx1-ubyte": (60008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        "t10k-images-idx3-ubyte": (7840016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        "t10k-labels-idx1-ubyte": (10008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2")}),
    "fashion": ("FashionMNIST", {
        "train-images-idx3-ubyte": (47040016, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        "train-labels-idx1-ubyte": (60008, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        "t10k-images-idx3-ubyte": (7840016, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        "t10k-labels-idx1-ubyte": (10008, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34")}),
}


class DataError(RuntimeError):
    """The data set is missing, incomplete or not the published files."""


@dataclasses.dataclass
class Split:
    """One split of a data set: images as float rows in [0, 1], labels as integers."""

    images: torch.Tensor  # (N, 784) float32, on the training device
    labels: torch.Tensor  # (N,) int64, on the training device
    settings: dict = dataclasses.field(default_factory=dict)  # the DATA_SETTINGS it was loaded with


def missing_files(data_dir, dataset):
    """The files of `dataset` that are not in DATA_DIR/<Name>/raw."""
    folder, files = DATASETS[dataset]
    return [name for name in files if not (Path(data_dir) / folder / "raw" / name).is_file()]


def load_dataset(data_dir, dataset, device, allow_download=True):
    """Find (or download), verify and load a data set: (train Split, test Split, class names)."""
    from torchvision import datasets

    folder, files = DATASETS[dataset]
    raw = Path(data_dir) / folder / "raw"
    if missing_files(data_dir, dataset):
        problem = "downloading is switched off"
        if allow_download:
            try:
                getattr(datasets, folder)(root=data_dir, train=True, download=True)
            except Exception as err:  # URLError, HTTPError, OSError, RuntimeError: all mean "no data"
                problem = f"the download failed ({type(err).__name__}: {err})"
        if missing_files(data_dir, dataset):
            raise DataError(f"{folder} is not in {raw} and {problem}. Copy its four files there ({', '.join(files)}; "
                            "uncompressed), or set DATA_DIR to the folder that holds <Name>/raw/.")
    for name, (size, sha256) in files.items():
        data = (raw / name).read_bytes()
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            raise DataError(f"{raw / name} is not the published file (size or SHA-256 differs: truncated or altered). "
                            f"Training did not start. Delete it and run again to download it, or point DATA_DIR at "
                            f"a verified copy. Expected {size:,} bytes, SHA-256 {sha256}.")
    splits = []
    for train in (True, False):
        ds = getattr(datasets, folder)(root=data_dir, train=train, download=False)
        # ds.data is (N, 28, 28) uint8; /255 gives exactly what transforms.ToTensor() gives.
        images = ds.data.reshape(len(ds.data), -1).to(device=device, dtype=torch.float32).div_(255)
        splits.append(Split(images, ds.targets.to(device)))
    return splits[0], splits[1], list(ds.classes)


def binarized_once(images, seed):
    """One fixed binary draw of `images` (pixel i is 1 with probability x_i), on the CPU: the same on any device."""
    return torch.bernoulli(images.cpu(), generator=torch.Generator().manual_seed(seed)).to(images.device)


def load_splits(data_dir, dataset, device, train_subset=0, binarize=False, allow_download=True):
    """The training and test Splits: the first `train_subset` training images (0: all); with `binarize`, the test
    set binarized once, seeded (on the CPU: the same on every device). Also the class names."""
    train, test, class_names = load_dataset(str(Path(data_dir).expanduser()), dataset, device, allow_download)
    if train_subset > len(train.images):
        raise ConfigError(f"TRAIN_SUBSET = {train_subset} is more than the {len(train.images):,} training images of "
                          f"{dataset}. Set it to 0 (all) or fewer in the parameters cell, then run the cells in order.")
    if train_subset:
        train = Split(train.images[:train_subset], train.labels[:train_subset])
    if binarize:
        test = Split(binarized_once(test.images, BINARIZED_TEST_SEED), test.labels)
    train.settings = test.settings = dict(DATA_DIR=str(data_dir), DATASET=dataset, TRAIN_SUBSET=train_subset,
                                          BINARIZE=binarize)
    return train, test, class_names


# --------------------------------------------------------------------------- files

class DiskFullError(OSError):
    """Writing into OUT_DIR failed because its disk is full or over quota."""

    def __str__(self):
        return self.strerror


def write_bytes_atomically(data, path):
    """Write `data` to a temporary file beside `path`, then rename it: `path` is whole, old or new, never partial."""
    target = Path(path)
    temp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # a full disk on network file systems and quotas may show only here
        os.replace(temp, target)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):  # a full disk, or over quota
            raise
        temp.unlink(missing_ok=True)  # before measuring the free space
        free = shutil.disk_usage(target.parent).free
        raise DiskFullError(err.errno, (
            f"Could not write {target.name} ({len(data) / 1e6:.1f} MB) into {target.parent}: the disk is full or over "
            f"quota ({free / 1e6:.1f} MB free). Nothing was damaged: files already there, an older {target.name} "
            "included, are whole. Free some space, or point OUT_DIR at a disk with room, and run the cell again "
            "(training continues from the last epoch saved in vae.pt)."), str(target)) from err
    finally:
        temp.unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------- checkpoints and cell order


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable, incomplete, unfinished, or from other settings."""


class NotebookOrderError(RuntimeError):
    """A cell was run out of order: what it needs is missing, or was built with other settings."""


CHECKPOINT_KEYS = ("model", "optimizer", "rng", "config", "history", "device", "run_id")
# The cells a refusal names, by the code they hold (the notebook's sections may be renumbered).
DATA_CELL = "the data cell (`train, test, class_names = ...`)"
MODEL_CELL = "the model cell (`model = VAE(...)`)"
OPTIMIZER_CELL = "the optimizer cell (`optimizer = ...`)"
TRAINING_CELL = "the training cell (`for epoch in ...`)"

_runs = weakref.WeakKeyDictionary()  # model -> its training run: {"path", "run_id", "settings", "epochs"}


def _rng_state():
    """The states of torch's global random streams: the CPU's, and CUDA's or MPS's where present."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state):
    """Restore what _rng_state saved."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def read_checkpoint(path, fix):
    """torch.load a checkpoint safely (weights_only) and check its entries; CheckpointError ending with `fix`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:  # missing, or not readable
        raise CheckpointError(f"Cannot read checkpoint {path} ({err.strerror or err}). {fix}") from err
    except Exception as err:  # a truncated zip, random bytes, or a pickle with disallowed globals
        raise CheckpointError(f"Cannot read checkpoint {path}: it is truncated or corrupt ({err}). {fix}") from err
    if not isinstance(state, dict) or not all(key in state for key in CHECKPOINT_KEYS):
        raise CheckpointError(f"Checkpoint {path} lacks some of {list(CHECKPOINT_KEYS)}. {fix}")
    return state


def _settings_changed(old, new, names):
    """'NAME: old -> new; ...' for the names whose values differ ('' if none)."""
    return "; ".join(f"{n}: {old.get(n)!r} -> {new.get(n)!r}" for n in names if old.get(n) != new.get(n))


def _check_cells(settings, model, splits):
    """NotebookOrderError naming the earliest cell to run if the data or `model` no longer fit `settings`."""
    for split in splits:
        changed = _settings_changed(split.settings, settings, DATA_SETTINGS)
        if changed or split.images.device != next(model.parameters()).device:
            changed = changed or f"DEVICE: the data is on {split.images.device}"
            raise NotebookOrderError(f"Settings changed after the data was loaded ({changed}). Run {DATA_CELL} and "
                                     "the cells after it, in order.")
    run = _runs.get(model)
    changed = run and _settings_changed(run["settings"], settings, RUN_SETTINGS)
    if changed:
        data_changed = _settings_changed(run["settings"], settings, DATA_SETTINGS)  # the data must be reloaded first
        cell = DATA_CELL if data_changed else MODEL_CELL
        raise NotebookOrderError(f"Settings changed after this model started training ({changed}). Run {cell} "
                                 "and the cells after it, in order, to train with them.")


def start_or_resume(checkpoint_path, model, optimizer, namespace, train, test):
    """The epochs done (a list), with model, optimizer and random streams as after the last; settings from `namespace`.

    The checkpoint is the truth: a started run (or RESUME = True) continues from its last saved epoch, whatever
    happened since; a new run seeds torch from SEED and saves epoch 0. Cells out of order raise NotebookOrderError."""
    settings = check_settings(namespace)
    if {id(p) for group in optimizer.param_groups for p in group["params"]} != {id(p) for p in model.parameters()}:
        raise NotebookOrderError(f"`optimizer` belongs to another `model`: {MODEL_CELL} was run after the optimizer "
                                 f"was created. Run {OPTIMIZER_CELL}, then this cell.")
    _check_cells(settings, model, (train, test))
    path = Path(checkpoint_path)
    run = _runs.get(model)
    fix = f"Delete {path} (or set RESUME = False) to start afresh, or choose another OUT_DIR."
    state = None
    if run is None and settings["RESUME"] and path.exists():
        state = read_checkpoint(path, fix)
        changed = _settings_changed(state["config"], settings, RUN_SETTINGS)
        here = str(next(model.parameters()).device)  # another device draws other noise: not the same run
        if state["device"] != here:
            changed = "; ".join(filter(None, [changed, f"device: {state['device']!r} -> {here!r}"]))
        if changed:
            raise CheckpointError(f"Checkpoint {path} was made with other settings ({changed}). {fix}")
        run = _runs[model] = {"path": path, "run_id": state["run_id"], "settings": state["config"]}  # the run's own
        print(f"resuming from {path} after epoch {len(state['history'])}")
    elif run is None:  # a new run: the model cell has just built `model`
        if settings["RESUME"]:
            print(f"RESUME is set but there is no {path}: training from the start")
        torch.manual_seed(seed_for(settings["SEED"], "training"))  # not SEED itself: that drew the weights
        run = _runs[model] = {"path": path, "run_id": secrets.token_hex(8), "settings": settings}
        save_checkpoint(path, model, optimizer, settings["EPOCHS"], [])
        return []
    elif run["path"] != path or not path.exists():
        raise NotebookOrderError(f"This model's training run was saved in {run['path']}, which is gone or is not "
                                 f"{path} (OUT_DIR changed). Run {MODEL_CELL} and the cells after it, in order.")
    state = state or read_checkpoint(path, fix)
    if state["run_id"] != run["run_id"]:
        raise CheckpointError(f"{path} now holds another training run (another notebook or process wrote it). "
                              f"Run {MODEL_CELL} and the cells after it to start afresh, or use another OUT_DIR.")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    run["epochs"] = len(state["history"])
    if run["epochs"] >= settings["EPOCHS"]:
        print(f"Trained {run['epochs']} epochs already (EPOCHS = {settings['EPOCHS']}): nothing to train. To train "
              f"more, raise EPOCHS in the parameters cell, run it and the next cell, then this cell again.")
    return state["history"]


def save_checkpoint(checkpoint_path, model, optimizer, epochs, history):
    """Write everything needed to continue after the last epoch of `history`; refuse a loss that is nan or inf."""
    if history and not all(math.isfinite(value) for value in history[-1].values()):
        raise FloatingPointError(
            f"The loss became nan or inf in epoch {len(history)} ({history[-1]}). That epoch was not saved; "
            f"{checkpoint_path} still holds epoch {len(history) - 1}. Try a smaller LEARNING_RATE (the default is "
            "1e-3), and check that the data is in [0, 1].")
    run = _runs.get(model)
    if run is None:
        raise NotebookOrderError(f"`model` has no training run: start it with {TRAINING_CELL}.")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": _rng_state(),
             "config": run["settings"] | {"EPOCHS": epochs}, "history": history,
             "device": str(next(model.parameters()).device), "run_id": run["run_id"]}
    buffer = io.BytesIO()  # torch.save into memory: a full disk is then reported as one, by the plain write below
    torch.save(state, buffer)
    write_bytes_atomically(buffer.getbuffer(), checkpoint_path)
    run["epochs"] = len(history)


def require_trained(model, namespace, *splits):
    """Raise NotebookOrderError, naming the cell to run, unless `model` finished training with the settings in
    `namespace` (the notebook's `globals()`) and the data `splits` still fit them."""
    run = _runs.get(model)
    if run is None:
        raise NotebookOrderError(f"`model` has not been trained: run {OPTIMIZER_CELL} and {TRAINING_CELL} first.")
    settings = check_settings(namespace)
    _check_cells(settings, model, splits)
    if run.get("epochs", 0) < settings["EPOCHS"]:
        raise NotebookOrderError(f"`model` has completed {run.get('epochs', 0)} of EPOCHS = {settings['EPOCHS']} "
                                 f"epochs: run {TRAINING_CELL} first.")


def read_finished_checkpoint(path):
    """The checkpoint of a finished training run; CheckpointError, saying what to do, if missing or interrupted."""
    path, walkthrough = Path(path), WALKTHROUGH.name
    state = read_checkpoint(path, f"Run {walkthrough} (make run) with this OUT_DIR, or set OUT_DIR to its folder.")
    if len(state["history"]) < state["config"]["EPOCHS"]:
        raise CheckpointError(f"Checkpoint {path} holds {len(state['history'])} of its {state['config']['EPOCHS']} "
                              f"epochs: training was interrupted. Run the training cell of {walkthrough} again to "
                              "finish it (after a restart: with RESUME = True and the same OUT_DIR).")
    return state


def load_trained_checkpoint(path, dataset):
    """A finished run's checkpoint on `dataset`, with the metrics.json of that run, for evaluation; CheckpointError."""
    state, metrics_path, walkthrough = read_finished_checkpoint(path), Path(path).with_name("metrics.json"), WALKTHROUGH
    trained = state["config"]
    if trained["DATASET"] != dataset:
        raise CheckpointError(f"Checkpoint {path} was trained on DATASET={trained['DATASET']!r}, but this notebook "
                              f"is set to DATASET={dataset!r}. Set DATASET = {trained['DATASET']!r}, or point "
                              "OUT_DIR at a run trained on it.")
    try:  # the walkthrough's last cell writes metrics.json beside the checkpoint: the run's measured numbers
        state["metrics"] = json.loads(metrics_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{metrics_path} is missing or unreadable ({err}): run {walkthrough} to its last cell "
                              "with this OUT_DIR, then this notebook.") from None
    if state["metrics"].get("history") != state["history"]:  # written by an earlier run
        raise CheckpointError(f"{metrics_path} is from another training run than {path}: run {walkthrough} to its "
                              "last cell with this OUT_DIR, then this notebook.")
    return state


# --------------------------------------------------------------------------- tools


HERE = Path(__file__).resolve().parent  # the project folder
WALKTHROUGH = HERE / "Variational_autoencoder.ipynb"
SWEEP_DIR = HERE / "results" / "sweep"  # what `make sweep` publishes: NAME.json, NAME.evaluation.json, figures
PUBLISHED = {"metrics.json": "{}.json", "evaluation.json": "{}.evaluation.json"}  # a run's files: names in SWEEP_DIR


def read_sweep(names, folder=SWEEP_DIR):
    """{name: (metrics.json, evaluation.json)} for each run of `names` whose NAME.json and NAME.evaluation.json are in
    `folder`; a damaged file raises."""
    runs = {}
    for name in names:
        paths = [Path(folder) / file.format(name) for file in PUBLISHED.values()]
        with contextlib.suppress(FileNotFoundError):  # missing: not a result
            runs[name] = tuple(json.loads(path.read_text()) for path in paths)
    return runs


def load_notebook_definitions(notebook_path=WALKTHROUGH, tag="definitions", namespace=None):
    """Run a notebook's top-level imports and its cells tagged `tag` in `namespace` (default: a new dict)."""
    notebook = json.loads(Path(notebook_path).read_text())
    namespace = {"__name__": "notebook_definitions"} if namespace is None else namespace
    for cell in (cell for cell in notebook["cells"] if cell["cell_type"] == "code"):
        source = "".join(cell["source"])
        if tag in cell.get("metadata", {}).get("tags", []):
            exec(compile(source, f"{notebook_path}:{tag}", "exec"), namespace)
        else:  # other cells do work: only their imports, including those inside a top-level `try`
            body = [inner for node in ast.parse(source).body for inner in (node.body if isinstance(node, ast.Try)
                                                                            else [node])]
            imports = [node for node in body if isinstance(node, (ast.Import, ast.ImportFrom))]
            exec(compile(ast.Module(body=imports, type_ignores=[]), str(notebook_path), "exec"), namespace)
    return namespace
