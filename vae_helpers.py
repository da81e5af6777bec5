"""Plumbing for Variational_autoencoder.ipynb and its companion, so the notebooks stay about the VAE.

Sections, in the order the notebook uses them:
  configuration   read_config, read_evaluation_config: a parameters cell's constants, overridden by VAE_* variables
  setup           seed_everything, choose_device, library_versions, prepare_out_dir (warns if the disk is nearly full)
  data            load_dataset: find MNIST (or Fashion-MNIST), verify its SHA-256, load as tensors; load_splits
  batches         shuffled_batches, ordered_batches, check_finite, ProgressLine
  artifacts       atomic_path, write_bytes_atomically, save_image_grid, save_figure, write_json (write to a temp
                  file, rename); DiskFullError says which file, which folder and how much space a run needs
  checkpoints     save_checkpoint, load_checkpoint, capture_rng_state, restore_rng_state;
                  load_trained_checkpoint, checkpoint_config (for the companion, Evaluating_a_trained_VAE.ipynb)
  training state  TrainingRun (an epoch completes or is rolled back), trained_run and check_data (cells run out
                  of order stop with the cell to run), FairThreads (fewer threads while other processes are busy)
  tests & tools   load_notebook_definitions, check_run

Nothing runs at import: every function takes what it uses as parameters.
"""

import ast
import contextlib
import copy
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import platform
import random
import secrets
import shutil
import sys
import tempfile
import time
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch

# --------------------------------------------------------------------------- configuration

ENV_PREFIX = "VAE_"


class ConfigError(ValueError):
    """A setting has a value the notebook cannot use."""


def _parse_bool(text):
    """'1', 'true', 'yes', 'on' -> True; '0', 'false', 'no', 'off' -> False."""
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _parse_int(minimum):
    """A parser for whole numbers >= minimum (a float such as 2.0 is refused: it hides typos)."""

    def parse(text):
        if isinstance(text, bool):
            raise ValueError(text)
        value = text if isinstance(text, int) else int(str(text).strip())
        if value < minimum:
            raise ValueError(text)
        return value

    return parse


def _parse_float(minimum, inclusive):
    """A parser for finite floats above (or at, if inclusive) minimum."""

    def parse(text):
        value = float(str(text).strip())
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise ValueError(text)
        return value

    return parse


def _parse_choice(*choices):
    """A parser that accepts one of `choices`, case-insensitively."""

    def parse(text):
        value = str(text).strip().lower()
        if value not in choices:
            raise ValueError(text)
        return value

    return parse


def _parse_device(text):
    """'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'."""
    value = str(text).strip().lower()
    if value in ("auto", "cpu", "mps", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError(text)


def _parse_path(text):
    """A non-empty path, with ~ expanded."""
    if not str(text).strip():
        raise ValueError(text)
    return str(Path(str(text).strip()).expanduser())


# name: (parser, what it accepts). The walkthrough's parameters cell supplies the defaults.
SETTINGS = {
    "EPOCHS": (_parse_int(1), "a whole number >= 1"),
    "BATCH_SIZE": (_parse_int(1), "a whole number >= 1"),
    "LATENT_DIM": (_parse_int(1), "a whole number >= 1"),
    "LEARNING_RATE": (_parse_float(0.0, inclusive=False), "a number > 0, such as 1e-3"),
    "SEED": (_parse_int(0), "a whole number >= 0"),
    "DATA_DIR": (_parse_path, "a folder path"),
    "OUT_DIR": (_parse_path, "a folder path"),
    "TRAIN_SUBSET": (_parse_int(0), "a whole number >= 0 (0 = all training images)"),
    "DEVICE": (_parse_device, "auto, cpu, cuda, cuda:N or mps"),
    "DATASET": (_parse_choice("mnist", "fashion"), "mnist or fashion"),
    "BETA": (_parse_float(0.0, inclusive=True), "a number >= 0 (1 = the plain VAE)"),
    "BINARIZE": (_parse_bool, "0 or 1"),
    "RESUME": (_parse_bool, "0 or 1"),
}

# The companion notebook's parameters cell (Evaluating_a_trained_VAE.ipynb): the rest comes from the checkpoint.
EVALUATION_SETTINGS = {
    "OUT_DIR": SETTINGS["OUT_DIR"],
    "DATA_DIR": SETTINGS["DATA_DIR"],
    "DATASET": SETTINGS["DATASET"],
    "DEVICE": SETTINGS["DEVICE"],
    "IW_SAMPLES": (_parse_int(1), "a whole number >= 1"),
    "IW_TEST_IMAGES": (_parse_int(1), "a whole number >= 1"),
}

# Every VAE_* name either notebook reads: a VAE_* variable outside this set is a typo, and is refused.
KNOWN_SETTINGS = frozenset(SETTINGS) | frozenset(EVALUATION_SETTINGS)

# Settings that change the numbers a run produces; a checkpoint must agree on all of them to be
# resumed. EPOCHS is not among them: resuming with a larger EPOCHS continues the same run.
RUN_DEFINING_SETTINGS = (
    "BATCH_SIZE",
    "LATENT_DIM",
    "LEARNING_RATE",
    "SEED",
    "TRAIN_SUBSET",
    "DATASET",
    "BETA",
    "BINARIZE",
)


@dataclasses.dataclass(frozen=True)
class Config:
    """One run's settings, checked; field names are the parameters cell's names in lower case."""

    epochs: int
    batch_size: int
    latent_dim: int
    learning_rate: float
    seed: int
    data_dir: str
    out_dir: str
    train_subset: int
    device: str
    dataset: str
    beta: float
    binarize: bool
    resume: bool

    def as_dict(self):
        """The settings as a JSON-ready dict keyed by the parameters cell's names."""
        return {field.name.upper(): getattr(self, field.name) for field in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """The companion notebook's settings, checked; field names are its parameters cell's names in lower case."""

    out_dir: str
    data_dir: str
    dataset: str
    device: str
    iw_samples: int
    iw_test_images: int

    def as_dict(self):
        """The settings as a JSON-ready dict keyed by the parameters cell's names."""
        return {field.name.upper(): getattr(self, field.name) for field in dataclasses.fields(self)}


def read_config(defaults, environ, settings=None, config_class=None):
    """Check the parameters' values (cell or papermill), apply VAE_NAME overrides (they win), return a Config."""
    settings = SETTINGS if settings is None else settings
    config_class = Config if config_class is None else config_class
    unknown_defaults = sorted(set(defaults) - set(settings))
    if unknown_defaults:
        raise ConfigError(f"Unknown setting(s) {unknown_defaults}; known: {sorted(settings)}.")
    unknown_env = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :] not in KNOWN_SETTINGS)
    if unknown_env:
        known = ", ".join(ENV_PREFIX + name for name in sorted(KNOWN_SETTINGS))
        raise ConfigError(f"Unknown environment variable(s) {unknown_env}. Known: {known}.")
    values = {}
    for name, (parse, accepts) in settings.items():
        if name not in defaults:
            raise ConfigError(f"The parameters cell does not define {name} ({accepts}).")
        env_name = ENV_PREFIX + name
        raw, source = (environ[env_name], env_name) if env_name in environ else (defaults[name], name)
        try:
            values[name.lower()] = parse(raw)
        except (TypeError, ValueError):
            if source == env_name:
                message = (f"environment variable {env_name}={raw!r} is invalid: {name} must be {accepts}. "
                           f"Fix it (for example {env_name}={defaults[name]!r}) or unset {env_name}.")
            else:
                message = (f"parameter {name}={raw!r} (from the parameters cell or papermill's -p) is invalid: "
                           f"{name} must be {accepts}. Pass a valid value (papermill: -p {name} <value>) "
                           "or correct the parameters cell.")
            raise ConfigError(message) from None
    return config_class(**values)


def read_evaluation_config(defaults, environ):
    """read_config for the companion notebook's parameters cell."""
    return read_config(defaults, environ, EVALUATION_SETTINGS, EvaluationConfig)


# --------------------------------------------------------------------------- setup


def seed_everything(seed):
    """Seed Python, NumPy and torch, and make torch pick deterministic kernels."""
    # cuBLAS needs this before its first call to be deterministic; harmless elsewhere.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CPU, CUDA and MPS generators
    torch.use_deterministic_algorithms(True)


def choose_device(name):
    """Resolve 'auto' to cuda, then mps, then cpu; refuse an explicit device that is not available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"DEVICE={name!r} but torch sees no CUDA GPU. Use VAE_DEVICE=auto or VAE_DEVICE=cpu.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("DEVICE='mps' but this machine has no usable MPS. Use VAE_DEVICE=auto or VAE_DEVICE=cpu.")
    return torch.device(name)


def library_versions():
    """Versions of Python and the libraries whose numbers a run depends on."""
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


class LowDiskSpaceWarning(UserWarning):
    """OUT_DIR's disk has less free space than a run is expected to need."""


def prepare_out_dir(path, needed_bytes=None):
    """Create the output folder, prove it is writable now (not after training), warn if its disk is nearly full."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OSError(
            f"OUT_DIR {str(out)!r} cannot be written to ({err.strerror or err}). "
            "Point VAE_OUT_DIR at a writable folder; nothing was trained or written."
        ) from err
    # A warning, not a refusal: the estimate is for the default settings, and a 1-epoch run needs less. It is
    # still worth saying now, because otherwise the first sign is a DiskFullError after an epoch of training.
    needed = space_needed(CHECKPOINT_BYTES_AT_DEFAULTS) if needed_bytes is None else needed_bytes
    with contextlib.suppress(OSError):  # disk_usage can fail on exotic mounts; the writes will still explain
        free = shutil.disk_usage(out).free
        if free < needed:
            warnings.warn(
                LowDiskSpaceWarning(
                    f"OUT_DIR {out} has only {_format_bytes(free)} free, and a run at the default settings needs "
                    f"about {_format_bytes(needed)} there (the {_format_bytes(CHECKPOINT_BYTES_AT_DEFAULTS)} "
                    "checkpoint vae.pt, a second copy of it while it is replaced each epoch, and the figures). "
                    "The run will probably stop with DiskFullError when it saves. Free space on that disk, or "
                    "point VAE_OUT_DIR at a folder on a disk with room."
                ),
                stacklevel=2,
            )
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
# DATASET setting -> (torchvision class name, folder under DATA_DIR, expected files)
DATASETS = {
    "mnist": ("MNIST", "MNIST", MNIST_FILES),
    "fashion": ("FashionMNIST", "FashionMNIST", FASHION_MNIST_FILES),
}


class DataError(RuntimeError):
    """The data set is missing, incomplete or not the published files."""


@dataclasses.dataclass
class Split:
    """One split of a data set: images as float rows in [0, 1], labels as integers."""

    images: torch.Tensor  # (N, 784) float32, on the training device
    labels: torch.Tensor  # (N,) int64, on the training device
    settings: dict = dataclasses.field(default_factory=dict)  # the DATA_SETTINGS it was loaded with


def sha256_of(path):
    """The SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def missing_files(raw_dir, expected_files):
    """The names in `expected_files` that are not files in `raw_dir`."""
    return [name for name in expected_files if not (Path(raw_dir) / name).is_file()]


def verify_files(raw_dir, expected_files):
    """Raise DataError unless every file in raw_dir has the expected size and SHA-256."""
    for name, (size, sha256) in expected_files.items():
        path = Path(raw_dir) / name
        actual_size = path.stat().st_size
        problem = None
        if actual_size != size:
            problem = f"is {actual_size:,} bytes, expected {size:,} (truncated or not this file)"
        elif sha256_of(path) != sha256:
            problem = "has the right size but the wrong SHA-256 (altered or corrupted)"
        if problem:
            raise DataError(
                f"{path} {problem}. Training did not start. Delete the file and run again to "
                f"re-download it, or point VAE_DATA_DIR at a verified copy. Expected SHA-256: {sha256}."
            )


def _missing_data_message(name, raw_dir, expected_files, reason):
    """The message for data that is neither on disk nor downloadable."""
    return (
        f"{name} is not in {raw_dir} and {reason}.\n"
        f"Expected these four files there: {', '.join(expected_files)}.\n"
        "Fix: copy them into that folder (uncompressed, torchvision's layout <DATA_DIR>/<name>/raw/), "
        "or set VAE_DATA_DIR to the folder that holds them, or run where the download can reach the internet."
    )


def load_dataset(data_dir, dataset, device, allow_download, expected_files=None):
    """Find (or download), verify and load a data set; returns (train Split, test Split, class names)."""
    from torchvision import datasets

    class_name, folder, known_files = DATASETS[dataset]
    expected_files = known_files if expected_files is None else expected_files
    dataset_class = getattr(datasets, class_name)
    raw_dir = Path(data_dir) / folder / "raw"
    if missing_files(raw_dir, expected_files):
        if not allow_download:
            raise DataError(_missing_data_message(class_name, raw_dir, expected_files, "downloading is switched off"))
        try:
            dataset_class(root=data_dir, train=True, download=True)
        except Exception as err:  # URLError, HTTPError, OSError, RuntimeError: all mean "no data"
            reason = f"the download failed ({type(err).__name__}: {err})"
            raise DataError(_missing_data_message(class_name, raw_dir, expected_files, reason)) from err
        still_missing = missing_files(raw_dir, expected_files)
        if still_missing:
            reason = f"the download did not produce {still_missing}"
            raise DataError(_missing_data_message(class_name, raw_dir, expected_files, reason))
    verify_files(raw_dir, expected_files)
    splits = []
    for train in (True, False):
        ds = dataset_class(root=data_dir, train=train, download=False)
        # ds.data is (N, 28, 28) uint8; /255 gives exactly what transforms.ToTensor() gives.
        images = ds.data.reshape(len(ds.data), -1).to(device=device, dtype=torch.float32).div_(255)
        splits.append(Split(images=images, labels=ds.targets.to(device)))
    return splits[0], splits[1], list(ds.classes)


# The settings the loaded tensors depend on: if one changes, the data must be loaded again.
DATA_SETTINGS = ("DATA_DIR", "DATASET", "TRAIN_SUBSET", "BINARIZE", "DEVICE")


def load_splits(config, device, allow_download=True):
    """The training and test Splits a config asks for (subset, fixed test binarization), and the class names."""
    train, test, class_names = load_dataset(config.data_dir, config.dataset, device, allow_download)
    if config.train_subset:
        train = Split(train.images[: config.train_subset], train.labels[: config.train_subset])
    if config.binarize:  # one fixed binary draw of the test set, so that test losses stay comparable
        test = Split(torch.bernoulli(test.images, generator=torch.Generator(device).manual_seed(0)), test.labels)
    settings = {name: config.as_dict()[name] for name in DATA_SETTINGS}
    train.settings = test.settings = settings  # what they were loaded with, so a later setting change is noticed
    return train, test, class_names


# --------------------------------------------------------------------------- batches


def shuffled_batches(images, batch_size, generator):
    """Yield `images` in batches of `batch_size` rows, in an order drawn from `generator`; last may be short."""
    # One permutation per epoch on the CPU generator (so it is the same on every device), moved once.
    order = torch.randperm(len(images), generator=generator).to(images.device, non_blocking=True)
    for start in range(0, len(images), batch_size):
        yield images.index_select(0, order[start : start + batch_size])


def ordered_batches(images, batch_size):
    """Yield `images` in fixed order, in batches of `batch_size` rows (views, no copies)."""
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def check_finite(batch_losses, epoch):
    """Raise FloatingPointError naming the first batch (row) of `batch_losses` that is nan or inf."""
    finite = torch.isfinite(batch_losses).all(dim=-1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0])
        raise FloatingPointError(
            f"The loss became non-finite ({batch_losses[row].tolist()}) at epoch {epoch}, batch {row + 1}. "
            "Training stopped: nothing from this epoch was saved, and files written before it are untouched. "
            "Try a smaller LEARNING_RATE (the default is 1e-3) and check that the data is in [0, 1]."
        )


class ProgressLine:
    """One line of text that updates in place in Jupyter (a display, not a widget); silent elsewhere."""

    def __init__(self):
        self._handle = None
        try:
            from IPython import get_ipython
            from IPython.display import Pretty, display

            if get_ipython() is not None:
                self._handle = display(Pretty(""), display_id=True)
        except ImportError:
            pass

    def update(self, text):
        """Replace the line's text."""
        if self._handle is not None:
            from IPython.display import Pretty

            self._handle.update(Pretty(text))


# --------------------------------------------------------------------------- artifacts

# The errno values that mean "no room": the disk is full, or the user's quota is used up (Windows has no EDQUOT).
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})

# vae.pt at the defaults: 1,082,680 parameters x 4 bytes x 3 (the weights and Adam's two moment estimates), plus
# about 27 KB of history, settings and random states. tests/test_helpers.py checks it against the notebook's model.
CHECKPOINT_BYTES_AT_DEFAULTS = 13_020_000

# Everything else a run writes: six or seven PNGs and metrics.json, about 0.4 MB at the defaults; 1 MB leaves room.
OTHER_ARTIFACT_BYTES = 1_000_000


class DiskFullError(OSError):
    """Writing into OUT_DIR failed because its disk is full or over quota; errno is ENOSPC or EDQUOT."""

    def __str__(self):
        """The whole explanation (OSError's own form would wrap it in '[Errno 28] ...: file')."""
        return self.strerror


def _format_bytes(count):
    """A byte count the way df -H shows it: '13.0 MB', '250 KB'."""
    return f"{count / 1e6:.1f} MB" if count >= 1e6 else f"{count / 1e3:.0f} KB"


def space_needed(file_bytes):
    """The free space, in bytes (whole MB), to ask for after a file of `file_bytes` did not fit."""
    # Twice the file: the checkpoint is rewritten every epoch and its old copy is kept until the new one is
    # complete; plus the figures and metrics still to come. An upper bound: a file replacing an old one needs less.
    return math.ceil((2 * file_bytes + OTHER_ARTIFACT_BYTES) / 1e6) * 1_000_000


def disk_full_error(err, path, size):
    """A DiskFullError for `err` (ENOSPC or EDQUOT) from writing `size` bytes to `path`: what, where, how much, fix."""
    target = Path(path)
    folder = target.parent
    try:
        free = f"{_format_bytes(shutil.disk_usage(folder).free)} is free there now"
    except OSError:  # the folder itself may have gone
        free = "the free space there could not be read"
    problem = "the disk is full" if err.errno == errno.ENOSPC else "you are over your disk quota there"
    message = (
        f"Could not write {target.name} into OUT_DIR {folder}: {problem} ({err.strerror or err}). "
        f"{target.name} is {_format_bytes(size)}; the run needs about {_format_bytes(space_needed(size))} free "
        f"in that folder (a second copy exists while a file is replaced, and the figures and metrics.json take up "
        f"to 1 MB), and {free}. Nothing was damaged: the files already there (an older {target.name}, if any, "
        "included) are whole, and the partial file was removed. Fix: free space on that disk, or point VAE_OUT_DIR "
        "at a folder on a disk with room, then run again; VAE_RESUME=1 continues from the last epoch saved in "
        "vae.pt (copy it along if you change VAE_OUT_DIR)."
    )
    return DiskFullError(err.errno, message, str(target))


def _remove(path):
    """Delete a file if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def atomic_path(path, size=None):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    # A full disk or quota, while writing or renaming, becomes a DiskFullError. `size` (what was being written)
    # is for its message; without it, whatever reached the temporary file is a lower bound.
    target = Path(path)
    # Same folder, so the rename is atomic; the writer creates the file, so it gets the usual permissions.
    temp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield temp
        os.replace(temp, target)
    except OSError as err:
        if err.errno not in DISK_FULL_ERRNOS:
            raise
        if size is None:
            with contextlib.suppress(OSError):
                size = temp.stat().st_size
        _remove(temp)  # before the message measures the free space, so the partial file is not counted as used
        raise disk_full_error(err, target, size or 0) from err
    finally:
        _remove(temp)


def write_bytes_atomically(data, path):
    """Write `data` (bytes) to `path` atomically; a full disk or quota raises DiskFullError."""
    with atomic_path(path, size=len(data)) as temp:
        with open(temp, "xb") as handle:
            handle.write(data)
            handle.flush()
            # Network file systems, quotas and delayed allocation may report a full disk only here (or at
            # close), not at write(); it also makes the renamed file survive a power cut.
            os.fsync(handle.fileno())
    return Path(path)


# The savers below render into memory and then write the bytes: the renderers' own file handling would report a
# full disk in their own terms (torch.save: "RuntimeError: [enforce fail at inline_container.cc] unexpected pos"),
# while a plain write reports ENOSPC, which atomic_path turns into a DiskFullError. The files are at most 13 MB.


def save_image_grid(images, path, nrow, side=28):
    """Save rows of `side`*`side` pixels as a PNG grid of `nrow` columns (torchvision's layout, 2 px gaps)."""
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


# --------------------------------------------------------------------------- checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed: unreadable, incomplete, or from another configuration."""


CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "config", "history", "train_seconds", "rng")


def capture_rng_state(generators):
    """The states of named torch.Generators, as tensors that torch.load(weights_only=True) reads."""
    return {name: generator.get_state() for name, generator in generators.items()}


def restore_rng_state(state, generators):
    """Put back the states captured by capture_rng_state."""
    for name, generator in generators.items():
        generator.set_state(state[name])


def save_checkpoint(state, path):
    """Write a checkpoint dict with torch.save, atomically; a full disk or quota raises DiskFullError."""
    buffer = io.BytesIO()  # see the note above save_image_grid: torch.save's zip writer hides ENOSPC
    torch.save(state, buffer)
    return write_bytes_atomically(buffer.getbuffer(), path)


def load_checkpoint(path, config_dict):
    """Load a checkpoint safely (weights_only) and check it belongs to this configuration."""
    advice = f"Delete {path}, or set VAE_RESUME=0 to start fresh (the new run replaces it), or use another VAE_OUT_DIR."
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, random bytes, or a pickle with disallowed globals
        raise CheckpointError(f"Cannot read checkpoint {path}: it is truncated or corrupt ({err}). {advice}") from err
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        raise CheckpointError(f"Checkpoint {path} lacks the entries {list(CHECKPOINT_KEYS)}. {advice}")
    differences = {
        name: (state["config"].get(name), config_dict[name])
        for name in RUN_DEFINING_SETTINGS
        if state["config"].get(name) != config_dict[name]
    }
    if differences:
        listed = "; ".join(f"{name}: checkpoint {old!r}, now {new!r}" for name, (old, new) in differences.items())
        raise CheckpointError(f"Checkpoint {path} was made with other settings ({listed}). {advice}")
    return state


WALKTHROUGH = "Variational_autoencoder.ipynb"


def checkpoint_config(state, **replacements):
    """The training Config a checkpoint stores (its 13 settings, checked), with some replaced, e.g. DATA_DIR=...

    VAE_* variables are not applied: they belong to the notebook that reads the checkpoint, not to the run that
    made it. Entries a checkpoint holds beyond SETTINGS (older runs stored IW_SAMPLES, IW_TEST_IMAGES) are ignored.
    """
    stored = state["config"]
    missing = [name for name in SETTINGS if name not in stored]
    if missing:
        raise ConfigError(f"its configuration lacks {missing}")
    return read_config({**{name: stored[name] for name in SETTINGS}, **replacements}, {})


def load_trained_checkpoint(path, dataset):
    """Load a finished training run's checkpoint for evaluation (weights_only), or say what to do instead.

    Raises CheckpointError if the file is missing, unreadable, incomplete, holds an interrupted run
    (epoch < EPOCHS), or was trained on a data set other than `dataset`. Returns the checkpoint dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"There is no checkpoint {path}: this notebook evaluates a trained model. Run {WALKTHROUGH} first "
            "(make run) with the same OUT_DIR, or point OUT_DIR/VAE_OUT_DIR at the folder that holds its vae.pt."
        )
    train_again = f"Train again: run {WALKTHROUGH} with VAE_RESUME=0 and this OUT_DIR ({path.parent})."
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, random bytes, or a pickle with disallowed globals
        problem = f"Cannot read checkpoint {path}: it is truncated or corrupt ({err})."
        raise CheckpointError(f"{problem} {train_again}") from err
    missing = [key for key in CHECKPOINT_KEYS if key not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if not missing and not isinstance(state["config"], dict):
        missing = ["config (not a dict)"]
    if missing:
        raise CheckpointError(f"Checkpoint {path} is incomplete: it lacks {missing}. {train_again}")
    try:
        trained = checkpoint_config(state)
    except ConfigError as err:
        raise CheckpointError(f"Checkpoint {path} has an unusable configuration: {err}. {train_again}") from None
    if state["epoch"] < trained.epochs:
        raise CheckpointError(
            f"Checkpoint {path} holds {state['epoch']} of its {trained.epochs} epochs: training was interrupted. "
            f"Finish it first: run {WALKTHROUGH} again with RESUME = True (VAE_RESUME=1) and the same OUT_DIR "
            "(its training cell continues from the last epoch), then run this notebook."
        )
    if trained.dataset != dataset:
        raise CheckpointError(
            f"Checkpoint {path} was trained on DATASET={trained.dataset!r}, but this notebook is set to "
            f"DATASET={dataset!r}. Set DATASET = {trained.dataset!r} (VAE_DATASET={trained.dataset}) to evaluate it, "
            f"or point OUT_DIR/VAE_OUT_DIR at a run trained on {dataset!r}."
        )
    return state


# --------------------------------------------------------------------------- training state


class NotebookOrderError(RuntimeError):
    """A cell was run out of order: what it needs is missing, or was built with other settings."""


# What to run when a setting changed after the things that depend on it were built: the first cell, in notebook
# order, whose result depends on it. EPOCHS and RESUME are left out: raising EPOCHS continues the same run.
CELL_TO_RERUN = {
    **dict.fromkeys(DATA_SETTINGS, "the data cell (section 3, `train, test, class_names = ...`)"),
    **dict.fromkeys(("LATENT_DIM", "SEED"), "the model cell (section 4, `model = VAE(...)`)"),
    **dict.fromkeys(("BATCH_SIZE", "LEARNING_RATE", "BETA", "OUT_DIR"),
                    "the cell that creates the optimizer (section 6, `optimizer = ...`)"),
}
CELL_ORDER = list(dict.fromkeys(CELL_TO_RERUN.values()))

# Models with a TrainingRun: lets a later cell find the run that trained `model`, and see that there is none.
_RUNS = weakref.WeakKeyDictionary()


def _changed(built_with, config_dict, names):
    """The names among `names` whose value in `built_with` differs from `config_dict`'s."""
    return [name for name in names if built_with.get(name) != config_dict[name]]


def _order_error(built_with, config_dict, changed):
    """A NotebookOrderError naming what changed and the earliest cell to run again."""
    changes = "; ".join(f"{name}: {built_with.get(name)!r} -> {config_dict[name]!r}" for name in changed)
    cell = min((CELL_TO_RERUN[name] for name in changed), key=CELL_ORDER.index)
    return NotebookOrderError(f"Settings changed after this state was built ({changes}). Run {cell} and the cells "
                              "after it, in order (or Kernel > Restart & Run All).")


def check_data(config, *splits):
    """Raise NotebookOrderError if a Split was loaded with settings other than `config`'s."""
    wanted = config.as_dict()
    for split in splits:
        changed = _changed(split.settings, wanted, DATA_SETTINGS)
        if changed:
            raise _order_error(split.settings, wanted, changed)


def has_initial_weights(model, seed):
    """True if `model` holds the weights it is built with right after torch.manual_seed(seed)."""
    fresh = copy.deepcopy(model).cpu()
    with torch.random.fork_rng(devices=[]):  # the global stream is left where it was
        torch.manual_seed(seed)
        for module in fresh.modules():  # the order the layers were created in, so the same draws land in each
            if module is not fresh and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    current = model.state_dict()
    return all(torch.equal(value, current[name].cpu()) for name, value in fresh.state_dict().items())


class TrainingRun:
    """Everything training changes: model and optimizer state, two random streams, the history, the epoch count.

    Epochs run inside `epoch()`: an epoch either completes (history appended, checkpoint written) or, if it is
    interrupted or fails, leaves the state exactly as it was when the epoch began. So the training cell can be
    interrupted anywhere and run again, and continues as a run that was never interrupted.
    """

    def __init__(self, model, optimizer, config, checkpoint_path, device):
        self.model, self.optimizer, self.config = model, optimizer, config
        self.checkpoint_path = Path(checkpoint_path)
        self.generators = {
            "shuffle": torch.Generator().manual_seed(config.seed),  # batch order, on the CPU for every device
            "noise": torch.Generator(device).manual_seed(config.seed + 1),  # eps (and binarization) in training
        }
        self.history = {"train_recon": [], "train_kl": [], "test_recon": [], "test_kl": []}  # per image, per epoch
        self.epochs_done, self.train_seconds = 0, 0.0
        self._snapshot = None
        if config.resume and self.checkpoint_path.exists():
            self._load(load_checkpoint(self.checkpoint_path, config.as_dict()))
            print(f"resumed from {self.checkpoint_path} after epoch {self.epochs_done}")
        else:
            if config.resume:
                print(f"RESUME is set but there is no {self.checkpoint_path}: training from the start")
            if model in _RUNS or not has_initial_weights(model, config.seed):
                raise NotebookOrderError(
                    f"`model` does not hold the initial weights for SEED = {config.seed}: it has been trained "
                    "already, or was built with another seed. Run the model cell (section 4, `model = VAE(...)`), "
                    "then this cell."
                )
        _RUNS[model] = self

    def state_dict(self):
        """The checkpoint: everything needed to continue this run exactly."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "epoch": self.epochs_done, "config": self.config.as_dict(), "history": self.history,
                "train_seconds": self.train_seconds, "rng": capture_rng_state(self.generators)}

    def _load(self, state):
        """Make this run the one `state` describes (a checkpoint, or a snapshot taken at an epoch's start)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"], self.generators)
        self.history = {key: list(values) for key, values in state["history"].items()}
        self.epochs_done, self.train_seconds = state["epoch"], state["train_seconds"]

    def check(self, config, model, *splits):
        """Raise NotebookOrderError, naming the cell to run, unless `model`, the data and `config` fit this run."""
        if model is not self.model:
            raise NotebookOrderError(
                "`model` is not the model this training run holds: the model cell was run again after the optimizer "
                "was created. Run the cell that creates the optimizer (section 6, `optimizer = ...`), then this one."
            )
        check_data(config, *splits)
        built_with, wanted = self.config.as_dict(), config.as_dict()
        changed = _changed(built_with, wanted, CELL_TO_RERUN)
        if changed:
            raise _order_error(built_with, wanted, changed)

    def epochs_to_train(self, config, model, *splits):
        """The epochs from the last completed one up to config.epochs, after checking the notebook's state."""
        self.check(config, model, *splits)
        self.config = config  # only EPOCHS (or RESUME) can differ, and a larger EPOCHS continues this run
        if self.epochs_done >= config.epochs:
            print(f"Trained {self.epochs_done} epochs already (EPOCHS = {config.epochs}): nothing to train. To train "
                  "more, raise EPOCHS in the parameters cell, run it and the setup cell, then this cell again.")
        return range(self.epochs_done + 1, config.epochs + 1)

    @contextlib.contextmanager
    def epoch(self, epoch, progress=None):
        """Run one epoch's code; if it does not reach finish_epoch, put everything back as it was at its start."""
        self._snapshot = copy.deepcopy(self.state_dict())  # 13 MB at the defaults: milliseconds
        try:
            yield
        except BaseException as err:
            finished = self._snapshot is None
            if not finished:
                self._load(self._snapshot)
                self._snapshot = None
            where = (f"Stopped in epoch {epoch}; the model, optimizer, random streams and history are back at the "
                     f"end of epoch {epoch - 1}" if not finished else f"Stopped after epoch {epoch} was saved")
            message = f"{where}. Run this cell again to continue from there."
            if progress is not None:
                progress.update(message)
            if isinstance(err, KeyboardInterrupt):
                raise KeyboardInterrupt(message) from None
            err.add_note(message)
            raise

    def finish_epoch(self, train_terms, test_terms, seconds):
        """Record a completed epoch's per-image [recon, kl] terms and write the checkpoint."""
        for key, value in zip(self.history, [*train_terms.tolist(), *test_terms.tolist()]):
            self.history[key].append(value)
        self.epochs_done += 1
        self.train_seconds += seconds
        save_checkpoint(self.state_dict(), self.checkpoint_path)
        self._snapshot = None  # the epoch is complete: nothing to roll back from here on


def trained_run(model, config, *splits):
    """The TrainingRun that trained `model` for all config.epochs; else NotebookOrderError naming the cell to run."""
    run = _RUNS.get(model)
    if run is None:
        raise NotebookOrderError("`model` has not been trained: run section 6's cells (the one that creates the "
                                 "optimizer, then the training cell) first.")
    run.check(config, model, *splits)
    if run.epochs_done != config.epochs:
        raise NotebookOrderError(f"The model has been trained for {run.epochs_done} of EPOCHS = {config.epochs} "
                                 "epochs: run the training cell (section 6) first.")
    return run


class FairThreads:
    """Lower torch's CPU thread count while other processes keep cores busy, and restore it when they stop.

    PyTorch's OpenMP threads spin while they wait for each other. Alone that is fastest; with another busy process
    on the same cores, a spinning thread takes turns from the thread it waits for, and an epoch can take four times
    longer. Reads /proc/stat (Linux); elsewhere it changes nothing. The thread count does not change the arithmetic
    here (tests/test_training_state.py checks that a run with switching threads is bit-identical).
    """

    def __init__(self, interval=0.5):
        self.max_threads = torch.get_num_threads()
        self.cores = os.cpu_count() or 1
        self.interval = interval  # seconds between looks at the load
        self._last = self._sample()

    @staticmethod
    def _sample():
        """(seconds, CPU-seconds of work on the machine, CPU-seconds of this process), or None without /proc/stat."""
        try:
            with open("/proc/stat") as handle:
                user, nice, system, _idle, _iowait, irq, softirq = map(int, handle.readline().split()[1:8])
        except (OSError, ValueError):
            return None
        return time.monotonic(), (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"), time.process_time()

    def adjust(self):
        """Set the thread count to the cores other processes left free since the last call (at least 1)."""
        now = self._sample()
        if now is None or self._last is None or now[0] - self._last[0] < self.interval:
            return
        others = ((now[1] - self._last[1]) - (now[2] - self._last[2])) / (now[0] - self._last[0])  # busy cores
        self._last = now
        threads = max(1, min(self.max_threads, round(self.cores - max(others, 0.0))))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)


# --------------------------------------------------------------------------- tests & tools


def load_notebook_definitions(notebook_path, tag="definitions", namespace=None):
    """Run the notebook's import statements and its cells tagged `tag` in `namespace` (default: a new dict).

    Returns the namespace. Passing another notebook's namespace lets one notebook's definitions use the other's.
    """
    notebook = json.loads(Path(notebook_path).read_text())
    namespace = {"__name__": "notebook_definitions"} if namespace is None else namespace
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        if tag in cell.get("metadata", {}).get("tags", []):
            exec(compile(source, f"{notebook_path}:{tag}", "exec"), namespace)
        else:  # other cells do work; only their imports are needed by the tagged ones
            # top-level imports, and those inside a top-level `try` (an import with a clearer error if it fails)
            body = [inner for node in ast.parse(source).body
                    for inner in (node.body if isinstance(node, ast.Try) else [node])]
            imports = [node for node in body if isinstance(node, (ast.Import, ast.ImportFrom))]
            exec(compile(ast.Module(body=imports, type_ignores=[]), str(notebook_path), "exec"), namespace)
    return namespace


def _read_run_json(out, name, keys):
    """out/name as a dict holding `keys`; SystemExit with the reason if it is unreadable or lacks one."""
    try:
        data = json.loads((out / name).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise SystemExit(f"FAILED: {out / name} is unreadable ({type(err).__name__}: {err})") from None
    missing = [key for key in keys if not isinstance(data, dict) or key not in data]
    if missing:
        raise SystemExit(f"FAILED: {out / name} lacks {missing}")
    return data


def check_run(out_dir, max_test_loss, required_files=("samples.png", "metrics.json", "evaluation.json")):
    """Raise SystemExit with a reason unless `out_dir` holds a finished, evaluated run whose test loss is within
    bound (the walkthrough's metrics.json and samples.png, the companion's evaluation.json); returns both JSONs."""
    out = Path(out_dir)
    missing = [name for name in required_files if not (out / name).is_file()]
    if missing:
        raise SystemExit(f"FAILED: {out} lacks {missing}")
    metrics = _read_run_json(out, "metrics.json", ["final_test_loss"])
    evaluation = _read_run_json(out, "evaluation.json", ["importance_weighted"])
    loss, iw = metrics["final_test_loss"], evaluation["importance_weighted"]
    if not isinstance(iw, dict) or not {"nll", "K"} <= set(iw):
        raise SystemExit(f"FAILED: {out / 'evaluation.json'} has no importance-weighted bound (nll, K)")
    if not loss <= max_test_loss:
        raise SystemExit(f"FAILED: final test loss {loss:.3f} is above the bound {max_test_loss}")
    images = f" on {iw['test_images']:,} test images" if isinstance(iw.get("test_images"), int) else ""
    print(f"OK: final test loss {loss:.3f} <= {max_test_loss}; importance-weighted bound -L_K {iw['nll']:.3f} "
          f"(K = {iw['K']:,}{images}); {', '.join(required_files)} present in {out}")
    return metrics, evaluation


def main(argv):
    """Command line for the Makefile: `fetch DATA_DIR DATASET` or `check-run OUT_DIR MAX_TEST_LOSS` (both notebooks'
    results: metrics.json, evaluation.json, samples.png)."""
    if len(argv) == 3 and argv[0] == "fetch":
        train, test, _ = load_dataset(argv[1], argv[2], torch.device("cpu"), allow_download=True)
        print(f"{argv[2]} in {argv[1]}: {len(train.images):,} + {len(test.images):,} images, checksums verified")
    elif len(argv) == 3 and argv[0] == "check-run":
        check_run(argv[1], float(argv[2]))
    else:
        raise SystemExit(main.__doc__)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (DataError, ConfigError) as err:
        raise SystemExit(f"error: {err}") from None
