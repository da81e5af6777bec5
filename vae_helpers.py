"""Plumbing for Variational_autoencoder.ipynb and its companion, so the notebooks stay about the VAE.

Each guarantee the notebooks make is one mechanism here, and nothing runs at import:
  settings      read_config: the parameters cell's constants, overridden by VAE_* variables, each checked
  torch setup   configure_torch: deterministic kernels, the same bits at any thread count, no slow-down from
                subnormal numbers, and fewer threads while other programs keep the cores busy (FairThreads)
  data          load_splits: MNIST or Fashion-MNIST, SHA-256 verified, as tensors
  files         write_bytes_atomically and the savers built on it: a failed write never replaces a good file
  checkpoints   resume / save_checkpoint: the checkpoint is the truth; the training cell always continues from
                the last completed epoch in it (after an interrupt, an error or a restart with RESUME alike)
  cell order    require_trained, NotebookOrderError: a cell run out of order names the cell to run
  companion     load_trained_checkpoint, load_notebook_definitions (the walkthrough's definitions)
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
import time
import types
import warnings
import weakref
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

# --------------------------------------------------------------------------- settings

ENV_PREFIX = "VAE_"


class ConfigError(ValueError):
    """A setting has a value the notebook cannot use."""


def _device_name(value):
    return value in ("auto", "cpu", "mps", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())


# NAME: (type, check, what it accepts). The parameters cells supply the defaults; a VAE_NAME variable wins.
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
    "BINARIZE": (bool, lambda v: True, "True or False (1 or 0)"),
    "RESUME": (bool, lambda v: True, "True or False (1 or 0)"),
    # the companion notebook's own
    "IW_SAMPLES": (int, lambda v: v >= 1, "a whole number >= 1"),
    # its bound is compared with the ELBO within 4 standard errors, estimated from the images: a handful of
    # images gives a noisy standard error and a test that fails by chance
    "IW_TEST_IMAGES": (int, lambda v: 100 <= v <= 10_000, "a whole number from 100 to 10000"),
}

# Settings that change the numbers a training run produces: a checkpoint continues only with the same ones.
# EPOCHS is not among them: raising it continues the same run.
RUN_SETTINGS = ("BATCH_SIZE", "LATENT_DIM", "LEARNING_RATE", "SEED", "TRAIN_SUBSET", "DATASET", "BETA", "BINARIZE")
DATA_SETTINGS = ("DATA_DIR", "DATASET", "TRAIN_SUBSET", "BINARIZE", "DEVICE")  # what the loaded tensors depend on


class Config(types.SimpleNamespace):
    """Checked settings, read as config.EPOCHS."""

    def as_dict(self):
        """The settings as a JSON-ready dict."""
        return dict(vars(self))

    def __repr__(self):  # one line, named Config: IPython would print a SimpleNamespace as `namespace(` over 13 lines
        return "Config(" + ", ".join(f"{name}={value!r}" for name, value in vars(self).items()) + ")"


def _convert(raw, kind):
    """`raw` (a cell's value or an environment variable's text) as `kind`; ValueError if it is not one."""
    if kind is bool and not isinstance(raw, bool):
        text = str(raw).strip().lower()
        if text not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ValueError(raw)
        return text in ("1", "true", "yes", "on")
    if kind is int and isinstance(raw, bool | float):
        raise ValueError(raw)  # 2.0 or True for a count hides a typo
    return kind(raw.strip() if isinstance(raw, str) else raw)


def read_config(defaults, environ):
    """Check the parameters cell's values (or papermill's -p), apply VAE_NAME overrides (they win): a Config."""
    unknown = sorted(set(defaults) - set(SETTINGS))
    unknown_env = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):] not in SETTINGS)
    if unknown or unknown_env:
        raise ConfigError(f"Unknown setting(s) {unknown + unknown_env}. Known: {', '.join(SETTINGS)} "
                          f"(as variables, with the prefix {ENV_PREFIX}).")
    values = {}
    for name, default in defaults.items():
        kind, check, accepts = SETTINGS[name]
        env_name = ENV_PREFIX + name
        from_env = env_name in environ
        raw = environ[env_name] if from_env else default
        try:
            value = _convert(raw, kind)
            valid = check(value)
        except (TypeError, ValueError):
            valid = False
        if not valid:
            where = (f"environment variable {env_name}={raw!r} is invalid: {name} must be {accepts}. Fix it or "
                     f"unset {env_name}." if from_env else
                     f"parameter {name}={raw!r} (from the parameters cell or papermill's -p) is invalid: {name} "
                     f"must be {accepts}. Correct the parameters cell (papermill: -p {name} <value>).")
            raise ConfigError(where)
        values[name] = str(Path(value).expanduser()) if name.endswith("_DIR") else value
    return Config(**values)


# --------------------------------------------------------------------------- torch setup


def device_available(name):
    """True if this machine has the device `name` ('cpu', 'cuda', 'cuda:1', 'mps')."""
    if name.startswith("cuda"):  # 'cuda:N' needs N GPUs or more
        return torch.cuda.is_available() and int(name.partition(":")[2] or 0) < torch.cuda.device_count()
    return name == "cpu" or (name == "mps" and torch.backends.mps.is_available())


def choose_device(name):
    """Resolve 'auto' to cuda, then mps, then cpu; refuse an explicit device that is not available."""
    if name == "auto":
        return torch.device(next(n for n in ("cuda", "mps", "cpu") if device_available(n)))
    if not device_available(name):
        raise ConfigError(f"DEVICE={name!r}, but this machine has no such device. Use DEVICE='auto' or 'cpu'.")
    return torch.device(name)


class FairThreads:
    """Lower torch's CPU thread count while other processes keep the cores busy; restore it when they stop.

    PyTorch's OpenMP threads spin while they wait for each other: alone that is fastest, but beside another busy
    process a spinning thread takes turns from the thread it waits for, and an epoch can take four times longer.
    Reads /proc/stat (Linux), for the cores this process may use; elsewhere it changes nothing. Called before every
    optimizer step.
    """

    STAT = "/proc/stat"

    def __init__(self, interval=0.5):
        # the cores this process may run on: all of them, or those a cpuset or taskset left it (Linux)
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        self.max_threads, self.cores, self.interval = torch.get_num_threads(), len(self.cpus), interval
        self._last = self._sample()

    def _sample(self):
        """(seconds, CPU-seconds of work on this process's cores, CPU-seconds of this process), or None."""
        busy = 0
        try:
            with open(self.STAT) as handle:
                for line in handle:  # "cpu" (all), then "cpu0", "cpu1", ..., then other counters
                    name, *fields = line.split()
                    if not name.startswith("cpu"):
                        break
                    if name[3:].isdigit() and int(name[3:]) in self.cpus:
                        user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[:7])
                        busy += user + nice + system + irq + softirq
        except (OSError, ValueError):
            return None
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()

    def adjust(self, *_hook_args):
        """Set the thread count to the cores other processes left free since the last look (at least 1)."""
        if self._last is None or time.monotonic() - self._last[0] < self.interval:  # most steps stop here
            return
        now = self._sample()
        if now is None:
            return
        others = ((now[1] - self._last[1]) - (now[2] - self._last[2])) / (now[0] - self._last[0])  # busy cores
        self._last = now
        threads = max(1, min(self.max_threads, round(self.cores - max(others, 0.0))))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)


_fair_threads = None  # (the FairThreads policy, its hook handle) while configure_torch has one on
MKL_CBWR_AUTO_STRICT = 0x10002  # what mkl_cbwr_get reports for MKL_CBWR=AUTO,STRICT


def mkl_cbwr_mode():
    """MKL's reproducibility mode (mkl_cbwr_get), fixing it by MKL's first call; None if torch has no MKL."""
    try:
        mode = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).mkl_serv_cbwr_get
    except (OSError, AttributeError):
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
    if mkl_cbwr_mode() not in (None, MKL_CBWR_AUTO_STRICT):  # None: torch without MKL; then nothing to promise
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
    if fair_threads:
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
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OSError(f"OUT_DIR {str(out)!r} cannot be written to ({err.strerror or err}). Point OUT_DIR at a "
                      "writable folder; nothing was trained or written.") from err
    return out


# --------------------------------------------------------------------------- data

# (bytes, SHA-256) of the four uncompressed files of each data set, as published.
MNIST_FILES = {
    "train-images-idx3-ubyte": (47040016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train-labels-idx1-ubyte": (60008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "t10k-images-idx3-ubyte": (7840016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "t10k-labels-idx1-ubyte": (10008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte": (47040016, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels-idx1-ubyte": (60008, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "t10k-images-idx3-ubyte": (7840016, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "t10k-labels-idx1-ubyte": (10008, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
# DATASET -> (torchvision class and folder name, expected files)
DATASETS = {"mnist": ("MNIST", MNIST_FILES), "fashion": ("FashionMNIST", FASHION_MNIST_FILES)}


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
                            "uncompressed), or set DATA_DIR (VAE_DATA_DIR) to the folder that holds <Name>/raw/.")
    for name, (size, sha256) in files.items():
        with open(raw / name, "rb") as handle:
            path, digest = raw / name, hashlib.file_digest(handle, "sha256").hexdigest()
        if path.stat().st_size != size or digest != sha256:
            raise DataError(f"{path} is not the published file (size or SHA-256 differs: truncated or altered). "
                            f"Training did not start. Delete it and run again to download it, or point DATA_DIR at "
                            f"a verified copy. Expected {size:,} bytes, SHA-256 {sha256}.")
    splits = []
    for train in (True, False):
        ds = getattr(datasets, folder)(root=data_dir, train=train, download=False)
        # ds.data is (N, 28, 28) uint8; /255 gives exactly what transforms.ToTensor() gives.
        images = ds.data.reshape(len(ds.data), -1).to(device=device, dtype=torch.float32).div_(255)
        splits.append(Split(images, ds.targets.to(device)))
    return splits[0], splits[1], list(ds.classes)


def load_splits(config, device, allow_download=True):
    """The training and test Splits a config asks for (its subset; the test set binarized once, seeded)."""
    train, test, class_names = load_dataset(config.DATA_DIR, config.DATASET, device, allow_download)
    if config.TRAIN_SUBSET:
        train = Split(train.images[: config.TRAIN_SUBSET], train.labels[: config.TRAIN_SUBSET])
    if config.BINARIZE:  # one fixed binary draw of the test set (on the CPU: the same on every device)
        drawn = torch.bernoulli(test.images.cpu(), generator=torch.Generator().manual_seed(0))
        test = Split(drawn.to(device), test.labels)
    train.settings = test.settings = {name: config.as_dict().get(name) for name in DATA_SETTINGS}
    return train, test, class_names


# --------------------------------------------------------------------------- files

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})  # full disk or quota


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
        if err.errno not in DISK_FULL_ERRNOS:
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


# The savers render into memory and write the bytes: the renderers' own file handling would report a full disk in
# their own terms (torch.save: "enforce fail at inline_container.cc"); a plain write reports ENOSPC.


def save_image_grid(images, path, nrow, side=28):
    """Save rows of side*side pixels as a PNG grid of `nrow` columns (torchvision's layout, 2-pixel gaps)."""
    from torchvision.utils import save_image

    buffer = io.BytesIO()
    save_image(images.detach().reshape(-1, 1, side, side).cpu(), buffer, nrow=nrow, format="png")
    return write_bytes_atomically(buffer.getbuffer(), path)


def save_figure(figure, path):
    """Save a matplotlib figure as PNG, atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return write_bytes_atomically(buffer.getbuffer(), path)


def write_json(data, path):
    """Write `data` as indented JSON, atomically."""
    return write_bytes_atomically((json.dumps(data, indent=2) + "\n").encode(), path)


# --------------------------------------------------------------------------- checkpoints and cell order


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable, incomplete, unfinished, or from other settings."""


class NotebookOrderError(RuntimeError):
    """A cell was run out of order: what it needs is missing, or was built with other settings."""


CHECKPOINT_KEYS = ("model", "optimizer", "rng", "config", "history", "device", "run_id")
DATA_CELL = "the data cell (section 3, `train, test, class_names = ...`)"
MODEL_CELL = "the model cell (section 4, `model = VAE(...)`)"
OPTIMIZER_CELL = "the optimizer cell (section 6, `optimizer = ...`)"
TRAINING_CELL = "the training cell (section 6)"

_runs = weakref.WeakKeyDictionary()  # model -> what its training run is: {"path", "run_id", "config", "epochs"}


def _rng_state():
    """The states of torch's global random streams: the CPU's, and CUDA's or MPS's where present."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


def read_checkpoint(path, fix):
    """torch.load a checkpoint safely (weights_only) and check its entries; CheckpointError ending with `fix`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, random bytes, or a pickle with disallowed globals
        raise CheckpointError(f"Cannot read checkpoint {path}: it is truncated or corrupt ({err}). {fix}") from err
    if not isinstance(state, dict) or not all(key in state for key in CHECKPOINT_KEYS):
        raise CheckpointError(f"Checkpoint {path} lacks some of {list(CHECKPOINT_KEYS)}. {fix}")
    return state


def _settings_changed(old, new, names):
    """'NAME: old -> new; ...' for the names whose values differ ('' if none)."""
    return "; ".join(f"{n}: {old.get(n)!r} -> {new.get(n)!r}" for n in names if old.get(n) != new.get(n))


def _check_cells(config, model, splits):
    """NotebookOrderError naming the earliest cell to run if the data or `model` no longer fit `config`."""
    wanted = config.as_dict()
    for split in splits:
        changed = _settings_changed(split.settings, wanted, DATA_SETTINGS)
        if changed:
            raise NotebookOrderError(f"Settings changed after the data was loaded ({changed}). Run {DATA_CELL} and "
                                     "the cells after it, in order.")
    run = _runs.get(model)
    changed = run and _settings_changed(run["config"], wanted, RUN_SETTINGS)
    if changed:
        data_changed = _settings_changed(run["config"], wanted, DATA_SETTINGS)  # the data must be reloaded first
        cell = DATA_CELL if data_changed else MODEL_CELL
        raise NotebookOrderError(f"Settings changed after this model started training ({changed}). Run {cell} "
                                 "and the cells after it, in order, to train with them.")


def resume(checkpoint_path, model, optimizer, config, train, test):
    """The history of the epochs done so far, with model, optimizer and random streams as they were after them.

    The checkpoint is the single truth: a model that has started training here continues from the last epoch
    saved in `checkpoint_path`, whatever happened since (an interrupt, an error); so does RESUME = True after a
    restart. Otherwise training starts afresh, from the seed. Cells run out of order raise NotebookOrderError.
    """
    if {id(p) for group in optimizer.param_groups for p in group["params"]} != {id(p) for p in model.parameters()}:
        raise NotebookOrderError(f"`optimizer` belongs to another `model`: {MODEL_CELL} was run after the optimizer "
                                 f"was created. Run {OPTIMIZER_CELL}, then this cell.")
    _check_cells(config, model, (train, test))
    path = Path(checkpoint_path)
    run = _runs.get(model)
    fix = f"Delete {path} (or set RESUME = False) to start afresh, or choose another OUT_DIR."
    state = None
    if run is None and config.RESUME and path.exists():
        state = read_checkpoint(path, fix)
        changed = _settings_changed(state["config"], config.as_dict(), RUN_SETTINGS)
        here = str(next(model.parameters()).device)  # another device draws other noise: not the same run
        if state["device"] != here:
            changed = "; ".join(filter(None, [changed, f"device: {state['device']!r} -> {here!r}"]))
        if changed:
            raise CheckpointError(f"Checkpoint {path} was made with other settings ({changed}). {fix}")
        run = _runs[model] = {"path": path, "run_id": state["run_id"], "config": state["config"]}
        print(f"resuming from {path} after epoch {len(state['history'])}")
    elif run is None:  # a new run: the model cell has just built `model`
        if config.RESUME:
            print(f"RESUME is set but there is no {path}: training from the start")
        torch.manual_seed(config.SEED)  # the random streams of training start here, whatever ran before
        run = _runs[model] = {"path": path, "run_id": secrets.token_hex(8), "config": config.as_dict()}
        save_checkpoint(path, model, optimizer, config, [])  # epoch 0: what an interrupted first epoch goes back to
        return []
    elif run["path"] != path:
        raise NotebookOrderError(f"This model's training run writes to {run['path']}, not {path}: OUT_DIR changed. "
                                 f"Run {MODEL_CELL} and the cells after it, in order.")
    state = state or read_checkpoint(path, fix)
    if state["run_id"] != run["run_id"]:
        raise CheckpointError(f"{path} now holds another training run (another notebook or process wrote it). "
                              f"Run {MODEL_CELL} and the cells after it to start afresh, or use another OUT_DIR.")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    run["epochs"] = len(state["history"])
    if run["epochs"] >= config.EPOCHS:
        print(f"Trained {run['epochs']} epochs already (EPOCHS = {config.EPOCHS}): nothing to train. To train more, "
              "raise EPOCHS in the parameters cell, run it and the next cell, then this cell again.")
    return state["history"]


def save_checkpoint(checkpoint_path, model, optimizer, config, history):
    """Write everything needed to continue after the last epoch of `history`; refuse a loss that is nan or inf."""
    if history and not all(math.isfinite(value) for value in history[-1].values()):
        raise FloatingPointError(
            f"The loss became nan or inf in epoch {len(history)} ({history[-1]}). That epoch was not saved; "
            f"{checkpoint_path} still holds epoch {len(history) - 1}. Try a smaller LEARNING_RATE (the default is "
            "1e-3), and check that the data is in [0, 1].")
    run = _runs[model]
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": _rng_state(),
             "config": run["config"] | {"EPOCHS": config.EPOCHS}, "history": history,
             "device": str(next(model.parameters()).device), "run_id": run["run_id"]}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomically(buffer.getbuffer(), checkpoint_path)
    run["epochs"] = len(history)


def require_trained(model, config, *splits):
    """Raise NotebookOrderError, naming the cell to run, unless `model` finished training with `config`."""
    run = _runs.get(model)
    if run is None:
        raise NotebookOrderError(f"`model` has not been trained: run {OPTIMIZER_CELL} and {TRAINING_CELL} first.")
    _check_cells(config, model, splits)
    if run.get("epochs", 0) < config.EPOCHS:
        raise NotebookOrderError(f"`model` has completed {run.get('epochs', 0)} of EPOCHS = {config.EPOCHS} epochs: "
                                 f"run {TRAINING_CELL} first.")


def load_trained_checkpoint(path, dataset):
    """A finished training run's checkpoint, for evaluation; CheckpointError saying what to do instead."""
    path = Path(path)
    walkthrough = "Variational_autoencoder.ipynb"
    if not path.is_file():
        raise CheckpointError(f"There is no checkpoint {path}: this notebook evaluates a trained model. Run "
                              f"{walkthrough} first (make run) with the same OUT_DIR, or set OUT_DIR to its folder.")
    state = read_checkpoint(path, f"Train again: run {walkthrough} with this OUT_DIR ({path.parent}).")
    trained = state["config"]
    if len(state["history"]) < trained["EPOCHS"]:
        raise CheckpointError(f"Checkpoint {path} holds {len(state['history'])} of its {trained['EPOCHS']} epochs: "
                              f"training was interrupted. Run {walkthrough}'s training cell again, or run it with "
                              "RESUME = True (VAE_RESUME=1) and the same OUT_DIR, then this notebook.")
    if trained["DATASET"] != dataset:
        raise CheckpointError(f"Checkpoint {path} was trained on DATASET={trained['DATASET']!r}, but this notebook "
                              f"is set to DATASET={dataset!r}. Set DATASET = {trained['DATASET']!r}, or point "
                              "OUT_DIR at a run trained on it.")
    return state


# --------------------------------------------------------------------------- tools


def load_notebook_definitions(notebook_path, tag="definitions", namespace=None):
    """Run a notebook's top-level imports and its cells tagged `tag` in `namespace` (default: a new dict)."""
    notebook = json.loads(Path(notebook_path).read_text())
    namespace = {"__name__": "notebook_definitions"} if namespace is None else namespace
    for cell in notebook["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] != "code":
            continue
        if tag in cell.get("metadata", {}).get("tags", []):
            exec(compile(source, f"{notebook_path}:{tag}", "exec"), namespace)
        else:  # other cells do work: only their imports, including those inside a top-level `try`
            body = [inner for node in ast.parse(source).body for inner in (node.body if isinstance(node, ast.Try)
                                                                            else [node])]
            imports = [node for node in body if isinstance(node, (ast.Import, ast.ImportFrom))]
            exec(compile(ast.Module(body=imports, type_ignores=[]), str(notebook_path), "exec"), namespace)
    return namespace
