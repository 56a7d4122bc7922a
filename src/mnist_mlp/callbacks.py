"""Keras callbacks the library does not have. Imports Keras: load it lazily."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import keras

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds")


class EpochLog(keras.callbacks.Callback):
    """Times each epoch and appends one row per epoch to history.csv.

    Keras's CSVLogger would do the writing but sorts its columns alphabetically,
    numbers epochs from 0 and has no timing; history.csv is a documented format
    with the columns of HISTORY_COLUMNS and epochs numbered as the progress bar
    shows them (from 1). The `seconds` value is also put into the epoch's logs,
    so Keras's History and later callbacks see it.
    """

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.rows: list[dict] = []
        self._started = 0.0

    def on_train_begin(self, logs=None):
        with open(self.path, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerow(HISTORY_COLUMNS)

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        logs["seconds"] = time.perf_counter() - self._started
        row = {"epoch": epoch + 1}
        row.update({k: float(logs.get(k, math.nan)) for k in HISTORY_COLUMNS[1:]})
        self.rows.append(row)
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerow([row[k] for k in HISTORY_COLUMNS])
