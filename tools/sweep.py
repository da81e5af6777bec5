"""The exercises, measured: train and evaluate once per configuration with the unchanged notebooks; compare runs.

Each configuration in CONFIGURATIONS (below) is the notebooks' defaults with a few settings changed. For each,
the sweep executes two notebooks headless through papermill into the configuration's own folder OUT/<name>/:
first the walkthrough, Variational_autoencoder.ipynb (it trains: its figures, metrics.json and the checkpoint
vae.pt), then the companion, Evaluating_a_trained_VAE.ipynb, on that checkpoint with the same OUT_DIR,
DATA_DIR, DATASET and DEVICE (its figures and evaluation.json: the importance-weighted bound, active units,
nearest-neighbour accuracies, ...). Each executed notebook is kept there under its own name. Then it writes
OUT/summary.md (one row per configuration) and OUT/rate_distortion.png (KL against reconstruction for the
grey-level MNIST runs, with lines of constant negative ELBO).

Resumable: a configuration whose metrics.json and evaluation.json are complete (they parse, their settings are
the configuration's, the history holds every epoch, the evaluation is of this run's checkpoint) is skipped.
One whose training is finished but whose evaluation is not gets only the companion. Any other is trained with
RESUME=True, so an interrupted run continues from its checkpoint, and then evaluated. A failed configuration is
reported by name, with the notebook and its error, and the others still run; the exit status is non-zero if any
failed.

Settings reach the kernels only as papermill parameters, each to the notebook whose parameters cell has it
(IW_SAMPLES and IW_TEST_IMAGES: the companion; OUT_DIR, DATA_DIR, DATASET, DEVICE: both; the rest: the
walkthrough). The notebooks let VAE_<NAME> environment variables override parameters, so the kernels run with
every VAE_* variable removed (the sweep names the ones it ignores). Two are honoured, by passing them on as
parameters: VAE_DATA_DIR (unless --data-dir is given) and VAE_DEVICE (unless --set DEVICE=... is given).

Fashion-MNIST (DATASET=fashion) is never downloaded: the sweep uses DATA_DIR/FashionMNIST/raw if it holds the
four files, else unpacks Debian's package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist/*.gz) into
OUT/data/FashionMNIST/raw and passes OUT/data as that configuration's DATA_DIR; if neither is there, that
configuration fails, naming `apt-get install dataset-fashion-mnist`. The notebooks verify the files' SHA-256.

    python tools/sweep.py                                  # every configuration, into build/sweep
    python tools/sweep.py --only beta-1 latent-2           # some of them (the summary still covers all)
    python tools/sweep.py --set EPOCHS=1 --set TRAIN_SUBSET=2000 --set IW_SAMPLES=20 --out build/quick-sweep
    python tools/sweep.py --config a:BETA=0.5 --config b:BETA=2,LATENT_DIM=8 --out build/mine
    python tools/sweep.py --publish results/sweep          # also copy the small results into a committed folder
"""

import argparse
import ast
import contextlib
import dataclasses
import functools
import gzip
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "Variational_autoencoder.ipynb"  # the walkthrough: trains, writes metrics.json and vae.pt
COMPANION = REPO / "Evaluating_a_trained_VAE.ipynb"  # evaluates OUT_DIR/vae.pt, writes evaluation.json
DEFAULT_OUT = REPO / "build" / "sweep"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist: the four files, gzipped
FASHION_PACKAGE = "apt-get install dataset-fashion-mnist"

# name: the settings that differ from the notebooks' defaults (their parameters cells). One folder per name.
CONFIGURATIONS = {
    "beta-0.25": {"BETA": 0.25},
    "beta-0.5": {"BETA": 0.5},
    "beta-1": {"BETA": 1.0},
    "beta-2": {"BETA": 2.0},
    "beta-4": {"BETA": 4.0},
    "latent-2": {"LATENT_DIM": 2},
    "binarized": {"BINARIZE": True},
    "fashion": {"DATASET": "fashion"},
}

SWEEP_SETS = ("OUT_DIR", "RESUME")  # the sweep chooses these itself, per configuration
ENV_PASSED_ON = {"DATA_DIR": "VAE_DATA_DIR", "DEVICE": "VAE_DEVICE"}  # read by the sweep, passed as parameters
NOT_COMPARED = ("OUT_DIR", "RESUME", "DATA_DIR", "DEVICE")  # a finished run stays finished if only these differ
METRICS = "metrics.json"  # the walkthrough's
EVALUATION = "evaluation.json"  # the companion's
REQUIRED_METRICS = ("config", "history", "final_test_recon", "final_test_kl", "train_seconds")
REQUIRED_EVALUATION = ("config", "checkpoint_config", "importance_weighted", "active_units")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SUMMARY = "summary.md"
FIGURE = "rate_distortion.png"
DATASET_NAMES = {"mnist": "MNIST", "fashion": "Fashion-MNIST"}
LABEL_BOX = {"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8}  # point labels over lines


class DataNotFound(RuntimeError):
    """A configuration's data set is nowhere the sweep may take it from (it never downloads)."""


def _helpers():
    """The project's vae_helpers module (imported on first use: it brings torch)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import vae_helpers

    return vae_helpers


# --------------------------------------------------------------------------- settings


def notebook_defaults(notebook=NOTEBOOK):
    """The parameters cell's values, as Python objects, read by papermill from the notebook."""
    import papermill as pm

    if not Path(notebook).is_file():
        raise ValueError(f"{notebook} does not exist")
    return {name: ast.literal_eval(info["default"]) for name, info in pm.inspect_notebook(str(notebook)).items()}


def known_settings():
    """Every setting either notebook reads: name -> (parser, what it accepts), from vae_helpers."""
    vh = _helpers()
    return {**vh.EVALUATION_SETTINGS, **vh.SETTINGS}


def parse_value(text):
    """A command-line value as a Python literal where it is one (0.5, 2, True), else the string itself."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def parse_assignments(text):
    """'KEY=VALUE,KEY=VALUE' -> {KEY: value}; an empty text gives {}."""
    settings = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        settings[key.strip().upper()] = parse_value(value)
    return settings


def parse_configuration(text):
    """'NAME:KEY=VALUE,...' (the --config option) -> (name, settings)."""
    name, sep, rest = text.partition(":")
    if not sep:
        raise ValueError(f"expected NAME:KEY=VALUE,..., got {text!r}")
    return name.strip(), parse_assignments(rest)


def check_configurations(configurations, common):
    """Raise ValueError for a bad folder name, an unknown setting, or a setting the sweep chooses itself."""
    known = known_settings()
    for name, settings in [*configurations.items(), ("--set", common)]:
        if name != "--set" and not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"configuration name {name!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ValueError(f"{name}: unknown setting(s) {unknown}; known: {', '.join(known)}")
        chosen = sorted(set(settings) & set(SWEEP_SETS))
        if chosen:
            raise ValueError(f"{name}: {', '.join(chosen)} cannot be set: the sweep chooses them per configuration")


def check_parameters(configurations, common, defaults):
    """Raise ValueError for a setting that neither notebook's parameters cell defines (it would reach nobody)."""
    for name, settings in [*configurations.items(), ("--set", common)]:
        orphans = sorted(set(settings) - set(defaults))
        if orphans:
            raise ValueError(f"{name}: {orphans} is a parameter of neither {NOTEBOOK.name} nor {COMPANION.name}")


def normalized(settings):
    """The settings as the notebooks record them in their JSON (each parsed by its checker); ValueError if bad."""
    known = known_settings()
    values = {}
    for name, value in settings.items():
        if name not in known:  # a parameter vae_helpers does not check: compared as it is
            values[name] = value
            continue
        parse, accepts = known[name]
        try:
            values[name] = parse(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r}: must be {accepts}") from None
    return values


def split_parameters(settings, walkthrough_defaults, companion_defaults):
    """(the walkthrough's parameters, the companion's): each notebook gets the settings its parameters cell has."""
    return ({name: value for name, value in settings.items() if name in walkthrough_defaults},
            {name: value for name, value in settings.items() if name in companion_defaults})


def kernel_environment(environ):
    """A copy of `environ` without VAE_* variables, and the sorted names that were removed."""
    removed = sorted(name for name in environ if name.startswith("VAE_"))
    return {name: value for name, value in environ.items() if name not in removed}, removed


@contextlib.contextmanager
def environment(env):
    """Run the block with os.environ replaced by `env` (kernels started inside inherit it), then restore it."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --------------------------------------------------------------------------- data


def _repo_path(path):
    """A parameter's path as the kernels see it: relative paths are relative to the repository (their cwd)."""
    return REPO / Path(str(path)).expanduser()


def fashion_data_dir(data_dir, out_root, debian=None, say=None):
    """The DATA_DIR for a Fashion-MNIST run: `data_dir` if it holds FashionMNIST/raw, else a copy of Debian's.

    The copy is unpacked (once, each file atomically) into `out_root`/data/FashionMNIST/raw, torchvision's layout;
    DataNotFound if neither is there. The notebooks verify each file's size and SHA-256 before they train.
    """
    vh = _helpers()
    debian = Path(DEBIAN_FASHION if debian is None else debian)
    _, folder, files = vh.DATASETS["fashion"]
    given_raw = Path(data_dir) / folder / "raw"
    if not vh.missing_files(given_raw, files):
        return Path(data_dir)
    target = Path(out_root) / "data"
    raw = target / folder / "raw"
    missing = vh.missing_files(raw, files)
    if not missing:
        return target
    sources = {name: debian / f"{name}.gz" for name in missing}
    absent = [str(source) for source in sources.values() if not source.is_file()]
    if absent:
        raise DataNotFound(
            f"Fashion-MNIST is neither in {given_raw} nor installed from Debian's package (no {absent[0]}): "
            f"install it with `{FASHION_PACKAGE}`, or put the four uncompressed files ({', '.join(files)}) in "
            f"{given_raw}. The sweep never downloads.")
    raw.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        with gzip.open(source, "rb") as handle:
            vh.write_bytes_atomically(handle.read(), raw / name)
    if say is not None:
        say(f"note: unpacked Fashion-MNIST from {debian} into {raw}")
    return target


# --------------------------------------------------------------------------- completeness


def read_json(path):
    """The JSON object in `path` as a dict, or None if it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_metrics(out_dir):
    """The configuration folder's metrics.json (the walkthrough's) as a dict, or None."""
    return read_json(Path(out_dir) / METRICS)


def read_evaluation(out_dir):
    """The configuration folder's evaluation.json (the companion's) as a dict, or None."""
    return read_json(Path(out_dir) / EVALUATION)


def _differences(recorded, expected, only_recorded=False):
    """'NAME recorded, wanted expected' for each compared setting that differs (of those recorded, if asked)."""
    return [f"{name} {recorded.get(name)!r}, wanted {value!r}" for name, value in expected.items()
            if name not in NOT_COMPARED and (name in recorded or not only_recorded) and recorded.get(name) != value]


def _unreadable_or_missing(path, data, required):
    """Why the JSON file at `path` (read as `data`) is not usable, or None."""
    if not path.is_file():
        return f"no {path.name}"
    if data is None:
        return f"{path.name} is unreadable or not a JSON object"
    missing = [key for key in required if key not in data]
    return f"{path.name} lacks {missing}" if missing else None


def metrics_incomplete_reason(out_dir, expected):
    """Why `out_dir` does not hold a finished training with the `expected` (normalized) settings; None if it does."""
    path = Path(out_dir) / METRICS
    metrics = read_metrics(out_dir)
    reason = _unreadable_or_missing(path, metrics, REQUIRED_METRICS)
    if reason:
        return reason
    config, history = metrics["config"], metrics["history"]
    if not isinstance(config, dict) or not isinstance(history, dict):
        return "metrics.json has no config or history"
    differences = _differences(config, expected)
    if differences:
        return "made with other settings: " + "; ".join(differences)
    epochs = expected["EPOCHS"]
    for key in ("train_recon", "train_kl", "test_recon", "test_kl"):
        if not isinstance(history.get(key), list) or len(history[key]) != epochs:
            return f"history {key} does not hold all {epochs} epochs"
    return None


def evaluation_incomplete_reason(out_dir, expected, expected_training):
    """Why `out_dir` holds no finished evaluation with the `expected` settings of this run's checkpoint, or None.

    expected: the companion's normalized settings; expected_training: the walkthrough's, which the evaluated
    checkpoint's configuration must match. An evaluation older than metrics.json is of an earlier checkpoint.
    """
    path = Path(out_dir) / EVALUATION
    evaluation = read_evaluation(out_dir)
    reason = _unreadable_or_missing(path, evaluation, REQUIRED_EVALUATION)
    if reason:
        return reason
    config, checkpoint = evaluation["config"], evaluation["checkpoint_config"]
    if not isinstance(config, dict) or not isinstance(checkpoint, dict):
        return "evaluation.json has no config or checkpoint_config"
    differences = _differences(config, expected)
    if differences:
        return "evaluation made with other settings: " + "; ".join(differences)
    differences = _differences(checkpoint, expected_training, only_recorded=True)
    if differences:
        return "evaluation of a checkpoint with other settings: " + "; ".join(differences)
    iw = evaluation["importance_weighted"]
    if not isinstance(iw, dict) or not {"nll", "K"} <= set(iw):
        return "evaluation.json has no importance-weighted estimate"
    metrics_path = Path(out_dir) / METRICS
    if metrics_path.is_file() and path.stat().st_mtime_ns < metrics_path.stat().st_mtime_ns:
        return "evaluation.json is older than metrics.json (an evaluation of an earlier checkpoint)"
    return None


def incomplete_reason(out_dir, expected_training, expected_evaluation):
    """Why `out_dir` does not hold a finished, evaluated run with these settings (training first); None if it does."""
    return (metrics_incomplete_reason(out_dir, expected_training)
            or evaluation_incomplete_reason(out_dir, expected_evaluation, expected_training))


def is_complete(out_dir, expected_training, expected_evaluation):
    """True if `out_dir` holds a finished, evaluated run with these settings (see incomplete_reason)."""
    return incomplete_reason(out_dir, expected_training, expected_evaluation) is None


# --------------------------------------------------------------------------- numbers and formatting


def numbers(metrics, evaluation):
    """One run's numbers: from the training (rec, kl, -ELBO at beta = 1, time) and its evaluation (the rest)."""
    rec, kl = metrics["final_test_recon"], metrics["final_test_kl"]
    config = metrics["config"]
    iw = evaluation["importance_weighted"]
    knn = evaluation.get("knn_accuracy")
    knn = knn if isinstance(knn, dict) else {}
    return {
        "rec": rec,
        "kl": kl,
        "neg_elbo": metrics.get("final_test_negative_elbo", rec + kl),  # whatever beta it was trained with
        "iw_nll": iw["nll"],
        "K": iw["K"],
        "iw_images": iw.get("test_images"),
        "active": evaluation["active_units"],
        "active_burda": evaluation.get("active_units_burda"),
        "knn_latent": knn.get("latent"),
        "knn_pixels": knn.get("pixels"),
        "knn_k": knn.get("k"),
        "latent_dim": config.get("LATENT_DIM"),
        "train_seconds": metrics["train_seconds"],
        "evaluation_seconds": evaluation.get("seconds"),
    }


def data_label(config):
    """The data a run was trained and measured on: 'MNIST', 'MNIST, binarized', 'Fashion-MNIST'."""
    dataset = config.get("DATASET")
    return DATASET_NAMES.get(dataset, str(dataset)) + (", binarized" if config.get("BINARIZE") else "")


def format_seconds(seconds):
    """41 s, 2 min 05 s or 1 h 02 min."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def format_setting(name, value):
    """NAME=value, as one would write it on the command line."""
    return f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"


def format_share(value):
    """A fraction as a percentage with one decimal ('96.5%'), or '–' if there is none."""
    return "–" if value is None else f"{value:.1%}"


def progress_line(name, width, metrics, evaluation, outcome):
    """One line of progress: the configuration's name, its numbers, and how it went (its time, or skipped)."""
    n = numbers(metrics, evaluation)
    active = f"{n['active']}/{n['latent_dim']}"
    if n["active_burda"] is not None:
        active += f" (Burda {n['active_burda']})"
    knn = f"  k-NN {format_share(n['knn_latent'])}" if n["knn_latent"] is not None else ""
    return (f"{name:<{width}}  rec {n['rec']:5.1f}  KL {n['kl']:4.1f}  -ELBO {n['neg_elbo']:5.1f}  "
            f"-L_K {n['iw_nll']:5.1f} (K={n['K']})  active {active}{knn}  {outcome}")


def failure_message(error):
    """ename: the first line of evalue for a notebook error; the type and first line for any other exception."""
    import papermill as pm

    if isinstance(error, pm.PapermillExecutionError):
        ename, evalue = error.ename, error.evalue
    else:
        ename, evalue = type(error).__name__, str(error)
    first = (evalue.strip().splitlines() or [""])[0]
    return f"{ename}: {first}" if first else ename


# --------------------------------------------------------------------------- running


@dataclasses.dataclass
class SweepResult:
    """What a sweep did: finished runs' metrics and evaluations by name, failures by name, skipped and not-run
    names, files."""

    metrics: dict
    failed: dict
    skipped: list
    not_run: list
    evaluations: dict = dataclasses.field(default_factory=dict)
    summary: Path = None
    figure: Path = None

    @property
    def ok(self):
        """True if no configuration failed."""
        return not self.failed


def _parameter_path(path):
    """A path for the notebooks' parameters: relative to the repository (their working folder) if inside it."""
    path = Path(os.path.abspath(os.path.expanduser(str(path))))  # symbolic links kept: data/ may be one
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def run_notebook(notebook, parameters, out_dir):
    """Execute `notebook` with `parameters` into out_dir/<its name> (raises papermill's error if a cell fails)."""
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    # The kernel's own log level: its start-up warnings (e.g. about unencrypted local TCP) would break the
    # progress lines; what the notebook's cells print or warn goes into the executed notebook as usual.
    pm.execute_notebook(str(notebook), str(out_dir / Path(notebook).name), parameters=parameters, cwd=str(REPO),
                        progress_bar=False, log_output=False, extra_arguments=["--IPKernelApp.log_level=ERROR"])


class _NotebookFailed(Exception):
    """A notebook of a configuration failed; the message names the notebook and its error."""


def _execute(notebook, parameters, out_dir, check=None):
    """Run one notebook, then `check()` (why its output is incomplete, or None); _NotebookFailed if either fails."""
    try:
        run_notebook(notebook, parameters, out_dir)
        reason = check() if check else None
        if reason is not None:
            raise RuntimeError(f"the notebook finished but its output in {out_dir} is not complete: {reason}")
    except Exception as error:  # any failure, named with its notebook
        message = f"{Path(notebook).name}: {failure_message(error)}"
        if "CheckpointError" in message:
            message += f" (to start {out_dir.name} afresh, delete {out_dir})"
        raise _NotebookFailed(message) from error


def run_sweep(configurations, out_root=DEFAULT_OUT, common=None, data_dir=None, only=None, notebooks=None,
              stream=None, fashion_source=None):
    """Run each configuration not yet finished (of `only`, if given), write the summary and figure; a SweepResult."""
    # configurations: {name: {SETTING: value}}; common: settings for every configuration, beneath its own;
    # data_dir: else $VAE_DATA_DIR, else the notebooks' default; notebooks: (walkthrough, companion), default
    # (NOTEBOOK, COMPANION); fashion_source: Debian's Fashion-MNIST folder, default DEBIAN_FASHION; progress
    # lines go to `stream` (default stdout).
    stream = stream or sys.stdout
    walkthrough, companion = (NOTEBOOK, COMPANION) if notebooks is None else notebooks
    common = dict(common or {})
    configurations = {name: dict(settings) for name, settings in configurations.items()}
    check_configurations(configurations, common)
    unknown = sorted(set(only or ()) - set(configurations))
    if unknown:
        raise ValueError(f"--only {unknown}: no such configuration; there are {', '.join(configurations)}")
    selected = [name for name in configurations if only is None or name in only]

    def say(text="", end="\n"):
        """Print a progress line (or its start) at once."""
        print(text, end=end, file=stream, flush=True)

    walkthrough_defaults, companion_defaults = notebook_defaults(walkthrough), notebook_defaults(companion)
    defaults = {**companion_defaults, **walkthrough_defaults}
    check_parameters(configurations, common, defaults)
    for setting, variable in ENV_PASSED_ON.items():  # honoured: passed on as parameters, not as variables
        if setting not in common and os.environ.get(variable):
            common[setting] = os.environ[variable]
    if data_dir is not None:
        common["DATA_DIR"] = data_dir
    if "DATA_DIR" in common:  # the kernels work in the repository: relative paths are made to mean the same there
        common["DATA_DIR"] = _parameter_path(common["DATA_DIR"])
    env, removed = kernel_environment(os.environ)
    ignored = [name for name in removed if name[4:] not in ENV_PASSED_ON]
    if ignored:
        say(f"note: ignoring {', '.join(ignored)} in the notebook kernels (the sweep passes every setting as a "
            "papermill parameter; use --set NAME=VALUE to change one for every configuration)")
    out_root = Path(out_root).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    width = max(map(len, configurations))
    result = SweepResult(metrics={}, failed={}, skipped=[], not_run=[])
    for name, settings in configurations.items():
        out_dir = out_root / name
        wanted = {**defaults, **common, **settings}
        training, evaluation = split_parameters(wanted, walkthrough_defaults, companion_defaults)
        try:
            expected_training, expected_evaluation = normalized(training), normalized(evaluation)
        except ValueError:
            expected_training = expected_evaluation = None  # the walkthrough will say what is wrong
        train_reason = ("invalid settings" if expected_training is None
                        else metrics_incomplete_reason(out_dir, expected_training))
        if train_reason is None and evaluation_incomplete_reason(out_dir, expected_evaluation,
                                                                 expected_training) is None:
            result.metrics[name], result.evaluations[name] = read_metrics(out_dir), read_evaluation(out_dir)
            if name in selected:
                result.skipped.append(name)
                say(progress_line(name, width, result.metrics[name], result.evaluations[name], "skipped (done)"))
            continue
        if name not in selected:
            result.not_run.append(name)
            continue
        resumed = train_reason is not None and (out_dir / "vae.pt").is_file()
        started = time.perf_counter()
        try:
            dataset = str(wanted.get("DATASET")).strip().lower()
            if dataset == "fashion" and "DATA_DIR" not in settings:  # never downloaded: found or unpacked here
                found = fashion_data_dir(_repo_path(wanted["DATA_DIR"]), out_root, fashion_source, say)
                training["DATA_DIR"] = evaluation["DATA_DIR"] = _parameter_path(found)
        except (DataNotFound, OSError) as error:
            result.failed[name] = failure_message(error)
            say(f"{name:<{width}}  FAILED {result.failed[name]}")
            continue
        say(f"{name:<{width}}  ", end="")
        out_parameter = _parameter_path(out_dir)
        try:
            with environment(env):
                if train_reason is not None:
                    (out_dir / EVALUATION).unlink(missing_ok=True)  # an earlier checkpoint's, if any
                    check = expected_training and functools.partial(metrics_incomplete_reason, out_dir,
                                                                    expected_training)
                    _execute(walkthrough, {**training, "OUT_DIR": out_parameter, "RESUME": True}, out_dir, check)
                check = expected_evaluation and functools.partial(evaluation_incomplete_reason, out_dir,
                                                                  expected_evaluation, expected_training)
                _execute(companion, {**evaluation, "OUT_DIR": out_parameter}, out_dir, check)
            metrics, evaluated = read_metrics(out_dir), read_evaluation(out_dir)
            if metrics is None or evaluated is None:
                raise _NotebookFailed(f"the notebooks finished but {out_dir} lacks {METRICS} or {EVALUATION}")
        except _NotebookFailed as error:  # reported by name, and the sweep goes on
            result.failed[name] = str(error)
            say(f"FAILED {error}")
            continue
        result.metrics[name], result.evaluations[name] = metrics, evaluated
        how = " (resumed)" if resumed else " (evaluation only: the training was done)" if train_reason is None else ""
        say(progress_line(name, width, metrics, evaluated, format_seconds(time.perf_counter() - started) + how)
            [width + 2 :])
    result.summary = write_summary(result, configurations, defaults, common, out_root / SUMMARY)
    result.figure = write_figure(result.metrics, defaults, out_root / FIGURE)
    say(f"{len(result.metrics)} of {len(configurations)} configurations done"
        + (f", {len(result.failed)} failed ({', '.join(result.failed)})" if result.failed else "")
        + (f", {len(result.not_run)} not run ({', '.join(result.not_run)})" if result.not_run else "")
        + f"; {result.summary}" + (f", {result.figure}" if result.figure else " (no figure: no grey-level runs)"))
    return result


# --------------------------------------------------------------------------- summary


def summary_markdown(result, configurations, defaults, common):
    """The Markdown table of the finished runs, one row per configuration, with a note on the columns."""
    default_values = normalized({name: value for name, value in defaults.items() if name not in NOT_COMPARED})
    shown_common = {name: value for name, value in common.items() if name not in ("DATA_DIR",)}
    every_run = ", ".join(format_setting(name, value) for name, value in shown_common.items())
    lines = ["# The exercises, measured", ""]
    lines.append(f"Every run: {NOTEBOOK.name} trains, then {COMPANION.name} evaluates its checkpoint; both at "
                 "their defaults" + (f" except {every_run}" if every_run else "")
                 + ", plus the settings in its row. Devices: "
                 + (", ".join(sorted({str(m.get("device")) for m in result.metrics.values()})) or "none") + ".")
    lines += ["", "| configuration | data | settings | rec | KL | −ELBO (β = 1) | −L_K | K | active (KL) "
              "| active (Burda) | k-NN (z) | k-NN (pixels) | training time | evaluation time |",
              "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    iw_images, knn_k, datasets, binarized = set(), set(), set(), False
    for name in configurations:
        if name not in result.metrics:
            continue
        metrics, evaluation = result.metrics[name], result.evaluations[name]
        n = numbers(metrics, evaluation)
        iw_images.add(n["iw_images"])
        knn_k.add(n["knn_k"])
        datasets.add(metrics["config"].get("DATASET"))
        binarized = binarized or bool(metrics["config"].get("BINARIZE"))
        own = normalized(configurations[name])
        differing = [format_setting(k, v) for k, v in own.items() if default_values.get(k) != v]
        burda = "–" if n["active_burda"] is None else str(n["active_burda"])
        evaluation_time = "–" if n["evaluation_seconds"] is None else format_seconds(n["evaluation_seconds"])
        lines.append(f"| {name} | {data_label(metrics['config'])} | {', '.join(differing) or '(defaults)'} "
                     f"| {n['rec']:.1f} | {n['kl']:.1f} | {n['neg_elbo']:.1f} | {n['iw_nll']:.1f} | {n['K']:,} "
                     f"| {n['active']} | {burda} | {format_share(n['knn_latent'])} "
                     f"| {format_share(n['knn_pixels'])} | {format_seconds(n['train_seconds'])} "
                     f"| {evaluation_time} |")
    images = ", ".join(f"{count:,}" for count in sorted(i for i in iw_images if i is not None)) or "N"
    k = ", ".join(str(value) for value in sorted(v for v in knn_k if v is not None)) or "k"
    default_data = DATASET_NAMES.get(defaults.get("DATASET"), str(defaults.get("DATASET")))
    lines += [
        "",
        f"Columns, all in nats per test image unless marked: **data**, what the run was trained and measured on; "
        "**rec**, the reconstruction term −log p(x|z) (binary cross-entropy, one z per image) and **KL**, "
        "KL(q(z|x) ‖ p(z)), on the 10,000 test images after the last epoch (from metrics.json); "
        "**−ELBO (β = 1)** = rec + KL, the negative ELBO whatever β the run was trained with, so that rows "
        "compare (lower is better); the rest is from evaluation.json: **−L_K**, the importance-weighted bound of "
        f"Burda et al. (2016) with **K** samples per image on the first {images} test images: an upper bound on "
        "−log p(x) in expectation, tighter than the negative ELBO, and a true negative log-likelihood bound only "
        "for binarized data. Test losses are one-sample estimates whose spread over draws of z is "
        f"{redraw_spread(result.evaluations)} (each evaluation's test_loss_redraw_sd), hence one decimal; "
        "**active (KL)**, latent dimensions whose average KL exceeds 0.01 nats; **active (Burda)**, dimensions "
        "whose posterior mean varies across test images with variance above 0.01 (Burda et al., 2016), – where "
        f"the evaluation did not record it; **k-NN (z)**, the share of test images whose {k} nearest training "
        "codes (posterior means, Euclidean) vote for their label, and **k-NN (pixels)**, the same on the raw "
        "pixels, for reference; **training time**, the seconds of the training epochs, each with its test "
        "evaluation; **evaluation time**, the companion's whole run (the seconds in evaluation.json).",
    ]
    if binarized:
        lines += ["", "A binarized row is measured on binary images, a different data distribution: its numbers "
                  "are not comparable with the grey-level rows."]
    others = sorted(DATASET_NAMES.get(d, str(d)) for d in datasets if d != defaults.get("DATASET"))
    if others:
        lines += ["", f"{' and '.join(others)} rows are trained and measured on another data set than "
                  f"{default_data}: their numbers compare with no {default_data} row (much of each loss is the images' "
                  f"entropy floor, entropy_floor in each run's JSON, and even the rest weighs errors by how grey the "
                  f"pixels are), and {FIGURE} leaves them out."]
    if result.failed:
        lines += ["", "Failed, so not in the table:", ""]
        lines += [f"- {name}: {error}" for name, error in result.failed.items()]
    if result.not_run:
        lines += ["", "Not run yet, so not in the table: " + ", ".join(result.not_run) + "."]
    return "\n".join(lines) + "\n"


def redraw_spread(evaluations_by_name):
    """The range of the runs' test-loss spread over draws of z, as text ('0.01 to 0.11 nats')."""
    spreads = [e["test_loss_redraw_sd"] for e in evaluations_by_name.values()
               if isinstance(e.get("test_loss_redraw_sd"), (int, float))]
    return f"{min(spreads):.2f} to {max(spreads):.2f} nats" if spreads else "a few hundredths of a nat"


def write_summary(result, configurations, defaults, common, path):
    """Write summary.md atomically; return its path."""
    text = summary_markdown(result, configurations, defaults, common)
    return _helpers().write_bytes_atomically(text.encode(), path)


# --------------------------------------------------------------------------- figure


def rate_distortion_points(metrics_by_name, defaults):
    """The grey-level runs of the default dataset: (beta runs at the default LATENT_DIM, other runs), as tuples."""
    beta_runs, others = [], []
    for name, metrics in metrics_by_name.items():
        config = metrics["config"]
        if config.get("BINARIZE") or config.get("DATASET") != defaults["DATASET"]:
            continue
        rec, kl = metrics["final_test_recon"], metrics["final_test_kl"]
        point = (name, config.get("BETA"), kl, rec, metrics.get("final_test_negative_elbo", rec + kl))
        (beta_runs if config.get("LATENT_DIM") == defaults["LATENT_DIM"] else others).append(point)
    return sorted(beta_runs, key=lambda point: point[1]), others


def rate_distortion_figure(metrics_by_name, defaults):
    """KL (rate) against reconstruction (distortion), iso-ELBO lines, the lowest -ELBO marked; None if no runs."""
    from matplotlib.figure import Figure

    beta_runs, others = rate_distortion_points(metrics_by_name, defaults)
    points = beta_runs + others
    if not points:
        return None
    figure = Figure(figsize=(7.5, 5.5))
    ax = figure.subplots()
    kls, recs = [p[2] for p in points], [p[3] for p in points]
    span = max(max(kls) - min(kls), max(recs) - min(recs), 4.0)
    ax.set_xlim(max(0.0, min(kls) - 0.25 * span), max(kls) + 0.25 * span)
    ax.set_ylim(min(recs) - 0.25 * span, max(recs) + 0.25 * span)
    best = min(points, key=lambda p: p[4])
    for index, (_, _, kl, rec, neg_elbo) in enumerate(points):  # rec + KL = constant: slope -1
        ax.axline((kl, rec), slope=-1, color="0.3" if neg_elbo == best[4] else "0.7", lw=1, ls="--",
                  label="rec + KL = constant (iso −ELBO)" if index == 0 else None, zorder=1)
    if beta_runs:
        ax.plot([p[2] for p in beta_runs], [p[3] for p in beta_runs], "o-", color="tab:blue", ms=7, zorder=3,
                label=f"β runs, LATENT_DIM = {defaults['LATENT_DIM']}")
        for _, beta, kl, rec, neg_elbo in beta_runs:
            ax.annotate(f"β = {beta:g}\n−ELBO {neg_elbo:.1f}", (kl, rec), textcoords="offset points",
                        xytext=(8, 6), fontsize=8, bbox=LABEL_BOX)
    for name, beta, kl, rec, neg_elbo in others:
        ax.plot(kl, rec, "s", color="tab:orange", ms=7, zorder=3, label=name)
        ax.annotate(f"{name} (β = {beta:g})\n−ELBO {neg_elbo:.1f}", (kl, rec), textcoords="offset points",
                    xytext=(8, 6), fontsize=8, bbox=LABEL_BOX)
    ax.plot(best[2], best[3], "*", color="tab:red", ms=18, zorder=4, label=f"lowest −ELBO: {best[0]}")
    epochs = sorted({m["config"].get("EPOCHS") for m in metrics_by_name.values()})
    data = DATASET_NAMES.get(defaults["DATASET"], str(defaults["DATASET"]))
    ax.set(xlabel="rate: KL(q(z|x) ‖ p(z)), nats per image",
           ylabel="distortion: reconstruction −log p(x|z), nats per image",
           title=f"Rate–distortion of the grey-level runs ({data} test set, {'/'.join(map(str, epochs))} "
           f"epoch{'' if epochs == [1] else 's'})")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    return figure


def write_figure(metrics_by_name, defaults, path):
    """Write rate_distortion.png atomically; return its path, or None (and remove a stale one) if no runs."""
    figure = rate_distortion_figure(metrics_by_name, defaults)
    if figure is None:
        Path(path).unlink(missing_ok=True)
        return None
    return _helpers().save_figure(figure, path)


# --------------------------------------------------------------------------- publishing and command line


def publish(result, out_root, publish_dir):
    """Copy summary.md, the figure and each run's metrics.json (as NAME.json) and evaluation.json (as
    NAME.evaluation.json) into `publish_dir`; return the paths."""
    vh = _helpers()
    publish_dir = Path(publish_dir)
    publish_dir.mkdir(parents=True, exist_ok=True)
    files = [(result.summary, SUMMARY), (result.figure, FIGURE)]
    for name in result.metrics:
        files += [(Path(out_root) / name / METRICS, f"{name}.json"),
                  (Path(out_root) / name / EVALUATION, f"{name}.evaluation.json")]
    return [vh.write_bytes_atomically(Path(source).read_bytes(), publish_dir / target)
            for source, target in files if source is not None]


def build_parser():
    """The command line's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Configurations: " + "; ".join(
                                         f"{name} ({', '.join(format_setting(k, v) for k, v in s.items())})"
                                         for name, s in CONFIGURATIONS.items()))
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the runs, summary and figure "
                        "(default: build/sweep)")
    parser.add_argument("--data-dir", help="where MNIST is, and Fashion-MNIST if its FashionMNIST/raw is there "
                        "(default: $VAE_DATA_DIR, else data)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these configurations")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every configuration, e.g. --set EPOCHS=1 or --set IW_SAMPLES=100 "
                        "(repeatable)")
    parser.add_argument("--config", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="define the configurations here instead of the built-in list (repeatable)")
    parser.add_argument("--publish", metavar="DIR", help="afterwards, if every configuration is done, copy "
                        "summary.md, the figure, each NAME.json (metrics) and NAME.evaluation.json into DIR")
    return parser


def main(argv=None):
    """Run the sweep from the command line; returns the exit status (1 if a configuration failed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        common = {}
        for text in args.set:
            common.update(parse_assignments(text))
        configurations = dict(map(parse_configuration, args.config)) if args.config else CONFIGURATIONS
        result = run_sweep(configurations, args.out, common, data_dir=args.data_dir, only=args.only)
    except ValueError as error:
        parser.error(str(error))
    status = 0 if result.ok else 1
    if args.publish:
        if result.failed or result.not_run:
            print(f"not published to {args.publish}: not every configuration is done", flush=True)
            return 1
        copied = publish(result, args.out, args.publish)
        print(f"published {len(copied)} files to {args.publish}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
