"""The command line behind `make data` and `make reproduce`.

    python tools/make_commands.py fetch DATA_DIR DATASET          find (or download, or unpack) and verify a data set
    python tools/make_commands.py check-run OUT_DIR MAX_TEST_LOSS  fail unless OUT_DIR holds a finished, evaluated run
"""

import gzip
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vae_helpers as vh  # noqa: E402

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist: the files, gzipped


def unpack_fashion(data_dir, debian_dir=DEBIAN_FASHION):
    """Unzip Debian's Fashion-MNIST files into DATA_DIR/FashionMNIST/raw (torchvision's layout), if missing."""
    raw = Path(data_dir) / "FashionMNIST" / "raw"
    for name in vh.missing_files(data_dir, "fashion"):
        source = Path(debian_dir) / f"{name}.gz"
        if not source.is_file():
            raise vh.DataError(f"Fashion-MNIST is not in {raw}, and {source} does not exist. Install Debian's package "
                            "(apt-get install dataset-fashion-mnist), or copy the four files into that folder.")
        raw.mkdir(parents=True, exist_ok=True)
        with gzip.open(source) as handle:  # a partial file fails the SHA-256 check when loaded
            (raw / name).write_bytes(handle.read())
    return raw


def check_run(out_dir, max_test_loss):
    """SystemExit with the reason unless `out_dir` holds a finished, evaluated run within the test-loss bound."""
    out = Path(out_dir)
    try:
        metrics, evaluation = vh.read_run(out)
        iw = evaluation["importance_weighted"]
        loss, nll, k = metrics["final_test_loss"], iw["nll"], iw["K"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"FAILED: {out} lacks a finished, evaluated run ({type(err).__name__}: {err})") from None
    if not (out / "samples.png").is_file():
        raise SystemExit(f"FAILED: {out} lacks samples.png")
    if not loss <= max_test_loss:
        raise SystemExit(f"FAILED: final test loss {loss:.3f} is above the bound {max_test_loss}")
    print(f"OK: final test loss {loss:.3f} <= {max_test_loss}; importance-weighted bound -L_K {nll:.3f} (K = {k:,}); "
          f"samples.png, metrics.json and evaluation.json in {out}")
    return metrics


def main(argv):
    """Usage: make_commands.py fetch DATA_DIR DATASET | check-run OUT_DIR MAX_TEST_LOSS"""
    if len(argv) == 3 and argv[0] == "fetch":
        if argv[2] == "fashion" and vh.missing_files(argv[1], "fashion") and DEBIAN_FASHION.is_dir():
            unpack_fashion(argv[1])
        train, test, _ = vh.load_splits(argv[1], argv[2], torch.device("cpu"))
        print(f"{argv[2]} in {argv[1]}: {len(train.images):,} + {len(test.images):,} images, checksums verified")
    elif len(argv) == 3 and argv[0] == "check-run":
        check_run(argv[1], float(argv[2]))
    else:
        raise SystemExit(main.__doc__)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (vh.DataError, vh.ConfigError) as err:
        raise SystemExit(f"error: {err}") from None
