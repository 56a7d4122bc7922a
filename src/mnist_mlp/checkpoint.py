"""The training state of a run: everything needed to continue it exactly.

A `.keras` file holds the weights and the optimizer, but not the state of the
random generators Dropout draws its masks from (Keras recreates them on
load), so an exact resume needs more. The state is one `.npz`: every model
variable (weights and seed-generator states), every optimizer variable, and
the number of completed epochs. It is written to a temporary file and renamed,
so a crash or a full disk leaves the previous state in place.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from mnist_mlp import files
from mnist_mlp.errors import CheckpointError
from mnist_mlp.runs import STATE_FILE

__all__ = ["STATE_FILE", "load_state", "save_state"]
FORMAT_VERSION = 1


def save_state(model, path: Path, epochs_done: int) -> None:
    """Write the model's and optimizer's variables and the completed epoch count."""
    arrays = {"format_version": np.array(FORMAT_VERSION), "epochs_done": np.array(epochs_done)}
    for prefix, variables in _groups(model).items():
        for i, variable in enumerate(variables):
            arrays[f"{prefix}/{i:04d}"] = np.asarray(variable.numpy())
        arrays[f"{prefix}/paths"] = np.array([v.path for v in variables])

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    files.atomic_write(path, write)


def load_state(model, path: Path) -> int:
    """Restore variables saved by save_state into `model`; return the completed epochs.

    The model must be built and compiled from the same config (its optimizer
    variables are created here if training has not started).

    Raises:
        CheckpointError: the file is missing, unreadable, or from another model.
    """
    model.optimizer.build(model.trainable_variables)
    try:
        with np.load(path, allow_pickle=False) as state:
            if int(state["format_version"]) != FORMAT_VERSION:
                raise CheckpointError(f"{path}: training state of an unknown format")
            for prefix, variables in _groups(model).items():
                saved = [str(p) for p in state[f"{prefix}/paths"]]
                if saved != [v.path for v in variables]:
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
            return int(state["epochs_done"])
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no training state; the run saved none") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise CheckpointError(f"{path}: unreadable training state ({err})") from None


def _groups(model) -> dict[str, list]:
    return {"model": list(model.variables), "optimizer": list(model.optimizer.variables)}
