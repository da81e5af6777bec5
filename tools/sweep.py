"""The exercises, measured: run the unchanged notebook once per configuration and compare the runs.

Each configuration in CONFIGURATIONS (below) is the notebook's defaults with a few settings changed. The sweep
executes the notebook headless through papermill once per configuration, each into its own folder
OUT/<name>/ (the executed notebook, its figures, metrics.json and the checkpoint vae.pt), then writes
OUT/summary.md (one row per configuration) and OUT/rate_distortion.png (KL against reconstruction for the
grey-level beta runs, with lines of constant negative ELBO).

Resumable: a configuration whose metrics.json is complete (it parses, its settings are the configuration's and
its history holds every epoch) is skipped; any other is run with RESUME=True, so an interrupted one continues
from its checkpoint. A failed configuration is reported by name and the others still run; the exit status is
non-zero if any failed.

Settings reach the kernels only as papermill parameters. The notebook lets VAE_<NAME> environment variables
override parameters, so the kernels run with every VAE_* variable removed (the sweep names the ones it
ignores). Two are honoured, by passing them on as parameters: VAE_DATA_DIR (unless --data-dir is given) and
VAE_DEVICE (unless --set DEVICE=... is given).

    python tools/sweep.py                                  # every configuration, into build/sweep
    python tools/sweep.py --only beta-1 latent-2           # some of them (the summary still covers all)
    python tools/sweep.py --set EPOCHS=1 --set TRAIN_SUBSET=2000 --out build/quick-sweep
    python tools/sweep.py --config a:BETA=0.5 --config b:BETA=2,LATENT_DIM=8 --out build/mine
    python tools/sweep.py --publish results/sweep          # also copy the small results into a committed folder
"""

import argparse
import ast
import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "Variational_autoencoder.ipynb"
DEFAULT_OUT = REPO / "build" / "sweep"

# name: the settings that differ from the notebook's defaults (the parameters cell). One folder per name.
CONFIGURATIONS = {
    "beta-0.25": {"BETA": 0.25},
    "beta-0.5": {"BETA": 0.5},
    "beta-1": {"BETA": 1.0},
    "beta-2": {"BETA": 2.0},
    "beta-4": {"BETA": 4.0},
    "latent-2": {"LATENT_DIM": 2},
    "binarized": {"BINARIZE": True},
}

SWEEP_SETS = ("OUT_DIR", "RESUME")  # the sweep chooses these itself, per configuration
ENV_PASSED_ON = {"DATA_DIR": "VAE_DATA_DIR", "DEVICE": "VAE_DEVICE"}  # read by the sweep, passed as parameters
NOT_COMPARED = ("OUT_DIR", "RESUME", "DATA_DIR", "DEVICE")  # a finished run stays finished if only these differ
REQUIRED_METRICS = ("config", "history", "final_test_recon", "final_test_kl", "importance_weighted",
                    "active_units", "train_seconds")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
EXECUTED_NOTEBOOK = "executed.ipynb"
SUMMARY = "summary.md"
FIGURE = "rate_distortion.png"
LABEL_BOX = {"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8}  # point labels over lines


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

    return {name: ast.literal_eval(info["default"]) for name, info in pm.inspect_notebook(str(notebook)).items()}


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
    known = _helpers().SETTINGS
    for name, settings in [*configurations.items(), ("--set", common)]:
        if name != "--set" and not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"configuration name {name!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ValueError(f"{name}: unknown setting(s) {unknown}; known: {', '.join(known)}")
        chosen = sorted(set(settings) & set(SWEEP_SETS))
        if chosen:
            raise ValueError(f"{name}: {', '.join(chosen)} cannot be set: the sweep chooses them per configuration")


def normalized(settings):
    """The settings as the notebook records them in metrics.json (each parsed by its checker); ValueError if bad."""
    known = _helpers().SETTINGS
    values = {}
    for name, value in settings.items():
        parse, accepts = known[name]
        try:
            values[name] = parse(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r}: must be {accepts}") from None
    return values


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


# --------------------------------------------------------------------------- completeness


def read_metrics(out_dir):
    """The configuration folder's metrics.json as a dict, or None if it is missing or unreadable."""
    try:
        metrics = json.loads((Path(out_dir) / "metrics.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def incomplete_reason(out_dir, expected):
    """Why `out_dir` does not hold a finished run with the `expected` (normalized) settings; None if it does."""
    path = Path(out_dir) / "metrics.json"
    if not path.is_file():
        return "no metrics.json"
    metrics = read_metrics(out_dir)
    if metrics is None:
        return "metrics.json is unreadable or not a JSON object"
    missing = [key for key in REQUIRED_METRICS if key not in metrics]
    if missing:
        return f"metrics.json lacks {missing}"
    config, history = metrics["config"], metrics["history"]
    if not isinstance(config, dict) or not isinstance(history, dict):
        return "metrics.json has no config or history"
    differences = [f"{name} {config.get(name)!r}, wanted {value!r}" for name, value in expected.items()
                   if name not in NOT_COMPARED and config.get(name) != value]
    if differences:
        return "made with other settings: " + "; ".join(differences)
    epochs = expected["EPOCHS"]
    for key in ("train_recon", "train_kl", "test_recon", "test_kl"):
        if not isinstance(history.get(key), list) or len(history[key]) != epochs:
            return f"history {key} does not hold all {epochs} epochs"
    iw = metrics["importance_weighted"]
    if not isinstance(iw, dict) or not {"nll", "K"} <= set(iw):
        return "metrics.json has no importance-weighted estimate"
    return None


def is_complete(out_dir, expected):
    """True if `out_dir` holds a finished run with the `expected` settings (see incomplete_reason)."""
    return incomplete_reason(out_dir, expected) is None


# --------------------------------------------------------------------------- numbers and formatting


def numbers(metrics):
    """The sweep's numbers of one run: rec, kl, negative ELBO at beta = 1, the IW bound -L_K, K, active units."""
    rec, kl = metrics["final_test_recon"], metrics["final_test_kl"]
    iw = metrics["importance_weighted"]
    return {
        "rec": rec,
        "kl": kl,
        "neg_elbo": metrics.get("final_test_negative_elbo", rec + kl),  # whatever beta it was trained with
        "iw_nll": iw["nll"],
        "K": iw["K"],
        "iw_images": iw.get("test_images"),
        "active": metrics["active_units"],
        "active_burda": metrics.get("active_units_burda"),
        "latent_dim": metrics["config"].get("LATENT_DIM"),
        "train_seconds": metrics["train_seconds"],
    }


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


def progress_line(name, width, metrics, outcome):
    """One line of progress: the configuration's name, its numbers, and how it went (its time, or skipped)."""
    n = numbers(metrics)
    active = f"{n['active']}/{n['latent_dim']}"
    if n["active_burda"] is not None:
        active += f" (Burda {n['active_burda']})"
    return (f"{name:<{width}}  rec {n['rec']:5.1f}  KL {n['kl']:4.1f}  -ELBO {n['neg_elbo']:5.1f}  "
            f"-L_K {n['iw_nll']:5.1f} (K={n['K']})  active {active}  {outcome}")


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
    """What a sweep did: finished runs' metrics by name, failures by name, skipped and not-run names, files."""

    metrics: dict
    failed: dict
    skipped: list
    not_run: list
    summary: Path = None
    figure: Path = None

    @property
    def ok(self):
        """True if no configuration failed."""
        return not self.failed


def _parameter_path(path):
    """A path for the notebook's parameters: relative to the repository (its working folder) if inside it."""
    path = Path(os.path.abspath(os.path.expanduser(str(path))))  # symbolic links kept: data/ may be one
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def run_configuration(name, parameters, out_dir, notebook=NOTEBOOK):
    """Execute the notebook once with `parameters` into `out_dir` (raises papermill's error if a cell fails)."""
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    # The kernel's own log level: its start-up warnings (e.g. about unencrypted local TCP) would break the
    # progress lines; what the notebook's cells print or warn goes into the executed notebook as usual.
    pm.execute_notebook(str(notebook), str(out_dir / EXECUTED_NOTEBOOK), parameters=parameters, cwd=str(REPO),
                        progress_bar=False, log_output=False, extra_arguments=["--IPKernelApp.log_level=ERROR"])


def run_sweep(configurations, out_root=DEFAULT_OUT, common=None, data_dir=None, only=None, notebook=NOTEBOOK,
              stream=None):
    """Run each configuration not yet finished (of `only`, if given), write the summary and figure; a SweepResult."""
    # configurations: {name: {SETTING: value}}; common: settings for every configuration, beneath its own;
    # data_dir: else $VAE_DATA_DIR, else the notebook's default; progress lines go to `stream` (default stdout).
    stream = stream or sys.stdout
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

    defaults = notebook_defaults(notebook)
    for setting, variable in ENV_PASSED_ON.items():  # honoured: passed on as parameters, not as variables
        if setting not in common and os.environ.get(variable):
            common[setting] = os.environ[variable]
    if data_dir is not None:
        common["DATA_DIR"] = data_dir
    if "DATA_DIR" in common:  # the kernel works in the repository: relative paths are made to mean the same there
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
        try:
            expected = normalized(wanted)
        except ValueError:
            expected = None  # the notebook will say what is wrong
        if expected is not None and is_complete(out_dir, expected):
            result.metrics[name] = read_metrics(out_dir)
            if name in selected:
                result.skipped.append(name)
                say(progress_line(name, width, result.metrics[name], "skipped (done)"))
            continue
        if name not in selected:
            result.not_run.append(name)
            continue
        say(f"{name:<{width}}  ", end="")
        resumed = (out_dir / "vae.pt").is_file()
        parameters = {**wanted, "OUT_DIR": _parameter_path(out_dir), "RESUME": True}
        started = time.perf_counter()
        try:
            with environment(env):
                run_configuration(name, parameters, out_dir, notebook)
            reason = incomplete_reason(out_dir, expected) if expected is not None else None
            metrics = read_metrics(out_dir)
            if reason is not None or metrics is None:
                raise RuntimeError(f"the notebook finished but {out_dir / 'metrics.json'} is not complete: {reason}")
        except Exception as error:  # any failure is reported by name, and the sweep goes on
            message = failure_message(error)
            if "CheckpointError" in message:
                message += f" (to start {name} afresh, delete {out_dir})"
            result.failed[name] = message
            say(f"FAILED {message}")
            continue
        result.metrics[name] = metrics
        outcome = f"{format_seconds(time.perf_counter() - started)}{' (resumed)' if resumed else ''}"
        say(progress_line(name, width, result.metrics[name], outcome)[width + 2 :])
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
    lines.append("Every run: the notebook's defaults" + (f" except {every_run}" if every_run else "")
                 + ", plus the settings in its row. Devices: "
                 + (", ".join(sorted({str(m.get("device")) for m in result.metrics.values()})) or "none") + ".")
    lines += ["", "| configuration | settings | rec | KL | −ELBO (β = 1) | −L_K | K | active (KL) "
              "| active (Burda) | training time |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    iw_images = set()
    for name in configurations:
        if name not in result.metrics:
            continue
        n = numbers(result.metrics[name])
        iw_images.add(n["iw_images"])
        own = normalized(configurations[name])
        differing = [format_setting(k, v) for k, v in own.items() if default_values.get(k) != v]
        burda = "–" if n["active_burda"] is None else str(n["active_burda"])
        lines.append(f"| {name} | {', '.join(differing) or '(defaults)'} | {n['rec']:.1f} | {n['kl']:.1f} "
                     f"| {n['neg_elbo']:.1f} | {n['iw_nll']:.1f} | {n['K']:,} | {n['active']} | {burda} "
                     f"| {format_seconds(n['train_seconds'])} |")
    images = ", ".join(f"{count:,}" for count in sorted(i for i in iw_images if i is not None)) or "N"
    lines += [
        "",
        "Columns, all in nats per test image: **rec**, the reconstruction term −log p(x|z) (binary cross-entropy, "
        "one z per image) and **KL**, KL(q(z|x) ‖ p(z)), on the 10,000 test images after the last epoch; "
        "**−ELBO (β = 1)** = rec + KL, the negative ELBO whatever β the run was trained with, so that rows "
        "compare (lower is better); **−L_K**, the importance-weighted bound of Burda et al. (2016) with **K** "
        f"samples per image on the first {images} test images: an upper bound on −log p(x) in expectation, "
        "tighter than the negative ELBO, and a true negative log-likelihood bound only for the binarized row. "
        f"Test losses are one-sample estimates whose spread over draws of z is {redraw_spread(result.metrics)} "
        "(each run's test_loss_redraw_sd), hence one decimal; **active (KL)**, "
        "latent dimensions whose average KL exceeds 0.01 nats; **active (Burda)**, dimensions whose posterior "
        "mean varies across test images with variance above 0.01 (Burda et al., 2016), – where the run did not "
        "record it; **training time**, the seconds of the training epochs, each with its test evaluation. "
        "The binarized row "
        "is measured on binary images, a different data distribution: its numbers are not comparable with the "
        "grey-level rows.",
    ]
    if result.failed:
        lines += ["", "Failed, so not in the table:", ""]
        lines += [f"- {name}: {error}" for name, error in result.failed.items()]
    if result.not_run:
        lines += ["", "Not run yet, so not in the table: " + ", ".join(result.not_run) + "."]
    return "\n".join(lines) + "\n"


def redraw_spread(metrics_by_name):
    """The range of the runs' test-loss spread over draws of z, as text ('0.01 to 0.11 nats')."""
    spreads = [m["test_loss_redraw_sd"] for m in metrics_by_name.values() if m.get("test_loss_redraw_sd") is not None]
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
        n = numbers(metrics)
        point = (name, config.get("BETA"), n["kl"], n["rec"], n["neg_elbo"])
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
    ax.set(xlabel="rate: KL(q(z|x) ‖ p(z)), nats per image",
           ylabel="distortion: reconstruction −log p(x|z), nats per image",
           title=f"Rate–distortion of the grey-level runs (MNIST test set, {'/'.join(map(str, epochs))} "
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
    """Copy summary.md, the figure and each run's metrics.json (as NAME.json) into `publish_dir`; return the paths."""
    vh = _helpers()
    publish_dir = Path(publish_dir)
    publish_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for source, target in [(result.summary, SUMMARY), (result.figure, FIGURE),
                           *[(Path(out_root) / name / "metrics.json", f"{name}.json") for name in result.metrics]]:
        if source is not None:
            copied.append(vh.write_bytes_atomically(Path(source).read_bytes(), publish_dir / target))
    return copied


def build_parser():
    """The command line's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Configurations: " + "; ".join(
                                         f"{name} ({', '.join(format_setting(k, v) for k, v in s.items())})"
                                         for name, s in CONFIGURATIONS.items()))
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the runs, summary and figure "
                        "(default: build/sweep)")
    parser.add_argument("--data-dir", help="where MNIST is (default: $VAE_DATA_DIR, else data)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these configurations")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every configuration, e.g. --set EPOCHS=1 (repeatable)")
    parser.add_argument("--config", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="define the configurations here instead of the built-in list (repeatable)")
    parser.add_argument("--publish", metavar="DIR", help="afterwards, if every configuration is done, copy "
                        "summary.md, the figure and each NAME.json (metrics) into DIR")
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
