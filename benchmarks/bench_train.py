"""Benchmark: the walkthrough's default training at a baseline revision beside a candidate, side by side in one run.

Each run executes one tree's whole Variational_autoencoder.ipynb headless (papermill; parameters EPOCHS, DATA_DIR,
OUT_DIR, TRAIN_SUBSET) and reads from its metrics.json the seconds of every epoch (one training
epoch plus the test-set evaluation) and the final test loss. Runs alternate baseline, candidate, baseline, ...,
one at a time. The floor: only the matrix products of one epoch (forward and backward over the training images in
batches of 128, a forward pass over the 10,000 test images), torch.mm on the candidate's trained weights.

Targets: the candidate no slower than the baseline (all epochs, best of the repeats: <= 1.00x); the candidate's
median epoch <= 2.0x the floor.
Run: python benchmarks/bench_train.py --baseline REV [--candidate REV] [--epochs 20] [--repeats 2]
[--train-subset 0] [--data-dir data]; the candidate is the working tree (uncommitted changes included) unless
given; a baseline from b7da75d on. `make bench BASELINE=b7da75d` does this. Run it alone: a second CPU job distorts it.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = "Variational_autoencoder.ipynb"
BATCH_SIZE = 128  # the walkthrough's default, for training and for the test-set evaluation


def checkout(rev, scratch):
    """(folder, label) of `rev` extracted with git archive into `scratch`; rev None is the working tree itself."""
    if rev is None:
        return REPO, "working tree"
    git = ["git", "-C", str(REPO)]
    label = subprocess.check_output([*git, "rev-parse", "--short", f"{rev}^{{commit}}"], text=True).strip()
    tree = Path(scratch) / label
    if not tree.exists():  # baseline and candidate may be the same revision
        tree.mkdir()
        archive = subprocess.Popen([*git, "archive", label], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True)
        if archive.wait():
            raise RuntimeError(f"git archive {label} failed")
    return tree, label


def run_notebook(tree, args, scratch):
    """Execute `tree`'s walkthrough once in a fresh OUT_DIR: (OUT_DIR, epoch seconds, total seconds, test loss)."""
    import papermill

    run_dir = Path(tempfile.mkdtemp(dir=scratch))
    out_dir = run_dir / "out"
    params = dict(EPOCHS=args.epochs, DATA_DIR=args.data_dir, OUT_DIR=str(out_dir), TRAIN_SUBSET=args.train_subset)
    notebook, output = str(tree / NOTEBOOK), str(run_dir / NOTEBOOK)
    kernel = dict(cwd=str(tree), kernel_name="python3", progress_bar=False)
    papermill.execute_notebook(notebook, output, parameters=params, **kernel)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    seconds = [epoch["seconds"] for epoch in metrics["history"]]
    return out_dir, seconds, metrics["train_seconds"], metrics["final_test_loss"]


def forward(w, x):
    """The 7 matrix products of the model's forward pass: every layer's output, the last one being the logits."""
    mm = torch.mm
    h1 = mm(x, w["enc1"].t())
    h2 = mm(h1, w["enc2"].t())
    mu, log_var = mm(h2, w["enc_mu"].t()), mm(h2, w["enc_log_var"].t())
    d1 = mm(mu, w["dec1"].t())
    d2 = mm(d1, w["dec2"].t())
    return h1, h2, mu, log_var, d1, d2, mm(d2, w["dec3"].t())


def matmul_floor(w, train_images, test_images):
    """Seconds for only the matrix products of one epoch: training pass forward and backward, test pass forward."""
    mm = torch.mm
    started = time.perf_counter()
    for x in train_images.split(BATCH_SIZE):
        h1, h2, mu, log_var, d1, d2, out = forward(w, x)
        g_d2 = mm(out, w["dec3"])  # backward: a weight gradient for each layer, an input gradient for all but one
        mm(out.t(), d2)
        g_d1 = mm(g_d2, w["dec2"])
        mm(g_d2.t(), d1)
        g_z = mm(g_d1, w["dec1"])
        mm(g_d1.t(), mu)
        g_h2 = mm(g_z, w["enc_mu"]) + mm(log_var, w["enc_log_var"])
        mm(g_z.t(), h2)
        mm(log_var.t(), h2)
        g_h1 = mm(g_h2, w["enc2"])
        mm(g_h2.t(), h1)
        mm(g_h1.t(), x)
    for x in test_images.split(BATCH_SIZE):
        forward(w, x)
    return time.perf_counter() - started


def floor_worker(tree, checkpoint, data_dir, train_subset):
    """In a fresh process, with the candidate's torch settings and trained weights: print the fastest of 3 floors."""
    sys.path.insert(0, str(tree))
    import vae_helpers as vh

    vh.configure_torch(fair_threads=False)  # the notebook's arithmetic (it sets MKL_CBWR: a process of its own)
    state = torch.load(checkpoint, weights_only=True)["model"]
    w = {name.removesuffix(".weight"): value for name, value in state.items() if name.endswith(".weight")}
    train, test, _ = vh.load_splits(data_dir, "mnist", torch.device("cpu"), allow_download=False)
    images = train.images[:train_subset] if train_subset else train.images
    print(json.dumps(min(matmul_floor(w, images, test.images) for _ in range(3))))


def main():
    """Run baseline and candidate in turn, then the floor; print the table and the targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", metavar="REV", help="git revision to compare against, e.g. HEAD or b7da75d")
    parser.add_argument("--candidate", metavar="REV", help="git revision to time (default: the working tree)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=0, help="train on the first N images; 0: all 60,000")
    parser.add_argument("--data-dir", default=str(REPO / "data"), help="holds MNIST/raw (default: data in the repo)")
    parser.add_argument("--floor", nargs=2, help=argparse.SUPPRESS)  # worker: TREE CHECKPOINT
    args = parser.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())
    if args.floor:
        return floor_worker(*args.floor, args.data_dir, args.train_subset)
    if not args.baseline:
        parser.error("--baseline REV is required")
    with tempfile.TemporaryDirectory(prefix="bench_train_") as scratch:
        sides = {"baseline": checkout(args.baseline, scratch), "candidate": checkout(args.candidate, scratch)}
        runs = {side: [] for side in sides}
        images = f"{args.epochs} epochs of {args.train_subset or 60000:,} training images, {args.repeats} repeats"
        print(f"{images}; torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
        for repeat in range(1, args.repeats + 1):
            for side, (tree, label) in sides.items():
                runs[side].append(run_notebook(tree, args, scratch))
                print(f"  {side} ({label}) repeat {repeat}: {runs[side][-1][2]:.1f} s", file=sys.stderr, flush=True)
        tree, checkpoint = sides["candidate"][0], runs["candidate"][-1][0] / "vae.pt"  # its last run's weights
        worker = [sys.executable, __file__, "--floor", tree, checkpoint, "--data-dir", args.data_dir]
        worker = [*map(str, worker), "--train-subset", str(args.train_subset)]
        floor = json.loads(subprocess.run(worker, check=True, stdout=subprocess.PIPE).stdout)
    print(f"\n{'':24s}repeat  all epochs  median epoch  test loss")
    best, median = {}, {}
    for side, (_, label) in sides.items():
        for repeat, (_, seconds, total, loss) in enumerate(runs[side], start=1):
            row = f"{side + ' (' + label + ')':24s}{repeat:6d}  {total:8.1f} s  {statistics.median(seconds):10.2f} s"
            print(f"{row}  {loss:9.3f}")
        best[side] = min(run[2] for run in runs[side])
        median[side] = min(statistics.median(run[1]) for run in runs[side])
    n = args.epochs
    print(f"\nbest of {args.repeats}: baseline {best['baseline']:.1f} s, candidate {best['candidate']:.1f} s")
    print(f"candidate / baseline, all {n} epochs: {best['candidate'] / best['baseline']:.2f}x (target <= 1.00x)")
    print(f"candidate / baseline, median epoch: {median['candidate'] / median['baseline']:.2f}x")
    for side, aim in (("baseline", ""), ("candidate", " (aim <= 2.0x)")):
        ratio = f"median epoch {median[side]:.2f} s / floor {floor:.2f} s = {median[side] / floor:.2f}x"
        print(f"{side} loop / floor: {ratio}{aim}")


if __name__ == "__main__":
    main()
