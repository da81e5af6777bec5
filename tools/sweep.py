"""The exercises, measured: for each configuration, the walkthrough trains and the companion evaluates.

papermill runs both notebooks per configuration into OUT/NAME, with that configuration's settings as parameters; a
configuration already done with those settings is skipped. Then OUT/summary.md and OUT/rate_distortion.png, and
with --publish DIR, once every configuration is done, copies of them and of each run's JSON files and figures.
CONTRIBUTING.md ("The sweep") says more.

    python tools/sweep.py --out build/sweep --data-dir data --publish results/sweep
    python tools/sweep.py --only beta-1,latent-2 --set EPOCHS=1 --set TRAIN_SUBSET=2000 --out build/quick-sweep
"""

import argparse
import ast
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import make_commands  # noqa: E402

import vae_helpers as vh  # noqa: E402

NOTEBOOKS = (REPO / "Variational_autoencoder.ipynb", REPO / "Evaluating_a_trained_VAE.ipynb")  # run in this order
CONFIGURATIONS = {  # name (its folder): the settings that differ from the notebooks' defaults
    "beta-0": {"BETA": 0.0},  # in effect an autoencoder: nothing pulls q(z|x) towards the prior, sigma shrinks
    "beta-0.25": {"BETA": 0.25},
    "beta-0.5": {"BETA": 0.5},
    "beta-1": {},  # the defaults: the VAE
    "beta-2": {"BETA": 2.0},
    "beta-4": {"BETA": 4.0},
    "latent-2": {"LATENT_DIM": 2},
    "binarized": {"BINARIZE": True},
    "fashion": {"DATASET": "fashion"},
    # exercise 5's bug, a BCE averaged over the 784 pixels and 128 images beside a summed KL: that loss is
    # (rec + 128 * 784 * KL) / (128 * 784), and Adam's steps do not depend on a constant factor (up to its epsilon).
    # 128 is the default BATCH_SIZE; the bug's last, smaller batch (60,000 = 468 * 128 + 96) weighs the KL less.
    "mean-bce": {"BETA": 128.0 * 784},
}
# The settings that define a run: one made with other OUT_DIR, DATA_DIR, DEVICE or RESUME is the same run.
COMPARED = ("EPOCHS", *vh.RUN_SETTINGS, "IW_SAMPLES", "IW_TEST_IMAGES")
FIGURES = ("samples.png", "reconstructions.png", "manifold.png")  # published as NAME.samples.png, ..., where made
SUMMARY, FIGURE = "summary.md", "rate_distortion.png"


def notebook_defaults(notebook):
    """The values of a notebook's parameters cell, read by papermill."""
    import papermill as pm

    return {name: ast.literal_eval(p["default"]) for name, p in pm.inspect_notebook(str(notebook)).items()}


def repo_path(path):
    """`path` as the notebooks see it (they run in the repository): relative to it where inside it."""
    path = Path(os.path.abspath(os.path.expanduser(path)))  # links kept: data/ may be one
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def show(name, value):
    """NAME=value, as one would write it on the command line."""
    return f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"


def read_run(folder):
    """(metrics.json, evaluation.json) of a configuration's folder; OSError if missing, ValueError if damaged."""
    return tuple(json.loads((Path(folder) / file).read_text()) for file in vh.PUBLISHED)


def is_complete(folder, wanted):
    """True if `folder` holds metrics.json and evaluation.json made with the settings `wanted` (those in COMPARED).

    The evaluation must record every compared setting, its own and its checkpoint's; the training, those it has.
    """
    try:
        metrics, evaluation = read_run(folder)
        trained, evaluated = metrics["config"], {**evaluation["checkpoint_config"], **evaluation["config"]}
        return all(evaluated.get(k) == wanted[k] and trained.get(k, wanted[k]) == wanted[k]
                   for k in COMPARED if k in wanted)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def plan(out, data_dir="data", configurations=CONFIGURATIONS, common=None, notebooks=NOTEBOOKS):
    """({name: its settings, checked by vh.check_settings}, the defaults, checked); ConfigError for a bad setting."""
    defaults = {}
    for notebook in reversed(notebooks):  # the walkthrough's values win
        defaults.update(notebook_defaults(notebook))
    base = {**defaults, **(common or {}), "DATA_DIR": repo_path(data_dir), "RESUME": True}
    wanted = {}
    for name, settings in configurations.items():
        unknown = sorted((set(common or {}) | set(settings)) - set(vh.SETTINGS))
        if unknown:
            raise vh.ConfigError(f"{name}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(vh.SETTINGS)}")
        try:
            wanted[name] = vh.check_settings({**base, **settings, "OUT_DIR": repo_path(Path(out) / name)})
        except vh.ConfigError as error:
            raise vh.ConfigError(f"{name}: {error}") from None
    return wanted, vh.check_settings(defaults)


def run_configuration(wanted, notebooks, folder):
    """Run each notebook with its parameters (of `wanted`) into `folder`, in the repository."""
    import papermill as pm

    folder.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:  # a figure left by a run with other settings must not be published as this one's
        (folder / name).unlink(missing_ok=True)
    if wanted["DATASET"] == "fashion" and vh.missing_files(REPO / wanted["DATA_DIR"], "fashion"):
        wanted = {**wanted, "DATA_DIR": repo_path(folder.parent / "data")}  # never downloaded: Debian's, unpacked
        make_commands.unpack_fashion(REPO / wanted["DATA_DIR"])
    for notebook in notebooks:
        parameters = {name: wanted[name] for name in notebook_defaults(notebook)}
        pm.execute_notebook(str(notebook), str(folder / Path(notebook).name), parameters=parameters,
                            cwd=str(REPO), progress_bar=False, log_output=False,
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])


def run_sweep(out, data_dir="data", configurations=CONFIGURATIONS, common=None, only=None, notebooks=NOTEBOOKS):
    """Run the configurations not yet done (of `only`, if given); write the summary and the figure.

    Returns ({name: (metrics, evaluation)} of every configuration done, {name: why it failed}).
    """
    unknown = sorted(set(only or ()) - set(configurations))
    if unknown:
        raise ValueError(f"no configuration {', '.join(unknown)}; there are {', '.join(configurations)}")
    out = Path(out)
    wanted, defaults = plan(out, data_dir, configurations, common, notebooks)
    runs, failed = {}, {}
    for name, settings in wanted.items():
        folder = out / name
        if not is_complete(folder, settings):
            if only is not None and name not in only:
                continue
            print(f"{name}: running in {folder}", flush=True)
            started = time.perf_counter()
            try:
                run_configuration(settings, notebooks, folder)
                if not is_complete(folder, settings):
                    raise RuntimeError(f"the notebooks finished, but {folder} lacks metrics.json and evaluation.json "
                                       "with these settings")
            except Exception as error:  # a notebook's error (papermill: ename, evalue), a missing data set, ...
                message = getattr(error, "evalue", None) or str(error)
                failed[name] = f"{getattr(error, 'ename', type(error).__name__)}: {message.strip().splitlines()[0]}"
                print(f"{name}: FAILED {failed[name]} (the executed notebooks are in {folder})", flush=True)
                continue
            done = f"done in {time.perf_counter() - started:.0f} s"
        else:
            done = "skipped (done)"
        metrics, evaluation = runs[name] = read_run(folder)
        print(f"{name}: {done}: rec {metrics['final_test_recon']:.1f}, KL {metrics['final_test_kl']:.1f}, "
              f"-L_K {evaluation['importance_weighted']['nll']:.1f}", flush=True)
    (out / SUMMARY).write_text(summary_markdown(runs, defaults))
    figure = rate_distortion_figure(runs)
    if figure is None:
        (out / FIGURE).unlink(missing_ok=True)
    else:
        figure.savefig(out / FIGURE, bbox_inches="tight")
    return runs, failed


def summary_markdown(runs, defaults):
    """One Markdown table of the runs {name: (metrics, evaluation)}, with the settings that differ from `defaults`."""
    lines = ["# The exercises, measured", "",
             "| configuration | changed settings | rec | KL | −ELBO | −L_K | active units | seconds |",
             "|---|---|--:|--:|--:|--:|--:|--:|"]
    samples, images = set(), set()
    for name, (metrics, evaluation) in runs.items():
        config, iw = {**metrics["config"], **evaluation["config"]}, evaluation["importance_weighted"]
        changed = [show(k, config[k]) for k in COMPARED if k in config and config[k] != defaults.get(k)]
        samples.add(f"{iw['K']:,}")
        images.add(f"{iw.get('test_images', config.get('IW_TEST_IMAGES')):,}")
        seconds = metrics["train_seconds"] + evaluation.get("seconds", 0)
        lines.append(f"| {name} | {', '.join(changed) or '(defaults)'} | {metrics['final_test_recon']:.1f} "
                     f"| {metrics['final_test_kl']:.1f} | {metrics['final_test_negative_elbo']:.1f} | {iw['nll']:.1f} "
                     f"| {evaluation['active_units']} of {config['LATENT_DIM']} | {seconds:.0f} |")
    lines += ["", "In nats per test image: **rec**, the reconstruction term −log p(x|z), and **KL**, KL(q(z|x) ‖ "
              "p(z)), on the whole test set after the last epoch; **−ELBO** = rec + KL, whatever β the run was "
              "trained with, so that rows compare (lower is better); **−L_K**, the importance-weighted bound of "
              f"Burda et al. (2016) with K = {' or '.join(sorted(samples)) or 'K'} samples on the first "
              f"{' or '.join(sorted(images)) or 'N'} test images. **Active units**: latent dimensions whose "
              "average KL exceeds 0.01 nats. **Seconds**: training and evaluation. Binarized and Fashion-MNIST "
              f"rows are measured on other data: they compare with no grey-level MNIST row, and {FIGURE} leaves "
              "them out. Each run's numbers are in NAME.json (the walkthrough's metrics.json) and "
              "NAME.evaluation.json (the companion's evaluation.json)."]
    return "\n".join(lines) + "\n"


def rate_distortion_figure(runs):
    """KL (x) against reconstruction (y), one labelled point per grey-level MNIST run; None if there is none."""
    from matplotlib.figure import Figure

    points = {name: (metrics["final_test_kl"], metrics["final_test_recon"]) for name, (metrics, _) in runs.items()
              if metrics["config"].get("DATASET") == "mnist" and not metrics["config"].get("BINARIZE")}
    if not points:
        return None
    figure = Figure(figsize=(7, 5))
    ax = figure.subplots()
    for name, (kl, rec) in points.items():
        ax.plot(kl, rec, "o", color="tab:blue")
        ax.annotate(name, (kl, rec), textcoords="offset points", xytext=(6, 4), fontsize=9)
    best = min(points.values(), key=sum)
    ax.axline(best, slope=-1, color="0.6", ls="--", lw=1, label=f"rec + KL = {sum(best):.1f}, the lowest −ELBO")
    ax.set(xlabel="rate: KL(q(z|x) ‖ p(z)), nats per image", ylabel="distortion: −log p(x|z), nats per image",
           title="Rate and distortion, grey-level MNIST test set")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    return figure


def publish(out, names, target):
    """Copy summary.md, the figure (if any), each run's JSON files and figures, under their published names, into a
    new folder that then replaces `target`: an interrupted or failed publish leaves the old results whole."""
    target = Path(target)
    staging, old = (target.with_name(f".{target.name}.{kind}") for kind in ("new", "old"))
    for folder in (staging, old):
        shutil.rmtree(folder, ignore_errors=True)  # left by an interrupted publish
    staging.mkdir(parents=True)
    pairs = [(Path(out) / file, file) for file in (SUMMARY, FIGURE) if (Path(out) / file).is_file()]
    pairs += [(Path(out) / name / file, published.format(name)) for name in names
              for file, published in vh.PUBLISHED.items()]
    pairs += [(Path(out) / name / file, f"{name}.{file}") for name in names for file in FIGURES
              if (Path(out) / name / file).is_file()]
    for source, copy in pairs:
        shutil.copyfile(source, staging / copy)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return [target / copy for _, copy in pairs]


def main(argv=None):
    """The command line; returns the exit status: 1 if a configuration failed or could not be published."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="configurations: " + "; ".join(
        f"{name} ({', '.join(show(*item) for item in s.items()) or 'defaults'})" for name, s in CONFIGURATIONS.items()))
    parser.add_argument("--out", default="build/sweep", help="the runs, summary.md and the figure (build/sweep)")
    parser.add_argument("--data-dir", default="data", help="where MNIST is, and Fashion-MNIST if there")
    parser.add_argument("--only", nargs="+", metavar="NAME[,NAME]", help="run only these (the summary shows all done)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for every configuration, e.g. --set EPOCHS=1 (repeatable)")
    parser.add_argument("--publish", metavar="DIR", help="once every configuration is done, copy the results there")
    parser.add_argument("--notebooks", nargs=2, metavar=("WALKTHROUGH", "COMPANION"), default=NOTEBOOKS,
                        help="run these notebooks instead (tests use stand-ins)")
    args = parser.parse_args(argv)
    only = args.only and [name for text in args.only for name in text.split(",") if name]
    if any("=" not in item for item in args.set):
        parser.error("--set takes NAME=VALUE")
    common = {}
    for name, text in (item.split("=", 1) for item in args.set):
        try:  # a Python literal, as papermill's -p reads values: EPOCHS=1, BINARIZE=True, DATASET='fashion'
            common[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            common[name] = text  # a bare word: a string, such as DATASET=fashion
    try:
        runs, failed = run_sweep(args.out, args.data_dir, CONFIGURATIONS, common, only, args.notebooks)
    except ValueError as error:  # vh.ConfigError included
        parser.error(str(error))
    print(f"{len(runs)} of {len(CONFIGURATIONS)} configurations done; {Path(args.out) / SUMMARY}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    if args.publish:
        if len(runs) < len(CONFIGURATIONS):
            print(f"not published to {args.publish}: not every configuration is done", flush=True)
            return 1
        print(f"published {len(publish(args.out, runs, args.publish))} files to {args.publish}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
