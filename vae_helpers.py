"""Plumbing for Variational_autoencoder.ipynb, so the notebook itself stays about the VAE.

Sections, in the order the notebook uses them:
  configuration   read_config: the parameters cell's constants, overridden by VAE_* variables
  setup           seed_everything, choose_device, library_versions, prepare_out_dir (warns if the disk is nearly full)
  data            load_dataset: find MNIST (or Fashion-MNIST), verify its SHA-256, load as tensors
  batches         shuffled_batches, ordered_batches, check_finite, ProgressLine
  artifacts       atomic_path, write_bytes_atomically, save_image_grid, save_figure, write_json (write to a temp
                  file, rename); DiskFullError says which file, which folder and how much space a run needs
  checkpoints     save_checkpoint, load_checkpoint, capture_rng_state, restore_rng_state
  tests & tools   load_notebook_definitions, check_run

Nothing runs at import: every function takes what it uses as parameters.
"""

import ast
import contextlib
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
import warnings
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


# name: (parser, what it accepts). The notebook's parameters cell supplies the defaults.
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
    "IW_SAMPLES": (_parse_int(1), "a whole number >= 1"),
    "IW_TEST_IMAGES": (_parse_int(1), "a whole number >= 1"),
    "RESUME": (_parse_bool, "0 or 1"),
}

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
    iw_samples: int
    iw_test_images: int
    resume: bool

    def as_dict(self):
        """The settings as a JSON-ready dict keyed by the parameters cell's names."""
        return {field.name.upper(): getattr(self, field.name) for field in dataclasses.fields(self)}


def read_config(defaults, environ):
    """Check the parameters' values (cell or papermill), apply VAE_NAME overrides (they win), return a Config."""
    unknown_defaults = sorted(set(defaults) - set(SETTINGS))
    if unknown_defaults:
        raise ConfigError(f"Unknown setting(s) {unknown_defaults}; known: {sorted(SETTINGS)}.")
    unknown_env = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX) :] not in SETTINGS)
    if unknown_env:
        known = ", ".join(ENV_PREFIX + name for name in SETTINGS)
        raise ConfigError(f"Unknown environment variable(s) {unknown_env}. Known: {known}.")
    values = {}
    for name, (parse, accepts) in SETTINGS.items():
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
    return Config(**values)


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


def capture_rng_state(shuffle_generator, device):
    """Every random state a training run draws from, as tensors that torch.load(weights_only=True) reads."""
    state = {"torch_cpu": torch.get_rng_state(), "shuffle": shuffle_generator.get_state()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["torch_mps"] = torch.mps.get_rng_state()
    return state


def restore_rng_state(state, shuffle_generator, device):
    """Put back the random states captured by capture_rng_state."""
    torch.set_rng_state(state["torch_cpu"])
    shuffle_generator.set_state(state["shuffle"])
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"], device)
    elif device.type == "mps" and "torch_mps" in state:
        torch.mps.set_rng_state(state["torch_mps"])


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


# --------------------------------------------------------------------------- tests & tools


def load_notebook_definitions(notebook_path, tag="definitions"):
    """Run the notebook's import statements and its cells tagged `tag`; return the resulting namespace."""
    notebook = json.loads(Path(notebook_path).read_text())
    namespace = {"__name__": "notebook_definitions"}
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        if tag in cell.get("metadata", {}).get("tags", []):
            exec(compile(source, f"{notebook_path}:{tag}", "exec"), namespace)
        else:  # other cells do work; only their imports are needed by the tagged ones
            imports = [node for node in ast.parse(source).body if isinstance(node, (ast.Import, ast.ImportFrom))]
            exec(compile(ast.Module(body=imports, type_ignores=[]), str(notebook_path), "exec"), namespace)
    return namespace


def check_run(out_dir, max_test_loss, required_files=("samples.png", "metrics.json")):
    """Raise SystemExit with a reason unless `out_dir` holds a finished run whose test loss is within bound."""
    out = Path(out_dir)
    missing = [name for name in required_files if not (out / name).is_file()]
    if missing:
        raise SystemExit(f"FAILED: {out} lacks {missing}")
    metrics = json.loads((out / "metrics.json").read_text())
    loss = metrics["final_test_loss"]
    if not loss <= max_test_loss:
        raise SystemExit(f"FAILED: final test loss {loss:.3f} is above the bound {max_test_loss}")
    print(f"OK: final test loss {loss:.3f} <= {max_test_loss}; {', '.join(required_files)} present in {out}")
    return metrics


def main(argv):
    """Command line for the Makefile: `fetch DATA_DIR DATASET` or `check-run OUT_DIR MAX_TEST_LOSS`."""
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
