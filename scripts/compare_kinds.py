"""Train every model kind on the same data and print the README's table of them.

Each kind runs through the installed `mnist-mlp train` with its shipped config
(configs/<kind>.yaml), so the figures are what a user gets:

    python scripts/compare_kinds.py --data /usr/share/datasets/fashion-mnist --out /tmp/kinds

The pretrained row trains from random weights (`weights: none`: ImageNet
cannot be downloaded everywhere) for a short run, and is labelled so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (label, config, overrides): the README's table, in its order.
KINDS = [
    ("mlp (the tutorial's network)", "cpu.yaml", ["train.epochs=10"]),
    ("cnn", "cnn.yaml", ["train.epochs=10"]),
    ("rnn (LSTM 128)", "rnn.yaml", ["train.epochs=5"]),
    (
        "pretrained mobilenet_v2, `weights: none` (random, not ImageNet), a short run: 1 epoch "
        "of the head, then 2 of the whole backbone at 1e-3, BatchNormalization momentum 0.99",
        "pretrained.yaml",
        [
            "model.weights=none",
            "train.epochs=1",
            "model.fine_tune.epochs=2",
            "model.fine_tune.learning_rate=1e-3",
            "model.fine_tune.batch_norm_momentum=0.99",
        ],
    ),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="data.path: an IDX folder or .npz")
    parser.add_argument("--out", type=Path, required=True, help="folder for the run folders")
    parser.add_argument(
        "--only", action="append", help="run only kinds whose label starts with this"
    )
    args = parser.parse_args(argv)
    executable = Path(sys.executable).with_name("mnist-mlp")
    rows = []
    for label, config, overrides in KINDS:
        if args.only and not any(label.startswith(o) for o in args.only):
            continue
        run_dir = args.out / config.removesuffix(".yaml")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        command = [str(executable), "train", "--config", str(ROOT / "configs" / config)]
        for override in [f"data.path={args.data}", "device=cpu", *overrides]:
            command += ["--set", override]
        command += ["--run-dir", str(run_dir), "--quiet"]
        print("$", " ".join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            return 1
        metrics = json.loads((run_dir / "metrics.json").read_text())
        seconds = metrics["seconds"]["per_epoch"]
        rows.append(
            f"| {label} | {metrics['model']['parameters']:,} | {metrics['epochs']} | "
            f"{metrics['final']['test']['accuracy']:.4f} | "
            f"{metrics['final']['train']['accuracy']:.4f} | "
            f"{metrics['seconds']['mean_per_epoch']:.1f} "
            f"(median {statistics.median(seconds):.1f}) |"
        )
    print("| model | parameters | epochs | test accuracy | train accuracy | s/epoch (mean) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
