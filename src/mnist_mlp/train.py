"""The training run: device, data, model, fit, and the run directory it leaves."""

from __future__ import annotations

import datetime as dt
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mnist_mlp import files, runtime
from mnist_mlp.config import Config, to_yaml
from mnist_mlp.errors import ConfigError, RunDirError, TrainingError

RUNS_ROOT = Path("runs")


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    device: runtime.Device
    history: list[dict]
    metrics: dict


def default_run_dir(name: str, root: Path = RUNS_ROOT, now: dt.datetime | None = None) -> Path:
    """`runs/<config name>-<UTC timestamp>`, with -2, -3... if that name is taken."""
    now = now or dt.datetime.now(dt.timezone.utc)
    base = root / f"{name}-{now:%Y%m%d-%H%M%S}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def check_run_dir(path: Path) -> None:
    """Refuse a run directory that holds anything, or one we cannot create.

    Raises:
        RunDirError: with what is wrong and how to fix it.
    """
    if path.exists():
        if not path.is_dir():
            raise RunDirError(f"run directory {path} is an existing file; choose another --run-dir")
        try:
            occupied = any(path.iterdir())
        except OSError as err:
            raise RunDirError(f"cannot read run directory {path}: {err.strerror}") from None
        if occupied:
            raise RunDirError(
                f"run directory {path} already exists and is not empty; runs are never "
                "overwritten: choose another --run-dir or leave it out for a new timestamped one"
            )
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(
            f"cannot create run directory {path}: {parent} is not writable; "
            "choose a --run-dir in a folder you can write to"
        )


def claim_run_dir(path: Path) -> None:
    """Create `path` and claim it with an exclusively created config.yaml.

    check_run_dir runs before the data is loaded; another run may have taken
    the folder since. Creating the first file with O_EXCL makes the claim atomic.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path / "config.yaml", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        raise RunDirError(
            f"run directory {path} was taken by another run; choose another --run-dir"
        ) from None
    except OSError as err:
        raise RunDirError(f"cannot create run directory {path}: {err.strerror}") from None


def train_size(samples: int, validation_split: float) -> int:
    """How many samples Keras fits on: it holds out the last `validation_split` of them."""
    # The same formula as keras.src.trainers.data_adapters.train_validation_split.
    return int(math.floor(samples * (1.0 - validation_split))) if validation_split else samples


def train(
    config: Config,
    run_dir: Path,
    report: Callable[[str], None] = lambda message: None,
    progress: int = 2,
) -> TrainResult:
    """Train the configured model and write the run directory.

    Args:
        config: the resolved configuration.
        run_dir: where the run's files go; must not exist or be empty.
        report: receives one-line status messages (device, data, paths).
        progress: Keras `fit` verbosity: 0 silent, 1 progress bar, 2 a line per epoch.

    Returns:
        The run directory, device, per-epoch history and the metrics written.

    Raises:
        MnistMlpError: a device, data or run-directory problem, before or during training.
    """
    # Device first: `device: gpu` without one fails before any other work.
    device = runtime.select_device(config.device)
    tf = runtime.import_tensorflow()
    report(f"device: {device.description} (requested: {config.device})")
    check_run_dir(run_dir)

    import keras

    from mnist_mlp.callbacks import EpochLog
    from mnist_mlp.data import load_dataset, preprocess
    from mnist_mlp.evaluate import score
    from mnist_mlp.model import build_model, compile_model

    dataset = load_dataset(config.data)
    report(f"data: {dataset.describe()}")
    x_train, y_train = preprocess(dataset.x_train, dataset.y_train)
    x_test, y_test = preprocess(dataset.x_test, dataset.y_test)
    split = config.train.validation_split
    fitted = train_size(len(x_train), split)
    if split and not 0 < fitted < len(x_train):
        raise ConfigError(
            f"train.validation_split: {split} of {len(x_train):,} training images leaves "
            f"{fitted:,} to train on and {len(x_train) - fitted:,} to validate; choose a "
            "fraction that leaves both parts non-empty"
        )

    keras.utils.set_random_seed(config.seed)
    model = build_model(config.model)
    compile_model(model, config.train)
    report(f"model: {model.count_params():,} parameters")

    claim_run_dir(run_dir)
    files.write_text(run_dir / "config.yaml", to_yaml(config))
    report(f"run directory: {run_dir}")

    started_at = dt.datetime.now(dt.timezone.utc)
    epoch_log = EpochLog(run_dir / "history.csv")
    validation = {"validation_split": split} if split else {"validation_data": (x_test, y_test)}
    start = time.perf_counter()
    try:
        model.fit(
            x_train,
            y_train,
            batch_size=config.train.batch_size,
            epochs=config.train.epochs,
            callbacks=[epoch_log],
            verbose=progress,
            **validation,
        )
        total_seconds = time.perf_counter() - start
        files.save_model(model, run_dir / "model.keras")
        # The part of the training set the model was fitted on, in inference mode.
        train_score = score(model, x_train[:fitted], y_train[:fitted])
        test_score = score(model, x_test, y_test)
    except OSError as err:  # history.csv could not be appended (disk full, removed)
        raise RunDirError(f"cannot write to {run_dir}: {err.strerror or err}") from None
    except tf.errors.OpError as err:
        raise TrainingError(
            f"TensorFlow failed: {type(err).__name__}: {err.message.splitlines()[0][:200]}; "
            "if it ran out of memory, lower train.batch_size or model.units"
        ) from None
    per_epoch = [row["seconds"] for row in epoch_log.rows]
    metrics = {
        "run_dir": str(run_dir),
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.as_dict(),
        "backend": runtime.BACKEND,
        "versions": runtime.versions(),
        "data": {
            "source": dataset.source,
            "train_samples": fitted,
            "validation": f"last {split:.0%} of the training set" if split else "test set",
            "test_samples": len(x_test),
        },
        "model": {"parameters": int(model.count_params())},
        "epochs": len(epoch_log.rows),
        "final": {
            "train": {"loss": train_score.loss, "accuracy": train_score.accuracy},
            "test": test_score.as_dict(),
        },
        "last_epoch": epoch_log.rows[-1],
        "seconds": {
            "total": total_seconds,
            "per_epoch": per_epoch,
            "mean_per_epoch": sum(per_epoch) / len(per_epoch),
        },
    }
    files.write_json(run_dir / "metrics.json", metrics)
    return TrainResult(run_dir=run_dir, device=device, history=epoch_log.rows, metrics=metrics)
