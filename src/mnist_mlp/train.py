"""The training run: device, data, model, fit, and the run directory it leaves."""

from __future__ import annotations

import datetime as dt
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mnist_mlp import checkpoint, files, plots, runs, runtime, signals
from mnist_mlp.config import Config, to_yaml, total_epochs
from mnist_mlp.errors import (
    CheckpointError,
    ConfigError,
    InstallError,
    RunDirError,
    TrainingError,
)


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    device: runtime.Device
    history: list[dict]
    metrics: dict


def train_size(samples: int, validation_split: float) -> int:
    """How many samples are fitted on: the last `validation_split` of them are held out."""
    # The same formula as keras.src.trainers.data_adapters.train_validation_split.
    return int(math.floor(samples * (1.0 - validation_split))) if validation_split else samples


def train(
    config: Config,
    run_dir: Path,
    report: Callable[[str], None] = lambda message: None,
    progress_bar: bool = False,
    resume: bool = False,
) -> TrainResult:
    """Train the configured model and write the run directory.

    Args:
        config: the resolved configuration.
        run_dir: where the run's files go; must not exist or be empty, unless resuming.
        report: receives one-line status messages (device, data, paths) and one
            summary line per epoch.
        progress_bar: also show Keras's progress bar during each epoch (for a terminal).
        resume: continue the unfinished run in `run_dir` from its last saved state
            (see runs.resume_config for the config to pass).

    Returns:
        The run directory, device, per-epoch history and the metrics written.

    Raises:
        MnistMlpError: a device, data, run-directory or training problem.
    """
    if config.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        # tf.summary fails only at the first write without it, mid-run.
        raise InstallError(
            "logging.tensorboard: true needs the tensorboard package: "
            'pip install "mnist-mlp[tensorboard]", or set logging.tensorboard: false'
        )
    # Device next: `device: gpu` without one fails before any other work.
    device = runtime.select_device(config.device)
    policy = runtime.precision_policy(config.train.precision, device.kind)
    tf = runtime.import_tensorflow()
    deterministic = config.train.deterministic
    if deterministic is None:
        deterministic = device.kind == "cpu"
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    report(f"device: {device.description} (requested: {config.device})")
    if not resume:
        runs.check_new_run_dir(run_dir)

    import keras

    from mnist_mlp.callbacks import EpochFeed, read_history
    from mnist_mlp.data import INPUT_DIM, TrainingBatches, load_dataset, preprocess
    from mnist_mlp.evaluate import score
    from mnist_mlp.model import build_model, compile_for_phase, phase_of

    dataset = load_dataset(config.data)
    report(f"data: {dataset.describe()}")
    # The training images stay uint8: TrainingBatches and score turn them into
    # float32 a batch or a chunk at a time (a float32 copy is four times larger).
    images = dataset.x_train.reshape(len(dataset.x_train), INPUT_DIM)
    labels = dataset.y_train
    split = config.train.validation_split
    fitted = train_size(len(images), split)
    if split and not 0 < fitted < len(images):
        raise ConfigError(
            f"train.validation_split: {split} of {len(images):,} training images leaves "
            f"{fitted:,} to train on and {len(images) - fitted:,} to validate; choose a "
            "fraction that leaves both parts non-empty"
        )
    validation = (
        preprocess(images[fitted:], labels[fitted:])
        if split
        else preprocess(dataset.x_test, dataset.y_test)
    )

    keras.utils.set_random_seed(config.seed)
    previous_policy = keras.mixed_precision.dtype_policy()
    # Global in Keras: set for building this model only (its layers keep it).
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        model = build_model(config.model, load_weights=not resume)
    finally:
        keras.mixed_precision.set_dtype_policy(previous_policy)
    report(f"model: {config.model.type}, {model.count_params():,} parameters ({policy})")
    epochs = total_epochs(config)

    history: list[dict] = []
    resumed = None
    epochs_done = 0
    # The phase the saved state was in: a pretrained model's optimizer variables
    # (and so the state) depend on which layers were trainable.
    phase = "head"
    if resume:
        saved = checkpoint.read_progress(run_dir / checkpoint.STATE_FILE)
        phase = phase_of(config, max(0, saved.epochs_done - (0 if saved.batches_done else 1)))
        compile_for_phase(model, config, phase)
        resumed = checkpoint.load_state(model, run_dir / checkpoint.STATE_FILE)
        epochs_done = resumed.epochs_done
        history = [r for r in read_history(run_dir / "history.csv") if r["epoch"] <= epochs_done]
        if [r["epoch"] for r in history] != list(range(1, epochs_done + 1)):
            raise CheckpointError(
                f"{run_dir / 'history.csv'}: damaged, it lacks rows of the {epochs_done} epochs "
                "the saved state has done; the run cannot be resumed exactly"
            )
        needed = epochs_done + (1 if resumed.batches_done else 0)
        if needed > epochs:
            key = runs.extendable_key(config)
            # The key counts the last phase's epochs only (a pretrained model's fine-tuning).
            least = needed - (epochs - _get(config, key))
            raise ConfigError(
                f"--resume {run_dir}: the run is already in epoch {needed}, past its "
                f"{epochs} epochs; give --set {'.'.join(key)}={least} or more"
            )
        # All epochs done but killed before the final files: fit runs no epoch
        # and the run is finished below.
        where = f", batch {resumed.batches_done}" if resumed.batches_done else ""
        report(f"resuming after epoch {epochs_done}{where} of {epochs}")
    else:
        compile_for_phase(model, config, phase)
        runs.claim_run_dir(run_dir)
    lock = runs.lock_run_dir(run_dir)
    try:
        files.write_text(run_dir / "config.yaml", to_yaml(config))
        report(f"run directory: {run_dir}")

        steps = math.ceil(fitted / config.train.batch_size)
        callbacks = _callbacks(config, run_dir, history, resumed, steps, report, progress_bar)
        guard, epoch_log, state = callbacks["guard"], callbacks["log"], callbacks["state"]
        stopper = callbacks.get("stopper")
        skip = resumed.batches_done if resumed else 0
        # A mid-epoch resume fits the rest of that epoch first, as its own fit call
        # with its own shorter pass over the data, then the remaining epochs.
        segments = [(epochs_done, epochs_done + 1, skip), (epochs_done + 1, epochs, 0)]
        if not skip:
            segments = [(epochs_done, epochs, 0)]
        # A pretrained model's fine-tuning starts a new fit after train.epochs.
        segments = _split_at(segments, config.train.epochs)
        if stopper is not None and history:
            # Replay the finished epochs now: if early stopping had already fired
            # (killed just after that epoch's save), the run is finished, not resumed.
            stopper.set_model(model)
            stopper.on_train_begin()
            if model.stop_training:
                segments = []
        started_at = dt.datetime.now(dt.timezone.utc)
        try:
            with runtime.quiet_tensorflow(), signals.handled():
                for first, last, skipped in segments:
                    if first >= last or model.stop_training:
                        continue
                    if phase_of(config, first) != phase:
                        phase = phase_of(config, first)
                        compile_for_phase(model, config, phase)
                        report(_fine_tune_line(config, model))
                    batches = TrainingBatches(
                        images[:fitted],
                        labels[:fitted],
                        config.train.batch_size,
                        config.seed,
                        epoch=first,
                        skip=skipped,
                    )
                    model.fit(
                        batches.for_fit(keras.backend.backend()),
                        epochs=last,
                        initial_epoch=first,
                        validation_data=validation,
                        # The order comes from TrainingBatches (data.epoch_order), not fit.
                        shuffle=False,
                        callbacks=[EpochFeed(batches), *callbacks.values()],
                        verbose=1 if progress_bar else 0,
                    )
            if guard.tripped:
                kept = state.saved
                saved = (
                    f"the state after epoch {kept.epochs_done}"
                    + (f", batch {kept.batches_done}" if kept.batches_done else "")
                    + " is kept"
                    if kept.epochs_done or kept.batches_done
                    else "nothing was saved"
                )
                raise TrainingError(
                    f"the loss became NaN or infinite in {guard.describe()}; training "
                    f"stopped and {saved} in {run_dir}; "
                    "lower train.learning_rate and start a new run"
                )
            stopped = stopper is not None and stopper.stopped_epoch > 0
            best_file = run_dir / "best.keras"
            if stopped and config.train.early_stopping.restore_best_weights and best_file.is_file():
                best = keras.saving.load_model(best_file, compile=False)
                model.set_weights(best.get_weights())
            files.save_model(model, run_dir / "model.keras")
            plots.save_curves(
                epoch_log.rows,
                run_dir / "curves.png",
                validation=f"last {split:.0%} of training set" if split else "test set",
            )
            with runtime.quiet_tensorflow():
                train_score = score(model, images[:fitted], labels[:fitted])
                test_score = score(model, dataset.x_test, dataset.y_test)
        except OSError as err:  # history.csv could not be appended (disk full, removed)
            raise RunDirError(f"cannot write to {run_dir}: {err.strerror or err}") from None
        except tf.errors.OpError as err:
            raise TrainingError.from_op_error(
                err, "if it ran out of memory, lower train.batch_size or the model's size"
            ) from None

        rows = epoch_log.rows
        per_epoch = [row["seconds"] for row in rows]
        metrics = {
            "run_dir": str(run_dir),
            "started_at": started_at.isoformat(timespec="seconds"),
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "resumed_after_epoch": epochs_done if resume else None,
            "device": device.as_dict(),
            "backend": runtime.backend(),
            "deterministic": deterministic,
            "precision": policy,
            "versions": runtime.versions(),
            "data": {
                "source": dataset.source,
                "train_samples": fitted,
                "validation": f"last {split:.0%} of the training set" if split else "test set",
                "test_samples": len(dataset.x_test),
            },
            "model": {"parameters": int(model.count_params())},
            "epochs": len(rows),
            "early_stopping": (
                {"stopped_after_epoch": stopper.stopped_epoch + 1} if stopped else None
            ),
            "final": {
                "train": {"loss": train_score.loss, "accuracy": train_score.accuracy},
                "test": test_score.as_dict(),
            },
            "last_epoch": rows[-1],
            "seconds": {
                # Summed over epochs, so a resumed run counts each epoch once.
                "total": sum(per_epoch),
                "per_epoch": per_epoch,
                "mean_per_epoch": sum(per_epoch) / len(per_epoch),
                "mean_state_save": (
                    sum(state.seconds) / len(state.seconds) if state.seconds else None
                ),
            },
        }
        files.write_json(run_dir / "metrics.json", metrics)
        return TrainResult(run_dir=run_dir, device=device, history=rows, metrics=metrics)
    finally:
        os.close(lock)


def _callbacks(
    config: Config,
    run_dir: Path,
    history: list[dict],
    resumed: checkpoint.Progress | None,
    steps_per_epoch: int,
    report: Callable[[str], None],
    progress_bar: bool,
) -> dict:
    """The callbacks of a run, in the order they must run at each epoch end.

    The history row is written first and the training state last, so a saved
    state at epoch N implies history.csv and best.keras are complete up to N.
    """
    import keras

    from mnist_mlp.callbacks import (
        BestModel,
        EpochLog,
        EpochSummary,
        NanGuard,
        ResumableEarlyStopping,
        TrainingState,
        monitor_mode,
    )

    monitor = config.checkpoint.monitor
    guard = NanGuard(steps_per_epoch, offset=resumed.batches_done if resumed else 0)
    past = [row[monitor] for row in history]
    best = (max if monitor_mode(monitor) == "max" else min)(past) if past else None
    stopping = config.train.early_stopping
    watched = (stopping.monitor or monitor) if stopping else monitor
    stopper = (
        ResumableEarlyStopping(
            history,
            monitor=watched,
            mode=monitor_mode(watched),
            patience=stopping.patience,
            min_delta=stopping.min_delta,
            # Restored from best.keras after fit instead: exact across a resume.
            restore_best_weights=False,
        )
        if stopping
        else None
    )
    callbacks = {
        "guard": guard,
        "log": EpochLog(run_dir / "history.csv", history),
        # Given to fit explicitly so that it ends the epoch's bar before the summary.
        "bar": keras.callbacks.ProgbarLogger() if progress_bar else None,
        "summary": EpochSummary(report, total_epochs(config)),
        "tensorboard": keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard"))
        if config.logging.tensorboard
        else None,
        "best": BestModel(
            run_dir / "best.keras", monitor, guard, best, stopping.min_delta if stopping else 0.0
        ),
        "stopper": stopper,
        "state": TrainingState(
            run_dir / checkpoint.STATE_FILE,
            guard,
            steps_per_epoch,
            config.checkpoint.every_batches,
            resumed,
        ),
    }
    return {name: cb for name, cb in callbacks.items() if cb is not None}


def _split_at(segments: list[tuple[int, int, int]], epoch: int) -> list[tuple[int, int, int]]:
    """Split (first, last, skip) epoch ranges so that none crosses `epoch`."""
    out = []
    for first, last, skip in segments:
        if first < epoch < last:
            out += [(first, epoch, skip), (epoch, last, 0)]
        else:
            out.append((first, last, skip))
    return out


def _fine_tune_line(config: Config, model) -> str:
    from mnist_mlp.model import backbone_layers, backbone_of

    backbone = backbone_of(model)
    layers = len(backbone_layers(backbone))
    count = config.model.fine_tune.layers or layers
    trained = sum(1 for layer in backbone.layers if layer.trainable and layer.weights)
    return (
        f"fine-tuning from epoch {config.train.epochs + 1}: the top {count} of {layers} layers "
        f"of {config.model.backbone} unfrozen ({trained} with weights that train), "
        f"{_trainable_parameters(model):,} trainable parameters, learning rate "
        f"{config.model.fine_tune.learning_rate:g}"
    )


def _trainable_parameters(model) -> int:
    return int(sum(math.prod(v.shape) for v in model.trainable_variables))


def _get(config: Config, key: tuple[str, ...]):
    value = config
    for part in key:
        value = getattr(value, part)
    return value
