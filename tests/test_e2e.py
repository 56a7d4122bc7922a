"""End to end: train on real digits with the installed CLI, then evaluate what it saved."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import yaml
from conftest import (
    CONFIGS,
    EPOCHS,
    FASHION,
    assert_one_line_error,
    needs_fashion,
    needs_t10k,
)

from mnist_mlp.callbacks import HISTORY_COLUMNS
from mnist_mlp.config import validate

pytestmark = needs_t10k

RUN_FILES = {
    "model.keras",
    "best.keras",
    "state.npz",
    "config.yaml",
    "history.csv",
    "metrics.json",
    "curves.png",
}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_directory_holds_exactly_the_documented_files(trained_run):
    run_dir, _, _ = trained_run
    assert {p.name for p in run_dir.iterdir()} == RUN_FILES


def test_saved_config_is_the_resolved_config(trained_run):
    run_dir, _, expected = trained_run
    assert validate(yaml.safe_load((run_dir / "config.yaml").read_text())) == expected


def test_history_has_one_row_per_epoch(trained_run):
    run_dir, _, _ = trained_run
    with open(run_dir / "history.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == HISTORY_COLUMNS
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < losses[0]  # it learned
    assert all(float(r["seconds"]) > 0 for r in rows)
    assert all(0.0 <= float(r["val_accuracy"]) <= 1.0 for r in rows)


def test_metrics_record_scores_device_versions_and_timings(trained_run, split_arrays):
    import keras
    import tensorflow as tf

    run_dir, _, _ = trained_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["device"]["kind"] == "cpu"
    assert metrics["versions"]["tensorflow"] == tf.__version__
    assert metrics["versions"]["keras"] == keras.__version__
    assert metrics["model"]["parameters"] == 623_290
    assert metrics["data"]["train_samples"] == 8000 and metrics["data"]["test_samples"] == 2000
    test = metrics["final"]["test"]
    assert test["total"] == 2000 and test["correct"] == round(test["accuracy"] * 2000)
    # Three epochs on 8,000 real digits: far above chance (0.1).
    assert test["accuracy"] > 0.9
    assert metrics["final"]["train"]["accuracy"] > 0.9
    per_class_totals = [c["total"] for c in test["per_class"]]
    assert per_class_totals == np.bincount(split_arrays["y_test"], minlength=10).tolist()
    assert sum(c["correct"] for c in test["per_class"]) == test["correct"]
    # The last epoch's validation is the test set, scored by the same weights.
    # (Keras validates in batches of 128, we score in batches of 1,000: allow a
    # near-tie or two to fall the other way.)
    assert metrics["last_epoch"]["val_accuracy"] == pytest.approx(test["accuracy"], abs=2 / 2000)
    seconds = metrics["seconds"]
    assert len(seconds["per_epoch"]) == EPOCHS == metrics["epochs"]
    assert all(s > 0 for s in seconds["per_epoch"]) and seconds["mean_state_save"] > 0


def test_saved_model_is_the_tutorials_network(trained_run):
    from mnist_mlp import runtime

    runtime.import_tensorflow()
    import keras

    run_dir, _, _ = trained_run
    model = keras.saving.load_model(run_dir / "model.keras")
    assert model.count_params() == 623_290
    assert [type(layer).__name__ for layer in model.layers] == [
        "Dense",
        "Dropout",
        "Activation",
        "Dense",
        "Activation",
    ]


def test_train_output_names_device_and_run_and_has_no_startup_noise(trained_run):
    run_dir, result, _ = trained_run
    assert "device: CPU" in result.stdout
    assert str(run_dir) in result.stdout
    assert "absl::InitializeLog" not in result.stderr
    assert "cpu_feature_guard" not in result.stderr


def test_evaluate_reproduces_the_runs_test_accuracy_exactly(trained_run, run_cli):
    run_dir, _, _ = trained_run
    metrics = json.loads((run_dir / "metrics.json").read_text())["final"]["test"]
    # With no data option, evaluate uses the config.yaml of the checkpoint's run.
    for extra in ([], ["--config", run_dir / "config.yaml"]):
        result = run_cli("evaluate", "--checkpoint", run_dir / "model.keras", "--json", *extra)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["accuracy"] == metrics["accuracy"]
        assert report["correct"] == metrics["correct"]
        assert report["loss"] == metrics["loss"]
        assert report["per_class"] == metrics["per_class"]


def test_evaluate_on_the_same_digits_from_npz_agrees(trained_run, run_cli, split_npz):
    run_dir, _, _ = trained_run
    metrics = json.loads((run_dir / "metrics.json").read_text())["final"]["test"]
    result = run_cli("evaluate", "--checkpoint", run_dir / "model.keras", "--data-path", split_npz)
    assert result.returncode == 0, result.stderr
    assert f"({metrics['correct']:,}/2,000)" in result.stdout
    lines = result.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("true ")))
    matrix = [[int(v.replace(",", "")) for v in line.split()[1:]] for line in lines[start + 1 :]]
    # The printed matrix (10 columns plus row totals) is the run's, read back.
    assert [row[:10] for row in matrix] == metrics["confusion_matrix"]
    assert [row[10] for row in matrix] == [c["total"] for c in metrics["per_class"]]


def test_an_existing_run_directory_is_refused_and_untouched(trained_run, run_cli, split_npz):
    run_dir, _, _ = trained_run
    before = {p.name: _sha(p) for p in run_dir.iterdir()}
    result = run_cli(
        "train", "--set", f"data.path={split_npz}", "--set", "train.epochs=1", "--run-dir", run_dir
    )
    assert_one_line_error(result, "already exists", str(run_dir))
    assert {p.name: _sha(p) for p in run_dir.iterdir()} == before


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (lambda d: d / "missing.keras", ["checkpoint not found"]),
        (lambda d: d, ["is a directory"]),
        (lambda d: d / "config.yaml", ["not a Keras model file"]),
    ],
)
def test_evaluate_refuses_bad_checkpoints(trained_run, run_cli, make, fragments):
    run_dir, _, _ = trained_run
    assert_one_line_error(run_cli("evaluate", "--checkpoint", make(run_dir)), *fragments)


def test_evaluate_refuses_truncated_and_fake_models(trained_run, run_cli, tmp_path):
    run_dir, _, _ = trained_run
    data = (run_dir / "model.keras").read_bytes()
    (tmp_path / "half.keras").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.keras").write_text("not a model\n")
    for name in ("half.keras", "text.keras"):
        result = run_cli("evaluate", "--checkpoint", tmp_path / name)
        assert_one_line_error(result, name, "not a valid .keras archive")


def test_evaluate_refuses_a_model_with_another_input_shape(run_cli, tmp_path):
    from mnist_mlp import runtime

    runtime.import_tensorflow()
    import keras

    model = keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    model.save(tmp_path / "cnn.keras")
    result = run_cli("evaluate", "--checkpoint", tmp_path / "cnn.keras")
    assert_one_line_error(result, "inputs of shape (28, 28, 1)", "(784,)")


def test_evaluate_without_a_run_config_downloads_mnist_or_says_why(trained_run, run_cli, tmp_path):
    run_dir, _, _ = trained_run
    lone = tmp_path / "model.keras"  # no config.yaml beside it: MNIST through Keras
    lone.write_bytes((run_dir / "model.keras").read_bytes())
    result = run_cli("evaluate", "--checkpoint", lone)
    assert_one_line_error(result, "could not download mnist", "data.path")


def test_default_run_dir_and_validation_split(run_cli, split_npz, tmp_path):
    result = run_cli(
        "train",
        "--config",
        CONFIGS / "quick.yaml",
        "--set",
        "train.epochs=1",
        "--set",
        "train.validation_split=0.07",
        "--set",
        f"data.path={split_npz}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("quick-20")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # Keras fits on floor(8000 * (1 - 0.07)) = 7439 (8000 * 0.93 is 7439.999... in floats).
    assert metrics["data"]["train_samples"] == 7439
    assert metrics["data"]["validation"] == "last 7% of the training set"
    assert metrics["final"]["test"]["total"] == 2000


def test_validation_split_that_leaves_nothing_to_train_on(run_cli, split_npz, tmp_path):
    result = run_cli(
        "train",
        "--set",
        f"data.path={split_npz}",
        "--set",
        "train.validation_split=0.9999",
        "--run-dir",
        tmp_path / "run",
    )
    assert_one_line_error(result, "train.validation_split", "leaves 0 to train on")
    assert not (tmp_path / "run").exists()


def test_evaluate_with_bad_data_options(trained_run, run_cli, tmp_path):
    run_dir, _, _ = trained_run
    model = run_dir / "model.keras"
    assert_one_line_error(
        run_cli("evaluate", "--checkpoint", model, "--data-path", tmp_path),
        "missing t10k-images-idx3-ubyte",
    )
    assert_one_line_error(
        run_cli("evaluate", "--checkpoint", model, "--data-path", ""), "data.path"
    )
    assert_one_line_error(
        run_cli(
            "evaluate",
            "--checkpoint",
            model,
            "--config",
            run_dir / "config.yaml",
            "--data-path",
            tmp_path,
        ),
        "give one of them",
    )
    assert_one_line_error(
        run_cli("evaluate", "--checkpoint", model, "--device", "tpu"), "'tpu' is not one of"
    )


@pytest.mark.slow
@needs_fashion
def test_full_fashion_mnist_run(run_cli, tmp_path):
    run_dir = tmp_path / "fashion"
    result = run_cli(
        "train",
        "--config",
        CONFIGS / "cpu.yaml",
        "--set",
        "train.epochs=2",
        "--set",
        f"data.path={FASHION}",
        "--run-dir",
        run_dir,
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["data"]["train_samples"] == 60_000
    assert metrics["final"]["test"]["total"] == 10_000
    # A plain Keras script of this network reaches about 0.84 after 2 epochs.
    assert metrics["final"]["test"]["accuracy"] > 0.8
    result = run_cli("evaluate", "--checkpoint", run_dir / "model.keras", "--json")
    assert json.loads(result.stdout)["accuracy"] == metrics["final"]["test"]["accuracy"]
