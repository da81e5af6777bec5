"""Benchmark: the walkthrough's training loop epoch by epoch, with and without vh.configure_torch, side by side.

  plain       torch as it comes (no flushing of subnormal numbers, MKL_CBWR unset): the loop as it was before
  configured  vh.configure_torch(): subnormals flushed to zero, MKL_CBWR=AUTO,STRICT (the same bits at any
              thread count), deterministic algorithms; FairThreads is off here (bench_shared_cores.py times it)
  floor       only the matrix products of the same forward and backward passes, for the model as trained so far

Each setting trains a fresh model in its own process (MKL reads MKL_CBWR once, at its first call) and times
every epoch, then the floor after the first and the last. Targets: configured, every epoch within 10% of its
first; the loop <= 1.6x the floor at every epoch; all epochs together no slower than plain.
Run: python benchmarks/bench_train.py [--epochs 20]; reads MNIST from $VAE_DATA_DIR (default: data). Run it alone.
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


def matmul_floor(model, images, batch_size):
    """Seconds for only the matrix products of one epoch's forward and backward passes through `model`."""
    w = {name: layer.weight.detach() for name, layer in model.named_children()}  # (out, in) each
    mm = torch.mm
    started = time.perf_counter()
    for x in images.split(batch_size):
        h1 = mm(x, w["enc1"].t())  # forward: 7 products
        h2 = mm(h1, w["enc2"].t())
        mu, log_var = mm(h2, w["enc_mu"].t()), mm(h2, w["enc_log_var"].t())
        d1 = mm(mu, w["dec1"].t())
        d2 = mm(d1, w["dec2"].t())
        out = mm(d2, w["dec3"].t())
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
    return time.perf_counter() - started


def worker(setting, epochs, data_dir):
    """Train the walkthrough's model at its defaults; print JSON: seconds per epoch, floors, final test loss."""
    if setting == "configured":
        vh.configure_torch(fair_threads=False)
    nb = vh.load_notebook_definitions(REPO / "Variational_autoencoder.ipynb")
    train, test, _ = vh.load_dataset(data_dir, "mnist", torch.device("cpu"), allow_download=False)
    torch.manual_seed(1234)
    model = nb["VAE"]()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seconds, floors = [], {}
    for epoch in range(1, epochs + 1):
        if epoch in (1, epochs):
            floors[epoch] = matmul_floor(model, train.images, 128)
        started = time.perf_counter()
        nb["train_one_epoch"](model, optimizer, train.images, 128)
        seconds.append(time.perf_counter() - started)
        print(f"  {setting:10s} epoch {epoch:2d}: {seconds[-1]:5.2f} s", file=sys.stderr, flush=True)
    recon, kl = nb["evaluate"](model, test.images, 128)
    print(json.dumps({"seconds": seconds, "floors": floors, "test_loss": recon + kl}))


def main():
    """Run each setting in its own process, then print the table and the targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--data-dir", default=os.environ.get("VAE_DATA_DIR", str(REPO / "data")))
    parser.add_argument("--worker", choices=("plain", "configured"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.epochs, args.data_dir)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {vh.cpu_name()}, 60,000 images an epoch")
    runs = {}
    for setting in ("plain", "configured"):
        env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
        out = subprocess.run([sys.executable, __file__, "--worker", setting, "--epochs", str(args.epochs),
                              "--data-dir", args.data_dir], env=env, check=True, capture_output=True, text=True)
        runs[setting] = json.loads(out.stdout)
    n = args.epochs
    print(f"\nseconds per epoch (x its first epoch); the floor: matrix products alone, after epoch 1 and epoch {n}")
    for setting, run in runs.items():
        s, floor = run["seconds"], {int(k): v for k, v in run["floors"].items()}
        later = statistics.median(s[n // 2:])
        print(f"{setting:10s} epoch 1 {s[0]:5.2f} s | epochs {n // 2 + 1}-{n} median {later:5.2f} s "
              f"({later / s[0]:.2f}x) | slowest {max(s):5.2f} s ({max(s) / s[0]:.2f}x) | all {sum(s):6.1f} s | "
              f"loop / floor {s[0] / floor[1]:.2f}x at epoch 1, {s[-1] / floor[n]:.2f}x at epoch {n} | "
              f"test loss {run['test_loss']:.3f}")
    plain, configured = runs["plain"]["seconds"], runs["configured"]["seconds"]
    worst = max(configured) / configured[0]
    verdict = "met" if worst <= 1.1 else "NOT met"
    print(f"\nconfigured: slowest epoch / first = {worst:.2f}x (target <= 1.10x: {verdict})")
    print(f"configured / plain, all {n} epochs = {sum(configured) / sum(plain):.2f}x (target <= 1.0x, within noise)")
    floor_end = runs["configured"]["floors"][str(n)]
    print(f"configured loop / floor at epoch {n} = {configured[-1] / floor_end:.2f}x (target <= 1.6x)")


if __name__ == "__main__":
    main()
