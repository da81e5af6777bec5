"""Plumbing for the two notebooks, so they stay about the VAE: one mechanism per guarantee; nothing runs at import."""

import ast
import base64
import collections
import contextlib
import ctypes
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


# NAME: (type, check, what it accepts). The parameters cells hold the values; papermill's -p replaces them.
SETTINGS = {
    "EPOCHS": (int, lambda v: v >= 1, "a whole number >= 1"),
    "BATCH_SIZE": (int, lambda v: v >= 1, "a whole number >= 1"),
    "LATENT_DIM": (int, lambda v: v >= 2, "a whole number >= 2"),  # the latent section plots two dimensions
    "LEARNING_RATE": (float, lambda v: 0 < v < math.inf, "a number > 0, such as 1e-3"),
    "SEED": (int, lambda v: v >= 0, "a whole number >= 0"),
    "DATA_DIR": (str, lambda v: v.strip() != "", "a folder path"),
    "OUT_DIR": (str, lambda v: v.strip() != "", "a folder path"),
    "TRAIN_SUBSET": (int, lambda v: 0 <= v <= 60_000, "a whole number from 0 (all) to 60000"),  # either data set
    "DEVICE": (str, lambda v: v in ("auto", "cpu", "mps", "cuda") or v[5:].isdigit() and v[:5] == "cuda:",
               "auto, cpu, cuda, cuda:N or mps"),
    "DATASET": (str, lambda v: v in ("mnist", "fashion"), "mnist or fashion"),
    "BETA": (float, lambda v: 0 <= v < math.inf, "a number >= 0 (1 = the plain VAE)"),
    **{flag: (bool, lambda v: True, "True or False") for flag in ("BINARIZE", "RESUME", "PRETRAINED")},
    "IW_SAMPLES": (int, lambda v: v >= 1, "a whole number >= 1"),  # the companion's own, and the next
    "IW_TEST_IMAGES": (int, lambda v: 100 <= v <= 10_000, "a whole number from 100 to 10000"),  # its check needs 100
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


def choose_device(name, prefer=None):
    """Resolve 'auto' to `prefer` if this machine has it, else cuda, then mps, then cpu; refuse an absent device."""
    def available(name):  # 'cuda:N' needs more than N GPUs
        cuda = name.startswith("cuda") and torch.cuda.is_available() and int(name[5:] or 0) < torch.cuda.device_count()
        return cuda or name == "cpu" or (name in ("mps", "mps:0") and torch.backends.mps.is_available())

    name = next(n for n in (prefer, "cuda", "mps", "cpu") if n and available(n)) if name == "auto" else name
    if not available(name):
        raise ConfigError(f"DEVICE={name!r}, but this machine has no such device. Use DEVICE='auto' or 'cpu'.")
    return torch.device(name)


class FairThreads:
    """Before each optimizer step, as many torch threads as cores others leave free: waiting threads spin."""

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
# MKL's own constants (mkl_service.h): MKL_CBWR_AUTO = 2, MKL_CBWR_STRICT = 0x10000; MKL_CBWR=AUTO,STRICT is their OR
MKL_CBWR_AUTO_STRICT = 0x10002


def mkl_cbwr_mode():
    """MKL's reproducibility mode, fixed by its first call; None without MKL or its (undocumented) mkl_serv_cbwr_get."""
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
    # MKL's conditional numerical reproducibility, read at MKL's first call: the same bits at any thread count
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    mode = mkl_cbwr_mode()
    if mode not in (None, MKL_CBWR_AUTO_STRICT):  # None: torch without MKL; then nothing to promise
        cause = "a matrix product ran before configure_torch" if os.environ["MKL_CBWR"] == "AUTO,STRICT" else \
            f"the environment sets MKL_CBWR={os.environ['MKL_CBWR']!r}"
        warnings.warn(f"MKL is not in its AUTO,STRICT mode ({cause}): results may change with the thread count. Unset "
                      "MKL_CBWR, restart the kernel and run the setup cell first.", stacklevel=2)
    # Adam's averages for dead units hold subnormal floats (below 1.2e-38), many times slower on some x86 CPUs:
    # epochs slowed by 40-50% as training went on, on an Intel Xeon. Flushing them to zero removes that cost.
    torch.set_flush_denormal(True)
    if _fair_threads is not None:  # the setup cell run again: back to the thread count before the first policy
        _fair_threads[1].remove()
        torch.set_num_threads(_fair_threads[0].max_threads)
        _fair_threads = None
    if fair_threads and mode == MKL_CBWR_AUTO_STRICT:  # only then are the bits the same at any thread count
        policy = FairThreads()
        _fair_threads = policy, register_optimizer_step_pre_hook(policy.adjust)


def library_versions():
    """Versions of Python and the libraries whose numbers a run depends on, and the CPU (its model name on Linux)."""
    import numpy
    import torchvision
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"python": platform.python_version(), "torch": str(torch.__version__), "cpu": cpu,
            "torchvision": str(torchvision.__version__), "numpy": numpy.__version__,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


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


# A data split: images (N, 784) float32 in [0, 1], labels (N,), and the DATA_SETTINGS later cells check it against
Split = collections.namedtuple("Split", "images labels settings")


def missing_files(data_dir, dataset):
    """The files of `dataset` that are not in DATA_DIR/<Name>/raw."""
    folder, files = DATASETS[dataset]
    return [name for name in files if not (Path(data_dir) / folder / "raw" / name).is_file()]


def binarized_once(images, seed):
    """One fixed binary draw of `images` (pixel i is 1 with probability x_i), on the CPU: the same on any device."""
    return torch.bernoulli(images.cpu(), generator=torch.Generator().manual_seed(seed)).to(images.device)


def load_splits(data_dir, dataset, device, train_subset=0, binarize=False, allow_download=True):
    """Verified (else downloaded) train and test Splits and class names; with `binarize`, a binary test set."""
    from torchvision import datasets
    data_dir, (folder, files) = str(Path(data_dir).expanduser()), DATASETS[dataset]
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
            raise DataError(f"{raw / name} is not the published file (truncated or altered: its size or SHA-256 "
                            "differs). Delete it and run again to download it, or point DATA_DIR at a verified copy.")
    loaded = dict(DATA_DIR=data_dir, DATASET=dataset, TRAIN_SUBSET=train_subset, BINARIZE=binarize)
    splits = []
    for train in (True, False):
        ds = getattr(datasets, folder)(root=data_dir, train=train, download=False)
        # ds.data is (N, 28, 28) uint8; /255 gives exactly what transforms.ToTensor() gives.
        images, labels = ds.data.reshape(len(ds.data), -1).to(device=device, dtype=torch.float32).div_(255), ds.targets
        if train and train_subset:
            images, labels = images[:train_subset], labels[:train_subset]
        if not train and binarize:
            images = binarized_once(images, BINARIZED_TEST_SEED)
        splits.append(Split(images, labels.to(device), loaded))
    return splits[0], splits[1], list(ds.classes)


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
        raise OSError(err.errno, f"Could not write {target.name} ({len(data) / 1e6:.1f} MB) into {target.parent}: the "
                      f"disk is full or over quota ({free / 1e6:.1f} MB free). Nothing was damaged, an older "
                      f"{target.name} included. Free some space, or set OUT_DIR to another disk.", str(target)) from err
    finally:
        temp.unlink(missing_ok=True)
    return target


# --------------------------------------------------------------------------- checkpoints and cell order


class CheckpointError(RuntimeError):
    """A checkpoint or model file cannot be used: unreadable, incomplete, or from other settings."""


class NotebookOrderError(RuntimeError):
    """A cell was run out of order: what it needs is missing, or was made with other settings."""


CHECKPOINT_KEYS = ("model", "optimizer", "config", "history", "device", "writer")  # vae.pt: to continue
MODEL_KEYS = ("model", "config", "history", "device", "versions")  # model.pt: the finished model, no optimizer
MODEL_FILE = "model.pt"  # beside vae.pt, in OUT_DIR
# The cells a refusal names, by the code they hold (the notebook's sections may be renumbered).
DATA_CELL = "the data cell (`train, test, class_names = ...`)"
MODEL_CELL = "the model cell (`model = VAE(...)`)"
OPTIMIZER_CELL = "the optimizer cell (`optimizer = ...`)"
TRAINING_CELL = "the training cell (`for epoch in ...`)"


def _this_process():
    """Who writes a checkpoint: this process, as 'pid@start time' (a restarted kernel is another process)."""
    return f"{os.getpid()}@{psutil.Process().create_time()}"


def read_checkpoint(path, keys=CHECKPOINT_KEYS, fix="Delete it, or set another OUT_DIR."):
    """torch.load a checkpoint safely (weights_only) and check its entries; CheckpointError ending with `fix`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:  # missing, or not readable
        raise CheckpointError(f"Cannot read {path} ({err.strerror or err}). {fix}") from err
    except Exception as err:  # a truncated zip, random bytes, or a pickle with disallowed globals
        raise CheckpointError(f"Cannot read {path}: it is truncated or corrupt ({err}). {fix}") from err
    if not isinstance(state, dict) or not all(key in state for key in keys):
        raise CheckpointError(f"{path} lacks some of {list(keys)}. {fix}")
    return state


def _changed(old, new, names):
    """'NAME: old -> new; ...' for the names whose values differ ('' if none)."""
    return "; ".join(f"{n}: {old.get(n)!r} -> {new.get(n)!r}" for n in names if old.get(n) != new.get(n))


def _same_weights(model, saved):
    """True if `model`'s weights are those of the saved state dict, bit for bit."""
    state = model.state_dict()
    return state.keys() == saved.keys() and all(torch.equal(state[k].cpu(), saved[k]) for k in state)


def _check_data(settings, model, splits):
    """NotebookOrderError naming the cell to run if DEVICE, or the settings the data was loaded with, changed."""
    here = next(model.parameters()).device
    if choose_device(settings["DEVICE"], prefer=str(here)).type != here.type:  # 'auto' is met by the device it chose
        raise NotebookOrderError(f"DEVICE changed after the setup cell (`device = ...`) chose {here}. Run it and the "
                                 "cells after it, in order.")
    for split in splits:
        changed = _changed(split.settings, settings, DATA_SETTINGS)
        if changed or split.images.device != here:
            raise NotebookOrderError(f"Settings changed after the data was loaded ({changed or 'DEVICE'}). Run "
                                     f"{DATA_CELL} and the cells after it, in order.")


_trained = weakref.WeakSet()  # the models that trained or loaded weights in this process: no new run starts from one


def start_or_resume(checkpoint_path, model, optimizer, settings, train, test):
    """Epochs done; model and optimizer as after the last: from vae.pt (this process's, or RESUME), model.pt or anew."""
    path, here = Path(checkpoint_path), str(next(model.parameters()).device)
    finished = path.with_name(MODEL_FILE)  # the trained model, beside the checkpoint
    _check_data(settings, model, (train, test))
    if {id(p) for group in optimizer.param_groups for p in group["params"]} != {id(p) for p in model.parameters()}:
        raise NotebookOrderError(f"`optimizer` belongs to another `model`: {MODEL_CELL} was run after the optimizer "
                                 f"was created. Run {OPTIMIZER_CELL}, then this cell.")
    if path.parent.resolve() != Path(settings["OUT_DIR"]).expanduser().resolve():
        raise NotebookOrderError(f"OUT_DIR changed after the setup cell (`out_dir = ...`) made {path.parent}. Run it "
                                 "and the cells after it, in order.")
    trained_before = model in _trained
    if settings["PRETRAINED"]:  # the trained model beside the checkpoint, instead of training
        saved = read_finished_model(finished, **{k: settings[k] for k in ("EPOCHS", *RUN_SETTINGS)})
        model.load_state_dict(saved["model"])
        _trained.add(model)
        print(f"PRETRAINED: loaded {finished}, trained for {len(saved['history'])} epochs; nothing is trained")
        return saved["history"]
    # what it needs to continue is checked only to continue it: an older release's vae.pt is replaced by a new run
    state = read_checkpoint(path, CHECKPOINT_KEYS if settings["RESUME"] else ()) if path.exists() else None
    ours = state is not None and state.get("writer") == _this_process()
    if state is not None and (ours or settings["RESUME"]):  # another device draws other noise: another run
        changed = _changed(state["config"] | {"device": state["device"]}, settings | {"device": here},
                           (*RUN_SETTINGS, "device"))
        if not changed and len(state["history"]) > settings["EPOCHS"]:
            raise NotebookOrderError(f"{path} holds {len(state['history'])} epochs, more than EPOCHS = "
                                     f"{settings['EPOCHS']}. Raise EPOCHS again, or delete it to train a new run.")
        if not changed:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            _trained.add(model)
            if len(state["history"]) == settings["EPOCHS"]:
                print(f"Trained {len(state['history'])} epochs already: nothing to train. To train more, raise "
                      "EPOCHS, run the parameters cell and the next, then this cell.")
                if not finished.exists() or not _same_weights(model, read_checkpoint(finished, MODEL_KEYS)["model"]):
                    _save_model(finished, model, state["history"], settings)  # lost between two writes
            elif not ours:
                print(f"resuming from {path} after epoch {len(state['history'])}")
            return state["history"]
        if not ours or settings["RESUME"]:  # RESUME asks for this file: never replaced unasked
            raise CheckpointError(f"{path} was made with other settings ({changed}). Delete it (or set RESUME = "
                                  "False) to start afresh, or choose another OUT_DIR.")
        if trained_before:
            cell = DATA_CELL if _changed(state["config"], settings, DATA_SETTINGS) else MODEL_CELL
            raise NotebookOrderError(f"Settings changed after this model started training ({changed}). Run {cell} "
                                     "and the cells after it, in order, to train with them.")
    elif trained_before:
        raise NotebookOrderError(f"`model` holds trained weights, and {path} does not hold their run (deleted, "
                                 f"written by another notebook, or PRETRAINED). Run {MODEL_CELL} and the cells after "
                                 "it, in order, to start a new run.")
    elif settings["RESUME"]:
        print(f"RESUME is set but there is no {path}: training from the start")
    if finished.exists():  # in outputs/, the committed run's: a learner's run replaces it only when told so
        print(f"A new run. After its last epoch it replaces {finished}; to keep that file, set another OUT_DIR.")
    save_checkpoint(path, model, optimizer, [], settings)
    _trained.add(model)
    return []


def _save(state, path):
    """torch.save into memory, then one atomic write: a full disk is reported as one."""
    torch.save(state, buffer := io.BytesIO())
    write_bytes_atomically(buffer.getbuffer(), path)


def _save_model(path, model, history, settings):
    """model.pt: the trained weights and the run's record (settings, epochs, device, versions), no optimizer."""
    _save({"model": model.state_dict(), "config": settings, "history": history,
           "device": str(next(model.parameters()).device), "versions": library_versions()}, path)


def save_checkpoint(checkpoint_path, model, optimizer, history, settings):
    """Save vae.pt after an epoch and, once all EPOCHS are done, model.pt (no optimizer); refuse a nan or inf loss."""
    if history and not all(math.isfinite(value) for value in history[-1].values()):
        raise FloatingPointError(f"The loss became nan or inf in epoch {len(history)}, not saved: {checkpoint_path} "
                                 f"still holds epoch {len(history) - 1}. Try a smaller LEARNING_RATE (default 1e-3).")
    _save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": settings, "history": history,
           "device": str(next(model.parameters()).device), "writer": _this_process()}, checkpoint_path)
    if len(history) == settings["EPOCHS"]:
        _save_model(Path(checkpoint_path).with_name(MODEL_FILE), model, history, settings)


def read_finished_model(path, **expected):
    """model.pt: weights, settings, epochs, device, versions; CheckpointError if unreadable or not as `expected`."""
    saved = read_checkpoint(path, MODEL_KEYS, f"Run the training cell of {WALKTHROUGH.name} to its last epoch with "
                            "this OUT_DIR, or set OUT_DIR to a folder with one: outputs/ holds the committed run's.")
    if changed := _changed(saved["config"], expected, expected):
        raise CheckpointError(f"{path} was trained with other settings ({changed}). Set them as it has them, or "
                              "point OUT_DIR at another model (in the walkthrough: or set PRETRAINED = False).")
    return saved


def require_trained(model, namespace, *splits):
    """OUT_DIR/model.pt's record if `model` holds its weights for `namespace`'s settings; else NotebookOrderError."""
    settings = check_settings(namespace)
    _check_data(settings, model, splits)
    path = Path(settings["OUT_DIR"]).expanduser() / MODEL_FILE
    saved = read_checkpoint(path, MODEL_KEYS) if path.exists() else None
    if saved is None or not _same_weights(model, saved["model"]):
        raise NotebookOrderError(f"`model` has not finished training: run {TRAINING_CELL} first (and before it "
                                 f"{OPTIMIZER_CELL}, if {MODEL_CELL} ran since).")
    if changed := _changed(saved["config"], settings, ("EPOCHS", *RUN_SETTINGS)):
        cell = (DATA_CELL if _changed(saved["config"], settings, DATA_SETTINGS) else
                MODEL_CELL if _changed(saved["config"], settings, RUN_SETTINGS) else TRAINING_CELL)
        raise NotebookOrderError(f"Settings changed after `model` was trained ({changed}). Run {cell} and the cells "
                                 "after it, in order.")
    return saved


def show_widget(widget, png, note):
    """Display `widget`; a copy without a kernel (GitHub, nbviewer, nbconvert) shows the image `png` and `note`."""
    from IPython.display import display
    image = base64.b64encode(png).decode()
    html = f'<img src="data:image/png;base64,{image}" width="168" alt="the decoded code"><p><i>{note}</i></p>'
    display(widget._repr_mimebundle_() | {"text/html": html, "image/png": image, "text/plain": note}, raw=True)


# --------------------------------------------------------------------------- the companion and the sweep


HERE = Path(__file__).resolve().parent  # the project folder
WALKTHROUGH = HERE / "Variational_autoencoder.ipynb"
SWEEP_DIR = HERE / "results" / "sweep"  # what `make sweep` publishes: NAME/seed-SEED/{metrics,evaluation}.json
RUN_FILES = ("metrics.json", "evaluation.json")  # a finished, evaluated run: the walkthrough's, then the companion's


def read_run(folder):
    """(metrics.json, evaluation.json) of one run's folder; OSError if missing, ValueError if damaged."""
    return tuple(json.loads((Path(folder) / file).read_text()) for file in RUN_FILES)


def read_sweep(names, folder=SWEEP_DIR):
    """{name: {seed: (metrics, evaluation)}} of the evaluated runs NAME/seed-SEED/ in `folder`, by seed."""
    runs = {name: sorted(Path(folder, name).glob("seed-*/evaluation.json"), key=lambda p: int(p.parent.name[5:]))
            for name in names}
    if not all(runs.values()):
        raise FileNotFoundError(f"{folder} has no evaluated run of {[n for n, p in runs.items() if not p]}: use the "
                                "whole project folder, whose results/sweep holds them, or run `make sweep`.")
    return {name: {int(p.parent.name[5:]): read_run(p.parent) for p in paths} for name, paths in runs.items()}


def load_notebook_definitions(notebook_path=WALKTHROUGH, names=None, tag="definitions", namespace=None):
    """Run a notebook's imports and its cells tagged `tag` in `namespace`; return it, or the objects named `names`."""
    notebook = json.loads(Path(notebook_path).read_text())
    namespace = {"__name__": "notebook_definitions"} if namespace is None else namespace
    for cell in (cell for cell in notebook["cells"] if cell["cell_type"] == "code"):
        source = "".join(cell["source"])
        if tag in cell.get("metadata", {}).get("tags", []):
            exec(compile(source, f"{notebook_path}:{tag}", "exec"), namespace)
        else:  # other cells do work: only their imports
            imports = [node for node in ast.parse(source).body if isinstance(node, (ast.Import, ast.ImportFrom))]
            exec(compile(ast.Module(body=imports, type_ignores=[]), str(notebook_path), "exec"), namespace)
    return namespace if names is None else tuple(namespace[name] for name in names)
