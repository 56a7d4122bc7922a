"""Keras callbacks the library does not have. Imports Keras: load it lazily."""

from __future__ import annotations

import csv
import io
import math
import os
import time
from pathlib import Path

import keras
import numpy as np

from mnist_mlp import checkpoint, files, signals
from mnist_mlp.errors import CheckpointError

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds")


class EpochFeed(keras.callbacks.Callback):
    """Tells the training data (data.TrainingBatches) which epoch begins.

    First in the callback list: fit opens the epoch's pass over the data only
    after the epoch-begin callbacks have run.
    """

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.epoch = epoch


class EpochLog(keras.callbacks.Callback):
    """Times each epoch and appends one row per epoch to history.csv.

    Keras's CSVLogger would do the writing but sorts its columns alphabetically,
    numbers epochs from 0 and has no timing; history.csv is a documented format
    with the columns of HISTORY_COLUMNS and epochs numbered as the progress bar
    shows them (from 1). The `seconds` value is also put into the epoch's logs,
    so Keras's History and later callbacks see it.
    """

    def __init__(self, path: Path, rows: list[dict] | None = None):
        """Args: path: history.csv; rows: the rows of earlier epochs, when resuming."""
        super().__init__()
        self.path = path
        self.rows: list[dict] = list(rows or [])
        self._started = 0.0

    def on_train_begin(self, logs=None):
        # Rewritten from `rows`: a resumed run drops any row written after its
        # last saved state (the process may have died between the two).
        files.write_text(self.path, _csv_text(self.rows))

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
            # On disk before the state that follows it, even across a power loss.
            handle.flush()
            os.fsync(handle.fileno())


class EpochSummary(keras.callbacks.Callback):
    """One line per epoch through `report`: history.csv's numbers, readable.

    Runs after EpochLog, which puts the epoch's `seconds` into the logs, and
    after the progress bar, so in a terminal the line follows the finished bar.
    """

    def __init__(self, report, epochs: int):
        """Args: report: receives each line; epochs: the run's train.epochs, for `3/10`."""
        super().__init__()
        self.report = report
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        self.report(epoch_line(epoch + 1, self.epochs, logs or {}))


def epoch_line(epoch: int, epochs: int, logs: dict) -> str:
    """`epoch  3/10  loss 0.2345  accuracy 0.9123  val_loss ...  5.2 s`; no control characters."""
    numbers = "  ".join(
        f"{name} {float(logs[name]):.4f}" for name in HISTORY_COLUMNS[1:-1] if name in logs
    )
    seconds = f"  {float(logs['seconds']):.1f} s" if "seconds" in logs else ""
    return f"epoch {epoch:>{len(str(epochs))}}/{epochs}  {numbers}{seconds}"


def read_history(path: Path) -> list[dict]:
    """The rows of a history.csv written by EpochLog, as floats (epoch as int)."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                try:
                    rows.append(
                        {
                            k: (int(row[k]) if k == "epoch" else float(row[k]))
                            for k in HISTORY_COLUMNS
                        }
                    )
                except (TypeError, ValueError, KeyError):
                    # A row cut short by a crash mid-write; it is past the saved state.
                    break
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise CheckpointError(f"{path}: unreadable history ({err})") from None
    return rows


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HISTORY_COLUMNS)
    writer.writerows([row[k] for k in HISTORY_COLUMNS] for row in rows)
    return buffer.getvalue()


def monitor_mode(monitor: str) -> str:
    """Keras's "auto" rule: accuracies are maximised, losses minimised."""
    return "max" if "acc" in monitor else "min"


class NanGuard(keras.callbacks.Callback):
    """Stops training at the first non-finite loss and keeps the saves from using it.

    This is Keras's TerminateOnNaN plus what it lacks: TerminateOnNaN prints
    batches counted from 0 (and from the resume point after a resume) and
    `on_epoch_end` still runs for the broken epoch. Here the epoch and batches
    are kept for the error message, and the saving callbacks ask `tripped`
    first, so the last good state and best.keras survive.

    With `steps_per_execution` > 1 Keras reports only every that many batches,
    so a loss is known to have broken somewhere in a range of batches.
    """

    def __init__(self, steps_per_epoch: int, offset: int = 0):
        """Args: steps_per_epoch: batches per epoch; offset: batches already done
        in the first epoch (a mid-epoch resume)."""
        super().__init__()
        self.where: tuple[int, int | None, int | None] | None = None
        self.steps_per_epoch = steps_per_epoch
        self.offset = offset
        self._epoch = 0
        self._done = offset

    @property
    def tripped(self) -> bool:
        return self.where is not None

    def describe(self) -> str:
        """Where it tripped: "epoch 2, batch 5", "epoch 2, batches 1-32" or "epoch 2"."""
        epoch, first, last = self.where
        if first is None:
            return f"epoch {epoch}"
        if first == last:
            return f"epoch {epoch}, batch {last}"
        return f"epoch {epoch}, batches {first}-{last}"

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._done = self.offset

    def on_train_batch_end(self, batch, logs=None):
        # `batch` is the last step Keras ran, counted from 0 in this fit call;
        # past the epoch's end when the last group of steps is partial.
        done = min(self.offset + batch + 1, self.steps_per_epoch)
        loss = (logs or {}).get("loss")
        if self.where is None and loss is not None and not np.isfinite(loss):
            self.trip(self._epoch + 1, self._done + 1, done)
        self._done = done

    def on_epoch_end(self, epoch, logs=None):
        self.offset = 0
        # The last batch's update can break the weights after its loss was
        # logged; validation then shows it.
        values = [v for k, v in (logs or {}).items() if k in ("loss", "val_loss")]
        if self.where is None and not all(np.isfinite(v) for v in values):
            self.trip(epoch + 1, None, None)

    def trip(self, epoch: int, first: int | None, last: int | None) -> None:
        self.where = (epoch, first, last)
        self.model.stop_training = True


class BestModel(keras.callbacks.Callback):
    """Keeps best.keras: the model of the epoch with the best `monitor` value.

    Keras's ModelCheckpoint(save_best_only=True) writes over the previous file
    in place; a crash mid-write would lose the best model, so this one writes
    to a temporary file and renames it. `best` carries the value over a resume.
    """

    def __init__(
        self,
        path: Path,
        monitor: str,
        guard: NanGuard,
        best: float | None = None,
        min_delta: float = 0.0,
    ):
        """`min_delta` as in EarlyStopping, so both agree on which epoch is best."""
        super().__init__()
        self.path, self.monitor, self.guard, self.best = path, monitor, guard, best
        # Keras's MonitorCallback rule: improve by more than min_delta.
        self.delta = abs(min_delta) if monitor_mode(monitor) == "max" else -abs(min_delta)
        self.better = np.greater if monitor_mode(monitor) == "max" else np.less

    def on_epoch_end(self, epoch, logs=None):
        current = (logs or {}).get(self.monitor)
        if self.guard.tripped or current is None or not np.isfinite(current):
            return
        if self.best is None or self.better(current - self.delta, self.best):
            self.best = float(current)
            files.save_model(self.model, self.path)


class TrainingState(keras.callbacks.Callback):
    """Saves the full training state (see checkpoint.py), and stops on Ctrl-C/SIGTERM.

    Saves at every epoch end, every `every_batches` batches, and at the batch
    where a stop was requested (signals.py), then stops there; a resumed run
    continues from that very batch. It comes last in the callback list, so at
    an epoch end the history row and best.keras are written before the state.

    When resuming mid-epoch, `resumed` is the saved progress: the first epoch's
    batches are numbered from its `batches_done`, and its metric totals are
    added back before the first step, or after it for the metric variables
    Keras builds only then.
    """

    def __init__(
        self,
        path: Path,
        guard: NanGuard,
        steps_per_epoch: int,
        every_batches: int | None = None,
        resumed: checkpoint.Progress | None = None,
    ):
        super().__init__()
        self.path, self.guard, self.every_batches = path, guard, every_batches
        self.steps_per_epoch = steps_per_epoch
        self.offset = resumed.batches_done if resumed else 0
        self._pending_totals = dict(resumed.metric_totals) if resumed else {}
        self.saved = resumed or checkpoint.Progress(0)
        self.seconds: list[float] = []
        self._epoch = 0
        self._done = self.offset

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._done = self.offset

    def on_train_batch_begin(self, batch, logs=None):
        # Before the first step, so the loss total continues from the saved sum
        # in the uninterrupted run's order: float additions do not commute
        # bit for bit, and a group of steps would otherwise come first.
        self._add_pending_totals()

    def on_train_batch_end(self, batch, logs=None):
        # The ones Keras builds during the first step (under TensorFlow, the
        # accuracy's): sums of whole numbers, exact in any order.
        self._add_pending_totals()
        # `batch` is the last step Keras ran (see NanGuard.on_train_batch_end).
        done, before = self.offset + batch + 1, self._done
        self._done = done
        if done >= self.steps_per_epoch:
            return  # the epoch-end save (and stop) follows at once
        stop = signals.requested()
        # Keras reports every steps_per_execution batches: save at the first
        # report at or past each multiple of every_batches.
        due = self.every_batches is not None and (
            done // self.every_batches > before // self.every_batches
        )
        if (stop or due) and not self.guard.tripped:
            totals = checkpoint.metric_totals(self.model)
            self._save(checkpoint.Progress(self._epoch, done, totals))
        if stop:
            signals.check()

    def on_epoch_end(self, epoch, logs=None):
        self.offset = 0
        if not self.guard.tripped:
            started = time.perf_counter()
            self._save(checkpoint.Progress(epoch + 1))
            self.seconds.append(time.perf_counter() - started)
        signals.check()

    def _add_pending_totals(self) -> None:
        if not self._pending_totals:
            return
        for variable in self.model.metrics_variables:
            key = checkpoint.variable_key(variable)
            if key in self._pending_totals:
                variable.assign_add(self._pending_totals.pop(key))

    def _save(self, progress: checkpoint.Progress) -> None:
        if not all(np.isfinite(v.numpy()).all() for v in self.model.trainable_variables):
            # The last update went to NaN/inf after a finite loss: keep the old state.
            if progress.batches_done:
                batch = progress.batches_done
                self.guard.trip(progress.epochs_done + 1, batch, batch)
            else:
                self.guard.trip(progress.epochs_done, None, None)
            return
        checkpoint.save_state(self.model, self.path, progress)
        self.saved = progress


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras's EarlyStopping, with its patience counter rebuilt after a resume.

    `history` holds the epochs already trained; replaying them through Keras's
    own on_epoch_end gives the same `best` and `wait` as the uninterrupted run.
    """

    def __init__(self, history: list[dict], **kwargs):
        super().__init__(**kwargs)
        self.history = history

    def on_train_begin(self, logs=None):
        # A resumed mid-epoch run calls fit twice; the state carries over.
        if getattr(self, "_replayed", False):
            return
        self._replayed = True
        super().on_train_begin(logs)
        for row in self.history:
            self.on_epoch_end(row["epoch"] - 1, row)
