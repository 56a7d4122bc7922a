"""Interrupted runs: determinism, kill-and-resume, signals, early stopping, NaN, best.keras."""

from __future__ import annotations

import csv
import json
import random
import re
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import EXECUTABLE, assert_one_line_error, needs_t10k

from mnist_mlp.config import load_config

pytestmark = needs_t10k

EPOCHS = 4


def _args(split_npz, *extra):
    args = [
        "--set",
        f"data.path={split_npz}",
        "--set",
        f"train.epochs={EPOCHS}",
        "--set",
        "device=cpu",
    ]
    for item in extra:
        args += ["--set", item]
    return args


def _state(run_dir) -> dict[str, np.ndarray]:
    with np.load(run_dir / "state.npz") as state:
        return {key: state[key] for key in state.files}


def _history(run_dir, columns=("epoch", "loss", "accuracy", "val_loss", "val_accuracy")):
    with open(run_dir / "history.csv", newline="") as handle:
        return [tuple(row[c] for c in columns) for row in csv.DictReader(handle)]


def _weights(run_dir, name="model.keras"):
    from mnist_mlp import runtime

    runtime.import_tensorflow()
    import keras

    return keras.saving.load_model(run_dir / name, compile=False).get_weights()


def _names(paths) -> list[str]:
    return [re.sub(r"_\d+(?=/|$)", "", str(path)) for path in paths]


def _assert_same_run(a, b):
    """Bit for bit: every model and optimizer variable, and the scores of every epoch."""
    state_a, state_b = _state(a), _state(b)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        if key.endswith("/paths"):
            # Names, not values: Keras numbers unnamed objects per process
            # (seed_generator_1 for a second model in one process).
            assert _names(state_a[key]) == _names(state_b[key]), key
            continue
        np.testing.assert_array_equal(state_a[key], state_b[key], err_msg=key)
    for wa, wb in zip(_weights(a), _weights(b), strict=True):
        np.testing.assert_array_equal(wa, wb)
    assert _history(a) == _history(b)


@pytest.fixture(scope="module")
def reference_run(run_cli, split_npz, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = run_cli("train", *_args(split_npz), "--run-dir", run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir


def _start(cli_env, *args):
    return subprocess.Popen(
        [EXECUTABLE, "train", *map(str, args)],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _progress(run_dir) -> tuple[int, int]:
    with np.load(run_dir / "state.npz") as state:
        return int(state["epochs_done"]), int(state["batches_done"])


def _epochs_saved(run_dir) -> int:
    try:
        with np.load(run_dir / "state.npz") as state:
            return int(state["epochs_done"])
    except (OSError, ValueError, KeyError):  # not there yet, or being replaced
        return 0


def _wait_for_epochs(run_dir, epochs, process, timeout=300):
    """Wait until the run has saved its state after `epochs` epochs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return
        if _epochs_saved(run_dir) >= epochs:
            return
        time.sleep(0.05)
    raise AssertionError("training did not progress")


def _interrupt_after_first_epoch(cli_env, split_npz, run_dir, sig):
    """Start a run, wait for its first saved epoch, send `sig`, wait for the exit."""
    process = _start(cli_env, *_args(split_npz), "--run-dir", run_dir)
    _wait_for_epochs(run_dir, 1, process)
    process.send_signal(sig)
    process.communicate(timeout=120)
    return process


def test_two_runs_with_the_same_seed_are_identical(reference_run, run_cli, split_npz, tmp_path):
    again = tmp_path / "again"
    assert run_cli("train", *_args(split_npz), "--run-dir", again).returncode == 0
    _assert_same_run(reference_run, again)
    assert json.loads((again / "metrics.json").read_text())["deterministic"] is True


def test_steps_per_execution_changes_no_weight(reference_run, run_cli, split_npz, tmp_path):
    # The reference groups its 63 steps per epoch as 32 + 31; one step per call
    # into TensorFlow must train the very same model, and report the same epochs.
    one = tmp_path / "one"
    args = _args(split_npz, "train.steps_per_execution=1")
    assert run_cli("train", *args, "--run-dir", one).returncode == 0
    assert load_config(reference_run / "config.yaml").train.steps_per_execution == 32
    _assert_same_run(reference_run, one)


def test_a_different_seed_gives_a_different_run(reference_run, run_cli, split_npz, tmp_path):
    other = tmp_path / "other"
    assert run_cli("train", *_args(split_npz, "seed=7"), "--run-dir", other).returncode == 0
    assert _history(other) != _history(reference_run)


@pytest.mark.parametrize("every_batches", [None, 10], ids=["epoch-saves", "every-10-batches"])
def test_sigkill_twice_then_resume_ends_exactly_like_an_uninterrupted_run(
    reference_run, run_cli, cli_env, split_npz, tmp_path, every_batches
):
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng.seed(seed)  # printed on failure, to replay the same kill moments
    run_dir = tmp_path / "killed"
    kills = []
    extra = [f"checkpoint.every_batches={every_batches}"] if every_batches else []
    process = _start(cli_env, *_args(split_npz, *extra), "--run-dir", run_dir)
    for after_epochs in (1, 2):
        # A random moment inside the next epoch: mid-batch, mid-save or between.
        _wait_for_epochs(run_dir, after_epochs, process)
        time.sleep(rng.uniform(0.0, 1.2))
        process.kill()  # SIGKILL: no handler runs, files may be half-written
        process.communicate()
        kills.append(_progress(run_dir))
        process = _start(cli_env, "--resume", run_dir)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, (seed, kills, err)
    assert "resuming after epoch" in out
    assert not list(run_dir.glob(".*tmp*")), "a temporary file was left behind"
    _assert_same_run(reference_run, run_dir)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_stop_cleanly_and_the_run_resumes(
    reference_run, run_cli, cli_env, split_npz, tmp_path, sig, code
):
    run_dir = tmp_path / "stopped run"  # a space: the printed command must quote it
    process = _start(cli_env, *_args(split_npz), "--run-dir", run_dir)
    _wait_for_epochs(run_dir, 1, process)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        f"error: interrupted; resume with: mnist-mlp train --resume '{run_dir}'"
    ]
    assert not (run_dir / "metrics.json").exists()
    result = run_cli("train", "--resume", run_dir)
    assert result.returncode == 0, result.stderr
    _assert_same_run(reference_run, run_dir)


def test_a_stop_after_the_first_group_of_steps_resumes_bit_for_bit(
    reference_run, split_npz, tmp_path, monkeypatch
):
    # Deterministic, unlike the random kills: a stop request in epoch 4, seen at
    # the first report (after 32 of its 63 batches), saved there, then resumed.
    # The resumed epoch's loss must continue the saved sum in the same order.
    import signal as signals_module

    from mnist_mlp import runs, signals
    from mnist_mlp.train import train

    asked = iter([False, False, False, True])

    def requested():
        if next(asked, False):
            signals._requested = signals_module.SIGINT
        return signals._requested is not None

    monkeypatch.setattr(signals, "requested", requested)
    run_dir = tmp_path / "stopped"
    with pytest.raises(signals.StopRequested):
        train(load_config(None, _args(split_npz)[1::2]), run_dir)
    with np.load(run_dir / "state.npz") as state:
        assert (int(state["epochs_done"]), int(state["batches_done"])) == (3, 32)
    monkeypatch.undo()
    train(runs.resume_config(run_dir, None, ()), run_dir, resume=True)
    _assert_same_run(reference_run, run_dir)


def test_resume_can_extend_the_epochs(run_cli, cli_env, split_npz, tmp_path):
    run_dir = tmp_path / "extend"
    _interrupt_after_first_epoch(cli_env, split_npz, run_dir, signal.SIGINT)
    result = run_cli("train", "--resume", run_dir, "--set", f"train.epochs={EPOCHS + 1}")
    assert result.returncode == 0, result.stderr
    assert [int(row[0]) for row in _history(run_dir)] == list(range(1, EPOCHS + 2))
    assert load_config(run_dir / "config.yaml").train.epochs == EPOCHS + 1


def test_resume_refuses_what_it_cannot_continue(reference_run, run_cli, split_npz, tmp_path):
    assert_one_line_error(run_cli("train", "--resume", tmp_path / "none"), "no such run")
    assert_one_line_error(run_cli("train", "--resume", tmp_path), "not a run directory")
    assert_one_line_error(run_cli("train", "--resume", reference_run), "already finished")
    unstarted = tmp_path / "unstarted"
    unstarted.mkdir()
    for name in ("config.yaml", "history.csv"):
        (unstarted / name).write_text((reference_run / name).read_text())
    assert_one_line_error(run_cli("train", "--resume", unstarted), "before its first epoch")
    assert_one_line_error(
        run_cli("train", "--resume", reference_run, "--run-dir", tmp_path / "x"),
        "leave out --run-dir",
    )


def test_resume_refuses_config_changes_other_than_epochs(run_cli, cli_env, split_npz, tmp_path):
    run_dir = tmp_path / "partial"
    _interrupt_after_first_epoch(cli_env, split_npz, run_dir, signal.SIGKILL)
    before = _state(run_dir)
    line = assert_one_line_error(
        run_cli("train", "--resume", run_dir, "--set", "model.units=64"), "model.units"
    )
    assert "only train.epochs may change" in line
    other = tmp_path / "other.yaml"
    other.write_text("train:\n  batch_size: 64\n")
    assert_one_line_error(
        run_cli("train", "--resume", run_dir, "--config", other), "train.batch_size"
    )
    # Refusals touch nothing.
    for key, value in _state(run_dir).items():
        np.testing.assert_array_equal(value, before[key])


def test_a_truncated_state_is_refused_and_kept(run_cli, cli_env, split_npz, tmp_path):
    run_dir = tmp_path / "broken"
    _interrupt_after_first_epoch(cli_env, split_npz, run_dir, signal.SIGKILL)
    data = (run_dir / "state.npz").read_bytes()
    (run_dir / "state.npz").write_bytes(data[: len(data) // 3])
    assert_one_line_error(run_cli("train", "--resume", run_dir), "unreadable training state")
    assert (run_dir / "state.npz").stat().st_size == len(data) // 3


def test_best_keras_is_the_best_epochs_model(reference_run, run_cli):
    history = _history(reference_run)
    best_epoch = max(history, key=lambda row: float(row[4]))
    report = json.loads(
        run_cli("evaluate", "--checkpoint", reference_run / "best.keras", "--json").stdout
    )
    # Validation is the test set here; allow a near-tie or two (batching differs).
    assert report["accuracy"] == pytest.approx(float(best_epoch[4]), abs=2 / 2000)


def test_early_stopping_stops_by_keras_rule_and_restores_best(run_cli, split_npz, tmp_path):
    run_dir = tmp_path / "early"
    result = run_cli(
        "train",
        "--set",
        f"data.path={split_npz}",
        "--set",
        "train.epochs=12",
        "--set",
        "train.learning_rate=0.01",
        "--set",
        "checkpoint.monitor=val_loss",
        "--set",
        "train.early_stopping.patience=1",
        "--run-dir",
        run_dir,
    )
    assert result.returncode == 0, result.stderr
    losses = [float(row[3]) for row in _history(run_dir)]
    # Keras's rule with patience 1: stop at the first epoch that does not improve.
    expected = next((i + 1 for i in range(1, len(losses)) if losses[i] >= min(losses[:i])), None)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stopped = (metrics["early_stopping"] or {}).get("stopped_after_epoch")
    assert stopped == expected and len(losses) == (expected or 12)
    if expected:
        for final, best in zip(_weights(run_dir), _weights(run_dir, "best.keras"), strict=True):
            np.testing.assert_array_equal(final, best)


@pytest.mark.parametrize(
    ("steps_per_execution", "where"), [(1, "epoch 2, batch 5"), (4, "epoch 2, batches 5-8")]
)
def test_nan_loss_stops_naming_epoch_and_batch_and_keeps_the_last_good_state(
    split_npz, tmp_path, monkeypatch, steps_per_execution, where
):
    import tensorflow as tf

    from mnist_mlp import data
    from mnist_mlp.errors import TrainingError
    from mnist_mlp.train import train

    real = data.TrainingBatches.tf_dataset

    def poisoned(self):
        def poison(step, batch):
            # Batch 5 of epoch 2 (0-based epoch 1, step 4) is all NaN.
            hit = tf.numpy_function(lambda s: np.bool_(self.epoch == 1 and s == 4), [step], tf.bool)
            hit.set_shape([])
            x, y = batch
            return tf.where(hit, tf.fill(tf.shape(x), float("nan")), x), y

        return real(self).enumerate().map(poison)

    monkeypatch.setattr(data.TrainingBatches, "tf_dataset", poisoned)
    run_dir = tmp_path / "nan"
    overrides = [f"train.steps_per_execution={steps_per_execution}", "train.epochs=3"]
    config = load_config(None, [f"data.path={split_npz}", "device=cpu", *overrides])
    with pytest.raises(TrainingError) as info:
        train(config, run_dir)
    message = str(info.value)
    assert f"in {where};" in message and "state after epoch 1 is kept" in message
    with np.load(run_dir / "state.npz") as state:
        assert int(state["epochs_done"]) == 1
        assert all(np.isfinite(state[k]).all() for k in state.files if k.startswith("model/0"))
    assert (run_dir / "best.keras").is_file()
    assert not (run_dir / "model.keras").exists() and not (run_dir / "metrics.json").exists()


def test_early_stopping_replay_rebuilds_keras_state_from_history():
    from mnist_mlp import runtime

    runtime.import_tensorflow()
    import keras

    from mnist_mlp.callbacks import ResumableEarlyStopping

    rows = [{"epoch": e, "val_loss": v} for e, v in enumerate([0.5, 0.4, 0.45, 0.41], 1)]
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])

    waiting = ResumableEarlyStopping(rows[:3], monitor="val_loss", mode="min", patience=2)
    waiting.set_model(model)
    model.stop_training = False
    waiting.on_train_begin()
    assert (waiting.best, waiting.wait, model.stop_training) == (0.4, 1, False)

    fired = ResumableEarlyStopping(rows, monitor="val_loss", mode="min", patience=2)
    fired.set_model(model)
    fired.on_train_begin()
    # Epoch 4 was the second without improvement: Keras would have stopped there.
    assert model.stop_training and fired.stopped_epoch == 3
    fired.on_train_begin()  # the later fit call must not replay twice
    assert fired.stopped_epoch == 3 and fired.wait == 2


def test_a_damaged_history_is_refused(run_cli, cli_env, split_npz, tmp_path):
    run_dir = tmp_path / "damaged"
    _interrupt_after_first_epoch(cli_env, split_npz, run_dir, signal.SIGKILL)
    header = (run_dir / "history.csv").read_text().splitlines()[0]
    (run_dir / "history.csv").write_text(header + "\n")
    assert_one_line_error(run_cli("train", "--resume", run_dir), "history.csv: damaged")
    (run_dir / "history.csv").write_bytes(b"\xff\xfe\x00garbage")
    assert_one_line_error(run_cli("train", "--resume", run_dir), "unreadable history")


def test_a_run_in_progress_cannot_be_resumed_by_a_second_process(
    run_cli, cli_env, split_npz, tmp_path
):
    run_dir = tmp_path / "busy"
    args = ["--set", f"data.path={split_npz}", "--set", "train.epochs=60", "--set", "device=cpu"]
    first = _start(cli_env, *args, "--run-dir", run_dir)
    try:
        _wait_for_epochs(run_dir, 1, first)
        before = (run_dir / "config.yaml").read_text()
        result = run_cli("train", "--resume", run_dir)
        assert first.poll() is None, "the first run ended too early for this test"
        assert_one_line_error(result, "in use by another mnist-mlp process")
        assert (run_dir / "config.yaml").read_text() == before
    finally:
        first.kill()
        first.communicate()


def test_best_model_uses_early_stoppings_min_delta(tmp_path, monkeypatch):
    from mnist_mlp import files
    from mnist_mlp.callbacks import BestModel, NanGuard

    saved = []
    monkeypatch.setattr(files, "save_model", lambda model, path: saved.append(path))
    best = BestModel(tmp_path / "best.keras", "val_accuracy", NanGuard(10), min_delta=0.01)
    for epoch, value in enumerate([0.50, 0.505, 0.52, 0.525]):
        best.on_epoch_end(epoch, {"val_accuracy": value})
    # 0.505 and 0.525 improve by less than min_delta: Keras's EarlyStopping
    # would not count them, so best.keras must not either.
    assert len(saved) == 2 and best.best == 0.52
    losses = BestModel(tmp_path / "b.keras", "val_loss", NanGuard(10), min_delta=0.01)
    for epoch, value in enumerate([0.5, 0.495, 0.48]):
        losses.on_epoch_end(epoch, {"val_loss": value})
    assert len(saved) == 4 and losses.best == 0.48
