"""The PNG figures a run and an evaluation leave: curves, confusion matrix, mistakes.

matplotlib is imported here only, lazily, and used through `Figure` objects
rather than pyplot: no global figure state and no GUI backend, so plotting
works the same in a terminal, over SSH and in CI (pyplot would pick a backend
from the environment). Every figure is written atomically, like the run's
other files.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mnist_mlp import files

DPI = 100
CURVES_SIZE = (10.0, 4.0)  # inches: 1000 x 400 pixels at DPI
CONFUSION_SIZE = (7.0, 6.0)  # 700 x 600
MISTAKES_COLUMNS = 5
MISTAKE_TILE = 1.6  # inches per image in mistakes.png

TRAIN_COLOR = "#1f77b4"  # matplotlib's C0 blue
VALIDATION_COLOR = "#ff7f0e"  # C1 orange


def _figure(size: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=size, dpi=DPI, layout="constrained")


def _save(figure, path: Path) -> None:
    # Rendered to memory first: a failing render leaves no file at all.
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    files.atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def save_curves(rows: Sequence[dict], path: Path, validation: str = "validation") -> None:
    """Loss and accuracy per epoch, training against validation, side by side.

    Args:
        rows: history rows (epoch, loss, accuracy, val_loss, val_accuracy).
        path: the PNG to write (1000 x 400 pixels).
        validation: what the validation data is, for the legend (e.g. "test set").
    """
    figure = _figure(CURVES_SIZE)
    epochs = [row["epoch"] for row in rows]
    # A one-epoch run still shows its point.
    marker = "o" if len(rows) <= 30 else None
    for axes, metric, title in zip(
        figure.subplots(1, 2), ("loss", "accuracy"), ("Loss", "Accuracy"), strict=True
    ):
        axes.plot(epochs, [r[metric] for r in rows], color=TRAIN_COLOR, marker=marker,
                  label="training (running average)")
        axes.plot(epochs, [r[f"val_{metric}"] for r in rows], color=VALIDATION_COLOR,
                  marker=marker, label=f"validation ({validation})")
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        axes.legend()
        # Whole epochs only on the x axis.
        axes.xaxis.get_major_locator().set_params(integer=True)
    _save(figure, path)


def save_confusion_matrix(matrix: Sequence[Sequence[int]], path: Path, title: str = "") -> None:
    """The confusion matrix as a heat map with every count written in its cell.

    Rows are the true labels, columns the predictions; the colour is the share of
    the row, so classes with fewer images are not paler.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    figure = _figure(CONFUSION_SIZE)
    axes = figure.subplots()
    image = axes.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, label="share of the true class")
    classes = range(len(counts))
    axes.set_xticks(classes)
    axes.set_yticks(classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title or f"confusion matrix ({counts.sum():,} images)")
    for t in classes:
        for p in classes:
            if counts[t, p]:
                axes.text(p, t, f"{counts[t, p]}", ha="center", va="center", fontsize=7,
                          color="white" if share[t, p] > 0.5 else "black")
    _save(figure, path)


def mistakes_size(count: int) -> tuple[int, int]:
    """Width and height in pixels of mistakes.png for `count` images."""
    columns = min(max(count, 1), MISTAKES_COLUMNS)
    grid_rows = max(1, -(-count // MISTAKES_COLUMNS))
    return round(columns * MISTAKE_TILE * DPI), round(grid_rows * MISTAKE_TILE * DPI)


def save_mistakes(images: np.ndarray, mistakes: Sequence, path: Path) -> None:
    """A grid of wrongly classified images titled `true -> predicted (probability)`.

    Args:
        images: the split's raw images (N, 28, 28) uint8.
        mistakes: evaluate.Mistake entries (index, label, predicted, probability).
        path: the PNG to write; mistakes_size(len(mistakes)) pixels.
    """
    columns = min(max(len(mistakes), 1), MISTAKES_COLUMNS)
    grid_rows = max(1, -(-len(mistakes) // MISTAKES_COLUMNS))
    # No constrained layout: the tiles are placed exactly, so the size is exact.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(columns * MISTAKE_TILE, grid_rows * MISTAKE_TILE), dpi=DPI)
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.9, hspace=0.35)
    grid = np.atleast_1d(figure.subplots(grid_rows, columns, squeeze=False).ravel())
    for axes in grid:
        axes.set_axis_off()
    figure.suptitle("most confident mistakes: #index: true -> predicted (probability)",
                     fontsize=8)
    if not mistakes:
        grid[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    for axes, mistake in zip(grid, mistakes, strict=False):
        axes.imshow(images[mistake.index], cmap="gray_r", vmin=0, vmax=255)
        axes.set_title(
            f"#{mistake.index}: {mistake.label} -> {mistake.predicted} "
            f"({mistake.probability:.2f})",
            fontsize=8,
        )
    _save(figure, path)
