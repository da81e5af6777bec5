"""Benchmark: one epoch of training, timed three ways side by side, with the ratios between them.

  notebook    the notebook's own train_one_epoch: MNIST held as one tensor, shuffled batches by index
  dataloader  the same model, loss and optimizer fed by DataLoader(MNIST(transform=ToTensor()), 128, shuffle)
  floor       only the matrix products of the same forward and backward passes (nothing else can be cheaper)

Targets on a 2-core CPU: notebook >= 1.5x faster than dataloader, and within 1.3x of the floor.
Run: python benchmarks/bench_train.py [--repeats 3]; reads MNIST from $VAE_DATA_DIR (default: data), never downloads.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import vae_helpers as vh  # noqa: E402


def time_notebook_epoch(nb, images, batch_size, seed):
    """Seconds for one epoch of the notebook's train_one_epoch on a fresh model."""
    torch.manual_seed(seed)
    model = nb["VAE"]()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    generators = {"shuffle": torch.Generator().manual_seed(seed), "noise": torch.Generator().manual_seed(seed + 1)}
    started = time.perf_counter()
    nb["train_one_epoch"](model, optimizer, images, batch_size, generators)
    return time.perf_counter() - started


def time_dataloader_epoch(nb, data_dir, batch_size, seed):
    """Seconds for one epoch of the usual DataLoader(ToTensor) pipeline, same model, loss and optimizer."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    model = nb["VAE"]()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    loader = DataLoader(
        datasets.MNIST(data_dir, train=True, download=False, transform=transforms.ToTensor()),
        batch_size=batch_size,
        shuffle=True,
    )
    started = time.perf_counter()
    model.train()
    train_loss = 0.0
    for x, _ in loader:
        x = x.view(-1, 784)
        recon_logits, mu, log_var = model(x)
        loss = nb["vae_loss"](recon_logits, x, mu, log_var)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        train_loss += loss.item()
    return time.perf_counter() - started


def time_matmul_floor(nb, images, batch_size, seed):
    """Seconds for only the matrix products of one epoch's forward and backward passes."""
    torch.manual_seed(seed)
    model = nb["VAE"]()
    w = {name: layer.weight.detach() for name, layer in model.named_children()}  # (out, in) each
    mm = torch.mm
    started = time.perf_counter()
    for x in vh.ordered_batches(images, batch_size):
        # forward: 7 products
        h1 = mm(x, w["enc1"].t())
        h2 = mm(h1, w["enc2"].t())
        mu, log_var = mm(h2, w["enc_mu"].t()), mm(h2, w["enc_log_var"].t())
        d1 = mm(mu, w["dec1"].t())
        d2 = mm(d1, w["dec2"].t())
        out = mm(d2, w["dec3"].t())
        # backward: a weight gradient for each layer, an input gradient for all but the first
        g_d2 = mm(out, w["dec3"])
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


def main():
    """Time each way `--repeats` times, interleaved, and print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per way (median reported)")
    parser.add_argument("--data-dir", default=os.environ.get("VAE_DATA_DIR", str(REPO / "data")))
    args = parser.parse_args()

    nb = vh.load_notebook_definitions(REPO / "Variational_autoencoder.ipynb")
    train, _, _ = vh.load_dataset(args.data_dir, "mnist", torch.device("cpu"), allow_download=False)
    batch_size = 128
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {len(train.images):,} images, batch {batch_size}")

    ways = {
        "notebook": lambda seed: time_notebook_epoch(nb, train.images, batch_size, seed),
        "dataloader": lambda seed: time_dataloader_epoch(nb, args.data_dir, batch_size, seed),
        "floor": lambda seed: time_matmul_floor(nb, train.images, batch_size, seed),
    }
    seconds = {name: [] for name in ways}
    for repeat in range(args.repeats):
        for name, run in ways.items():
            seconds[name].append(run(seed=repeat))
            print(f"  repeat {repeat + 1}: {name:10s} {seconds[name][-1]:6.2f} s", flush=True)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print("\nmedian seconds per epoch: " + ", ".join(f"{name} {value:.2f}" for name, value in median.items()))
    speedup = median["dataloader"] / median["notebook"]
    overhead = median["notebook"] / median["floor"]
    print(f"dataloader / notebook = {speedup:.2f}x  (target >= 1.5x: {'met' if speedup >= 1.5 else 'NOT met'})")
    print(f"notebook / floor      = {overhead:.2f}x  (target <= 1.3x: {'met' if overhead <= 1.3 else 'NOT met'})")


if __name__ == "__main__":
    main()
