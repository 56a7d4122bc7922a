"""The training state of a run: everything needed to continue it exactly.

A `.keras` file holds the weights and the optimizer, but not the state of the
random generators Dropout draws its masks from (Keras recreates them on
load), so an exact resume needs more. The state is one `.npz`: every model
variable (weights and seed-generator states), every optimizer variable, how
far the run got (epochs, and batches into the next epoch) and, mid-epoch, the
running totals of the epoch's metrics. It is written to a temporary file and renamed,
so a crash or a full disk leaves the previous state in place.
"""

from __future__ import annotations

import contextlib
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mnist_mlp import files
from mnist_mlp.errors import CheckpointError
from mnist_mlp.runs import STATE_FILE

__all__ = ["STATE_FILE", "Progress", "load_state", "metric_totals", "save_state"]
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Progress:
    """Where a saved run stands: `batches_done` batches into epoch `epochs_done + 1`."""

    epochs_done: int
    batches_done: int = 0
    # Running totals of the epoch's loss and accuracy (path -> value), saved
    # mid-epoch so the resumed epoch still reports its average over all batches.
    metric_totals: dict[str, np.ndarray] = field(default_factory=dict)


def save_state(model, path: Path, progress: Progress) -> None:
    """Write every model and optimizer variable and the run's progress, atomically."""
    arrays = {
        "format_version": np.array(FORMAT_VERSION),
        "epochs_done": np.array(progress.epochs_done),
        "batches_done": np.array(progress.batches_done),
    }
    for prefix, variables in _groups(model).items():
        for i, variable in enumerate(variables):
            arrays[f"{prefix}/{i:04d}"] = np.asarray(variable.numpy())
        arrays[f"{prefix}/paths"] = np.array([v.path for v in variables])
    for i, value in enumerate(progress.metric_totals.values()):
        arrays[f"metrics/{i:04d}"] = np.asarray(value)
    arrays["metrics/paths"] = np.array(list(progress.metric_totals), dtype=str)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    files.atomic_write(path, write)


def metric_totals(model) -> dict[str, np.ndarray]:
    """The current values of the model's metric variables (loss and accuracy totals)."""
    return {variable_key(v): np.asarray(v.numpy()) for v in model.metrics_variables}


def variable_key(variable) -> str:
    """A variable's path without the counters Keras adds to names per process.

    Keras numbers unnamed objects in creation order (`seed_generator_3`,
    `adam_1`), so the same model built a second time in one process gets other
    paths; the saved state must still fit it.
    """
    return _without_counters(variable.path)


def _without_counters(path: str) -> str:
    return re.sub(r"_\d+(?=/|$)", "", path)


def read_progress(path: Path) -> Progress:
    """How far the saved run got (without its totals), before a model is built for it.

    Raises:
        CheckpointError: the file is missing or unreadable.
    """
    with _reading(path), np.load(path, allow_pickle=False) as state:
        return Progress(int(state["epochs_done"]), int(state["batches_done"]))


def load_state(model, path: Path) -> Progress:
    """Restore variables saved by save_state into `model`; return the saved progress.

    The model must be built and compiled from the same config (its optimizer
    variables are created here if training has not started).

    Raises:
        CheckpointError: the file is missing, unreadable, or from another model.
    """
    model.optimizer.build(model.trainable_variables)
    with _reading(path), np.load(path, allow_pickle=False) as state:
        if int(state["format_version"]) != FORMAT_VERSION:
            raise CheckpointError(f"{path}: training state of an unknown format")
        for prefix, variables in _groups(model).items():
            saved = [_without_counters(str(p)) for p in state[f"{prefix}/paths"]]
            if saved != [variable_key(v) for v in variables]:
                raise CheckpointError(
                    f"{path}: the saved {prefix} variables do not match this model; "
                    "was the config changed after the run started?"
                )
            for i, variable in enumerate(variables):
                value = state[f"{prefix}/{i:04d}"]
                if value.shape != tuple(variable.shape):
                    raise CheckpointError(
                        f"{path}: {variable.path} has shape {value.shape}, "
                        f"the model expects {tuple(variable.shape)}"
                    )
                variable.assign(value)
        names = [str(p) for p in state["metrics/paths"]]
        return Progress(
            epochs_done=int(state["epochs_done"]),
            batches_done=int(state["batches_done"]),
            metric_totals={
                _without_counters(n): state[f"metrics/{i:04d}"] for i, n in enumerate(names)
            },
        )


@contextlib.contextmanager
def _reading(path: Path):
    """Turn every way reading a state file can fail into one CheckpointError."""
    try:
        yield
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no training state; the run saved none") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise CheckpointError(f"{path}: unreadable training state ({err})") from None


def _groups(model) -> dict[str, list]:
    return {"model": list(model.variables), "optimizer": list(model.optimizer.variables)}
