"""Write a train/test .npz from the 10,000 MNIST test images, for offline runs.

The machines this project is developed on cannot download MNIST, but have the
real test set in ../shared/data/mnist-t10k. This recipe splits it into the
first N images for training and the rest for testing, in Keras's .npz layout:

    python scripts/make_split.py ../shared/data/mnist-t10k /tmp/mnist-split.npz
    mnist-mlp train --config configs/cpu.yaml --set data.path=/tmp/mnist-split.npz
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from mnist_mlp.config import DataConfig
from mnist_mlp.data import load_dataset
from mnist_mlp.errors import MnistMlpError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="folder with t10k-images-idx3-ubyte[.gz] and labels")
    parser.add_argument("output", help="the .npz to write")
    parser.add_argument("--train", type=int, default=8000, help="images for training (8000)")
    args = parser.parse_args()
    try:
        test = load_dataset(DataConfig(path=args.source), splits=("test",))
    except MnistMlpError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not 0 < args.train < len(test.x_test):
        print(f"error: --train must be between 1 and {len(test.x_test) - 1}", file=sys.stderr)
        return 2
    x, y, n = test.x_test, test.y_test, args.train
    np.savez(args.output, x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:])
    print(f"wrote {args.output}: {n:,} train / {len(x) - n:,} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
