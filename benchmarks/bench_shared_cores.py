"""Benchmark: one epoch of the walkthrough's training loop alone and with a second job on the same cores, with
torch's default threads and with vh.FairThreads (what vh.configure_torch starts), side by side in one run.

PyTorch's OpenMP threads spin while they wait for each other. With a second busy job on the cores, a spinning
thread takes turns from the one it waits for. FairThreads lowers the thread count while other processes keep
cores busy; with MKL_CBWR that configure_torch sets, that changes no bit (tests/test_training_state.py).

Targets on a 2-core CPU: FairThreads alone within noise of the default alone; with a second job, within 1.3x of a
fair share of the cores (twice the default's time alone).
Run: python benchmarks/bench_shared_cores.py [--images 30000] [--epochs 3] [--data-dir data]; never downloads.
Run it on an otherwise idle machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import vae_helpers as vh  # noqa: E402

POLICIES = ("default", "fair")  # torch's default threads, or vh.FairThreads adjusting them
NEIGHBOURS = {
    "a second training job": "training",  # the same loop with the same policy: two notebooks at once
    "a busy 1-thread job": "spin",  # a build, a video call: one core kept busy
}


def worker(policy, images, epochs, data_dir, forever):
    """Train on the first `images` MNIST images; print each epoch's seconds (or loop until killed)."""
    nb = vh.load_notebook_definitions(REPO / "Variational_autoencoder.ipynb")
    train, _, _ = vh.load_splits(data_dir, "mnist", torch.device("cpu"), allow_download=False)
    data = train.images[:images]
    torch.manual_seed(0)
    model = nb["VAE"]()
    cells = json.loads((REPO / "Variational_autoencoder.ipynb").read_text())["cells"]
    optimizer_cell = next("".join(c["source"]) for c in cells if "torch.optim." in "".join(c["source"]))
    exec(optimizer_cell, namespace := {"torch": torch, "model": model, "LEARNING_RATE": 1e-3})  # as the walkthrough
    optimizer = namespace["optimizer"]
    vh.configure_torch(fair_threads=policy == "fair")
    epoch = 0
    while forever or epoch < epochs:
        epoch += 1
        started = time.perf_counter()
        nb["train_one_epoch"](model, optimizer, data, 128)
        print(f"{time.perf_counter() - started:.3f}", flush=True)


def spin():
    """Keep one core busy until killed."""
    while True:
        pass


def measure(policy, neighbour, args):
    """Median seconds per epoch of a fresh worker (its first epoch left out), with `neighbour` running or None."""
    command = [sys.executable, __file__, "--data-dir", args.data_dir, "--images", str(args.images)]
    other = None
    if neighbour == "training":
        other = subprocess.Popen([*command, "--worker", policy, "--forever"], stdout=subprocess.DEVNULL)
    elif neighbour == "spin":
        other = subprocess.Popen([*command, "--spin"])
    try:
        if other is not None:
            time.sleep(4)  # let it load the data and start training
        out = subprocess.run([*command, "--worker", policy, "--epochs", str(args.epochs + 1)], check=True,
                             capture_output=True, text=True).stdout
    finally:
        if other is not None:
            other.kill()
            other.wait()
    return statistics.median(float(line) for line in out.split()[1:])


def main():
    """Time every policy quiet and beside each neighbour, then print the table and the targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=30000, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed per measurement (median reported)")
    parser.add_argument("--data-dir", default=str(REPO / "data"))
    parser.add_argument("--worker", choices=POLICIES, help=argparse.SUPPRESS)
    parser.add_argument("--forever", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--spin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.spin:
        return spin()
    if args.worker:
        return worker(args.worker, args.images, args.epochs, args.data_dir, args.forever)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{args.images:,} images an epoch; median of {args.epochs} epochs per cell\n")
    seconds = {}
    for policy in POLICIES:
        for label, neighbour in {"alone": None, **NEIGHBOURS}.items():
            seconds[policy, label] = measure(policy, neighbour, args)
            print(f"  {policy:8s} {label:22s} {seconds[policy, label]:6.2f} s", flush=True)
    quiet = seconds["default", "alone"]
    print(f"\nseconds per epoch (x the default alone; a fair share of 2 cores is 2x = {2 * quiet:.2f} s)")
    print(f"{'':10s}" + "".join(f"{label:>26s}" for label in ("alone", *NEIGHBOURS)))
    for policy in POLICIES:
        cells = [f"{seconds[policy, label]:7.2f} s ({seconds[policy, label] / quiet:4.2f}x)" for label in
                 ("alone", *NEIGHBOURS)]
        print(f"{policy:10s}" + "".join(f"{cell:>26s}" for cell in cells))
    alone = seconds["fair", "alone"] / quiet
    worst = max(seconds["fair", label] for label in NEIGHBOURS) / (2 * quiet)
    print(f"\nFairThreads alone / default alone = {alone:.2f}x  (target: within noise, about 1.0x)")
    print(f"FairThreads beside either busy job / fair share = {worst:.2f}x at worst  "
          f"(target <= 1.3x: {'met' if worst <= 1.3 else 'NOT met'})")


if __name__ == "__main__":
    main()
