"""The exercises, measured: for each configuration and training seed, papermill runs the walkthrough, then the
companion, into OUT/NAME/seed-SEED (a run done with those settings is skipped); then OUT/summary.md and
OUT/rate_distortion.png, and with --publish DIR, once every run is done, the results. CONTRIBUTING.md says more.

    python tools/sweep.py --out build/sweep --data-dir data --jobs 2 --publish results/sweep
    python tools/sweep.py --only beta-1,latent-2 --seeds 1 --set EPOCHS=1 --set TRAIN_SUBSET=2000 --out build/quick
"""

import argparse
import ast
import concurrent.futures
import json
import math
import multiprocessing
import os
import shutil
import statistics
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
    "lab": {"EPOCHS": 5},  # the short lab's setting (TEACHING.md)
}
SEEDS, MORE_SEEDS = 3, {"beta-1": 5, "beta-0.5": 5}  # training seeds per configuration; more where it is close
# The settings that define a run: one made with other OUT_DIR, DATA_DIR, DEVICE or RESUME is the same run.
COMPARED = ("EPOCHS", *vh.RUN_SETTINGS, "IW_SAMPLES", "IW_TEST_IMAGES")
FIGURES = ("samples.png", "reconstructions.png", "manifold.png")  # published from each configuration's first seed
SUMMARY, FIGURE, TIMES = "summary.md", "rate_distortion.png", "sweep-times.json"
# summary.md's columns: (heading, decimals, the value of a run (metrics, evaluation))
COLUMNS = (("rec", 1, lambda m, e: m["final_test_recon"]), ("KL", 1, lambda m, e: m["final_test_kl"]),
           ("−ELBO", 1, lambda m, e: m["final_test_negative_elbo"]),
           ("−L_K", 1, lambda m, e: e["importance_weighted"]["nll"]),
           ("active units (KL)", 1, lambda m, e: e["active_units"]),
           ("active units (Burda)", 1, lambda m, e: e["active_units_burda"]),
           ("seconds", 0, lambda m, e: m["train_seconds"] + e["seconds"]))


def seeds(first, count):
    """The training seeds of a configuration: the notebooks' SEED, then seeds derived from it (not picked by hand)."""
    return [first] + [vh.seed_for(first, f"sweep seed {i}") for i in range(1, count)]


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


def is_complete(folder, wanted):
    """True if `folder` holds metrics.json and evaluation.json made with the COMPARED settings of `wanted`."""
    try:
        metrics, evaluation = vh.read_run(folder)
        trained, evaluated = metrics["config"], {**evaluation["checkpoint_config"], **evaluation["config"]}
        return all(evaluated.get(k) == wanted[k] and trained.get(k, wanted[k]) == wanted[k]
                   for k in COMPARED if k in wanted)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def plan(out, data_dir="data", configurations=CONFIGURATIONS, common=None, notebooks=NOTEBOOKS, most=None):
    """({(name, seed): its checked settings}, the checked defaults), at most `most` seeds each; ConfigError if bad."""
    defaults = {}
    for notebook in reversed(notebooks):  # the walkthrough's values win
        defaults.update(notebook_defaults(notebook))
    base = {**defaults, **(common or {}), "DATA_DIR": repo_path(data_dir), "RESUME": True}
    wanted = {}
    for name, settings in configurations.items():
        unknown = sorted((set(common or {}) | set(settings)) - set(vh.SETTINGS))
        if unknown:
            raise vh.ConfigError(f"{name}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(vh.SETTINGS)}")
        count = min(MORE_SEEDS.get(name, SEEDS), most or math.inf)
        for seed in seeds(base["SEED"], count):
            try:
                wanted[name, seed] = vh.check_settings(
                    {**base, **settings, "SEED": seed, "OUT_DIR": repo_path(Path(out) / name / f"seed-{seed}")})
            except vh.ConfigError as error:
                raise vh.ConfigError(f"{name}: {error}") from None
    return wanted, vh.check_settings(defaults)


def run_configuration(wanted, notebooks, folder, threads=None):
    """Run each notebook with its parameters into `folder`, with `threads` torch threads (or torch's); record when."""
    import papermill as pm

    started = time.time()
    if threads:  # the kernels read it when torch starts: the runs side by side share the cores without spinning
        os.environ["OMP_NUM_THREADS"] = str(threads)
    folder.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:  # a figure left by a run with other settings must not be published as this one's
        (folder / name).unlink(missing_ok=True)
    for notebook in notebooks:
        parameters = {name: wanted[name] for name in notebook_defaults(notebook)}
        pm.execute_notebook(str(notebook), str(folder / Path(notebook).name), parameters=parameters,
                            cwd=str(REPO), progress_bar=False, log_output=False,
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])
    (folder / TIMES).write_text(json.dumps({"started": started, "finished": time.time(), "threads": threads}))


def local_fashion(settings, out):
    """`settings`, reading Fashion-MNIST from OUT/data, unpacked from Debian's package, where DATA_DIR lacks it."""
    if settings["DATASET"] != "fashion" or not vh.missing_files(REPO / settings["DATA_DIR"], "fashion"):
        return settings
    make_commands.unpack_fashion(Path(out) / "data")  # never downloaded; once, before the runs start side by side
    return {**settings, "DATA_DIR": repo_path(Path(out) / "data")}


def run_sweep(out, data_dir="data", configurations=CONFIGURATIONS, common=None, only=None, notebooks=NOTEBOOKS,
              most=None, jobs=1, list_only=False):
    """Run (or list) the runs not done (of `only`), `jobs` at a time: (runs done, {run: why it failed}, planned)."""
    out = Path(out)
    wanted, defaults = plan(out, data_dir, configurations, common, notebooks, most)
    ids = {(name, seed): f"{name}/seed-{seed}" for name, seed in wanted}
    unknown = sorted(set(only or ()) - set(configurations) - set(ids.values()))
    if unknown:
        raise ValueError(f"no configuration or run {', '.join(unknown)}; configurations: {', '.join(configurations)}")
    pending = [key for key in wanted if not is_complete(out / ids[key], wanted[key])
               and (only is None or key[0] in only or ids[key] in only)]
    if list_only:
        print("\n".join(ids[key] for key in pending))
        return {}, {}, len(wanted)
    failed = {}
    wanted.update({key: local_fashion(wanted[key], out) for key in pending})
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        threads = max(1, len(vh.FairThreads().cpus) // jobs) if jobs > 1 else None  # the same bits at any count
        futures = {pool.submit(run_configuration, wanted[key], notebooks, out / ids[key], threads): key
                   for key in pending}
        print(f"{len(pending)} runs to do, {jobs} at a time: {', '.join(ids[key] for key in pending)}", flush=True)
        for future in concurrent.futures.as_completed(futures):
            key = futures[future]
            try:
                future.result()
                if not is_complete(out / ids[key], wanted[key]):
                    raise RuntimeError("the notebooks finished, but its folder lacks metrics.json and "
                                       "evaluation.json with these settings")
                print(f"{ids[key]}: done", flush=True)
            except Exception as error:  # a notebook's error (papermill: ename, evalue), a missing data set, ...
                message = getattr(error, "evalue", None) or str(error)
                failed[key] = f"{getattr(error, 'ename', type(error).__name__)}: {message.strip().splitlines()[0]}"
                print(f"{ids[key]}: FAILED {failed[key]} (its executed notebooks are in {out / ids[key]})", flush=True)
    runs = {key: vh.read_run(out / ids[key]) for key in wanted if is_complete(out / ids[key], wanted[key])}
    times = [json.loads((out / ids[key] / TIMES).read_text()) for key in runs if (out / ids[key] / TIMES).is_file()]
    (out / SUMMARY).write_text(summary_markdown(runs, defaults, times))
    figure = rate_distortion_figure(runs)
    (out / FIGURE).unlink(missing_ok=True)  # an earlier sweep's figure goes, whether or not these runs make one
    if figure is not None:
        figure.savefig(out / FIGURE, bbox_inches="tight")
    return runs, failed, len(wanted)


def spread(values, decimals):
    """'mean ± sd (min to max)' of a configuration's values over its seeds; the sample sd (n - 1); one value alone."""
    if len(values) == 1:
        return f"{values[0]:.{decimals}f}"
    mean, sd = statistics.mean(values), statistics.stdev(values)
    return f"{mean:.{decimals}f} ± {sd:.{decimals + 1}f} ({min(values):.{decimals}f} to {max(values):.{decimals}f})"


def summary_markdown(runs, defaults, times=()):
    """Markdown: a row per configuration, each column's mean, sd and range over its seeds; the seeds; the time."""
    by_name = {}
    for (name, seed), run in runs.items():
        by_name.setdefault(name, {})[seed] = run
    lines = ["# The exercises, measured, over training seeds", "",
             "| configuration | changed settings | seeds | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---|---|--:|" + "--:|" * len(COLUMNS)]
    samples, images = set(), set()
    for name, by_seed in by_name.items():
        metrics, evaluation = next(iter(by_seed.values()))
        config, iw = {**metrics["config"], **evaluation["config"]}, evaluation["importance_weighted"]
        changed = [show(k, config[k]) for k in COMPARED if k != "SEED" and k in config and config[k] != defaults.get(k)]
        samples.add(f"{iw['K']:,}")
        images.add(f"{iw.get('test_images', config.get('IW_TEST_IMAGES')):,}")
        cells = [spread([value(*run) for run in by_seed.values()], decimals) for _, decimals, value in COLUMNS]
        lines.append(f"| {name} | {', '.join(changed) or '(defaults)'} | {len(by_seed)} | " + " | ".join(cells) + " |")
    seeds_used = sorted({seed for _, seed in runs}, key=lambda seed: (seed != defaults.get("SEED"), seed))
    took = ""
    if times:
        minutes = (max(t["finished"] for t in times) - min(t["started"] for t in times)) / 60
        beside = [t["threads"] for t in times if t.get("threads")]  # run side by side, the cores divided between them
        took = (f" The {len(times)} runs took {minutes:.0f} min of wall-clock time, from the first start to the last "
                f"end; {len(beside)} ran beside another, {min(beside, default=0)} torch thread each, the rest alone")
    lines += ["", "In nats per test image: **rec**, the reconstruction term −log p(x|z), and **KL**, KL(q(z|x) ‖ "
              "p(z)), on the whole test set after the last epoch; **−ELBO** = rec + KL, whatever β the run was "
              "trained with, so that rows compare (lower is better); **−L_K**, the importance-weighted bound of "
              f"Burda et al. (2016) with K = {' or '.join(sorted(samples)) or 'K'} samples on the first "
              f"{' or '.join(sorted(images)) or 'N'} test images. **Active units**: latent dimensions whose "
              "average KL exceeds 0.01 nats, or (Burda et al.) whose posterior mean varies across test images with "
              "variance above 0.01. **Seconds**: training and evaluation, each run's own (longer beside another run). "
              "Each cell: the mean "
              "± the standard deviation over the configuration's training seeds (n − 1), then the range from the "
              "lowest to the highest. Binarized and Fashion-MNIST rows are measured on other data: they compare "
              f"with no grey-level MNIST row, and {FIGURE} leaves them out.", "",
              f"**Seeds.** The notebooks' SEED {defaults.get('SEED')}, then seeds derived from it "
              f"(`vh.seed_for(SEED, 'sweep seed i')`): {', '.join(map(str, seeds_used))}. Each run's numbers are in "
              f"NAME/seed-SEED/metrics.json (the walkthrough's) and evaluation.json (the companion's); each "
              f"configuration's figures are those of its first seed.{took and took + '.'}"]
    return "\n".join(lines) + "\n"


def rate_distortion_figure(runs):
    """KL (x) against reconstruction (y), a point for each seed of each grey-level MNIST run; None if there is none."""
    from matplotlib.figure import Figure

    points = {}
    for (name, _), (metrics, _) in runs.items():
        if metrics["config"].get("DATASET") == "mnist" and not metrics["config"].get("BINARIZE"):
            points.setdefault(name, []).append((metrics["final_test_kl"], metrics["final_test_recon"]))
    if not points:
        return None
    figure = Figure(figsize=(7, 5))
    ax = figure.subplots()
    for index, (name, seed_points) in enumerate(points.items()):
        kl, rec = zip(*seed_points)
        count = f"{len(seed_points)} seed{'s' * (len(seed_points) > 1)}"
        ax.plot(kl, rec, "o", color=f"C{index % 10}", alpha=0.7, label=f"{name} ({count})")
    lowest = min(sum(point) for seed_points in points.values() for point in seed_points)
    rate = [lowest * step / 200 for step in range(201)]  # the line rec + KL = lowest, curved by the symlog axis
    ax.plot(rate, [lowest - kl for kl in rate], color="0.6", ls="--", lw=1,
            label=f"rec + KL = {lowest:.1f}, the lowest −ELBO")
    ax.set_xscale("symlog", linthresh=20)
    ax.set(xlabel="rate: KL(q(z|x) ‖ p(z)), nats per image (linear to 20, logarithmic beyond)",
           ylabel="distortion: −log p(x|z), nats per image", title="Rate and distortion, grey-level MNIST, every seed",
           ylim=(min(rec for seed_points in points.values() for _, rec in seed_points) - 10, None))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return figure


def publish(out, names, target, first_seeds):
    """Copy the summary, figure, runs' JSON and first seeds' figures into a new folder that then replaces `target`."""
    target, out = Path(target), Path(out)
    staging, old = (target.with_name(f".{target.name}.{kind}") for kind in ("new", "old"))
    if old.exists() and not target.exists():  # a publish stopped between its two renames: the old copy is whole
        old.rename(target)
    for folder in (staging, old):
        shutil.rmtree(folder, ignore_errors=True)  # left by an interrupted publish
    pairs = [(out / file, file) for file in (SUMMARY, FIGURE) if (out / file).is_file()]
    pairs += [(out / name / f"seed-{seed}" / file, f"{name}/seed-{seed}/{file}") for name, seed in names
              for file in vh.RUN_FILES]
    pairs += [(out / name / f"seed-{seed}" / file, f"{name}/{file}") for name, seed in first_seeds.items()
              for file in FIGURES if (out / name / f"seed-{seed}" / file).is_file()]
    for source, copy in pairs:
        (staging / copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, staging / copy)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return [target / copy for _, copy in pairs]


def main(argv=None):
    """The command line; returns the exit status: 1 if a run failed or the results could not be published."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="configurations: " + "; ".join(
        f"{name} ({', '.join(show(*item) for item in s.items()) or 'defaults'})" for name, s in CONFIGURATIONS.items()))
    parser.add_argument("--out", default="build/sweep", help="the runs, summary.md and the figure (build/sweep)")
    parser.add_argument("--data-dir", default="data", help="where MNIST is, and Fashion-MNIST if there")
    parser.add_argument("--only", nargs="+", metavar="NAME[,NAME]", help="run only these configurations, or single "
                        "runs NAME/seed-SEED (the summary shows all done)")
    parser.add_argument("--seeds", type=int, metavar="N", help="at most N seeds each (1: the notebooks' SEED)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="runs side by side (1)")
    parser.add_argument("--list", action="store_true", help="print the runs not yet done, one NAME/seed-SEED a line")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for every configuration, e.g. --set EPOCHS=1 (repeatable)")
    parser.add_argument("--publish", metavar="DIR", help="once every run is done, copy the results there")
    parser.add_argument("--notebooks", nargs=2, metavar=("WALKTHROUGH", "COMPANION"), default=NOTEBOOKS,
                        help="run these notebooks instead (tests use stand-ins)")
    args = parser.parse_args(argv)
    only = args.only and [name for text in args.only for name in text.split(",") if name]
    if any("=" not in item for item in args.set) or (args.seeds or 1) < 1 or args.jobs < 1:
        parser.error("--set takes NAME=VALUE; --seeds and --jobs take a whole number >= 1")
    common = {}
    for name, text in (item.split("=", 1) for item in args.set):
        try:  # a Python literal, as papermill's -p reads values: EPOCHS=1, BINARIZE=True, DATASET='fashion'
            common[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            common[name] = text  # a bare word: a string, such as DATASET=fashion
    try:
        runs, failed, planned = run_sweep(args.out, args.data_dir, CONFIGURATIONS, common, only, args.notebooks,
                                          args.seeds, args.jobs, args.list)
    except ValueError as error:  # vh.ConfigError included
        parser.error(str(error))
    if args.list:
        return 0
    print(f"{len(runs)} of {planned} runs done; {Path(args.out) / SUMMARY}", flush=True)
    if failed:
        print(f"failed: {', '.join(f'{name}/seed-{seed}' for name, seed in failed)}", flush=True)
    if args.publish:
        if len(runs) < planned:
            print(f"not published to {args.publish}: not every run is done", flush=True)
            return 1
        first = dict(reversed(list(runs)))  # each configuration's first seed, the notebooks' SEED
        print(f"published {len(publish(args.out, runs, args.publish, first))} files to {args.publish}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
