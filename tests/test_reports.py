"""What users look at: epoch lines, curves.png, TensorBoard logs, evaluation reports."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess

import numpy as np
import pytest
from conftest import EPOCHS, EXECUTABLE, assert_one_line_error, needs_t10k, synthetic_arrays
from PIL import Image

from mnist_mlp.callbacks import read_history
from mnist_mlp.plots import TRAIN_COLOR, VALIDATION_COLOR, mistakes_size

EPOCH_LINE = re.compile(
    r"^epoch +(\d+)/(\d+)  loss \d+\.\d{4}  accuracy \d\.\d{4}  "
    r"val_loss \d+\.\d{4}  val_accuracy \d\.\d{4}  \d+\.\d s$"
)
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n


def _rgb(hex_color: str) -> np.ndarray:
    return np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)])


def _has_color(pixels: np.ndarray, hex_color: str, at_least: int = 50) -> bool:
    close = np.abs(pixels[..., :3].astype(int) - _rgb(hex_color)).sum(axis=-1) < 30
    return int(close.sum()) >= at_least


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.npz"
    np.savez(path, **synthetic_arrays(n_train=256, n_test=64))
    return path


def _tiny_train(run_cli, tiny_npz, run_dir, *extra):
    return run_cli(
        "train",
        "--set",
        f"data.path={tiny_npz}",
        "--set",
        "model.units=16",
        "--set",
        "train.epochs=2",
        "--run-dir",
        run_dir,
        *extra,
    )


# --------------------------------------------------------------- while training


@needs_t10k
def test_piped_output_is_one_plain_line_per_epoch(trained_run):
    run_dir, result, _ = trained_run
    assert not CONTROL.search(result.stdout), "control characters in piped output"
    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert [EPOCH_LINE.match(line).groups() for line in epoch_lines] == [
        (str(e), str(EPOCHS)) for e in range(1, EPOCHS + 1)
    ]
    # Each line carries that epoch's numbers from history.csv.
    for line, row in zip(epoch_lines, read_history(run_dir / "history.csv"), strict=True):
        assert f"loss {row['loss']:.4f}" in line
        assert f"val_accuracy {row['val_accuracy']:.4f}" in line
    assert "Epoch 1/" not in result.stdout  # no Keras output when not a terminal


def test_quiet_prints_only_the_final_summary(run_cli, tiny_npz, tmp_path):
    result = _tiny_train(run_cli, tiny_npz, tmp_path / "run", "--quiet")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("finished 2 epochs in ")
    assert [line.split()[0] for line in lines] == ["finished", "train", "test", "wrote", "evaluate"]
    assert result.stderr == ""


def test_verbose_shows_tensorflows_own_logs(run_cli, tiny_npz, tmp_path):
    quiet = _tiny_train(run_cli, tiny_npz, tmp_path / "a")
    verbose = _tiny_train(run_cli, tiny_npz, tmp_path / "b", "--verbose")
    assert quiet.returncode == 0 and verbose.returncode == 0, verbose.stderr
    # The C++ start-up lines the default output filters out.
    assert "absl::InitializeLog" not in quiet.stderr
    assert "absl::InitializeLog" in verbose.stderr
    assert len(verbose.stderr.splitlines()) > len(quiet.stderr.splitlines())
    both = _tiny_train(run_cli, tiny_npz, tmp_path / "c", "--quiet", "--verbose")
    assert_one_line_error(both, "--quiet and --verbose")
    assert not (tmp_path / "c").exists()


def test_a_terminal_gets_the_progress_bar_and_the_epoch_line(cli_env, tiny_npz, tmp_path):
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [str(EXECUTABLE), "train", "--set", f"data.path={tiny_npz}", "--set", "model.units=16",
         "--set", "train.epochs=2", "--run-dir", str(tmp_path / "run")],
        stdout=secondary,
        stderr=subprocess.PIPE,
        env=cli_env,
    )
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal's other end closed: the process has exited
            break
        if not chunk:
            break
        output += chunk
    os.close(primary)
    assert process.wait(timeout=120) == 0, process.stderr.read()
    text = output.decode()
    assert "Epoch 1/2" in text and "━" in text  # Keras's bar
    lines = [line.strip("\r") for line in re.split(r"[\r\n]+", text)]
    assert sum(bool(EPOCH_LINE.match(line)) for line in lines) == 2


# -------------------------------------------------------------------- curves.png


@needs_t10k
def test_curves_png_shows_training_and_validation_loss_and_accuracy(trained_run):
    run_dir, _, _ = trained_run
    with Image.open(run_dir / "curves.png") as image:
        assert image.format == "PNG" and image.size == (1000, 400)
        pixels = np.asarray(image.convert("RGB"))
    # Two panels (loss left, accuracy right), each with both lines.
    for panel in (pixels[:, :500], pixels[:, 500:]):
        assert _has_color(panel, TRAIN_COLOR) and _has_color(panel, VALIDATION_COLOR)


def test_curves_follow_the_history_values(tmp_path):
    """Lines drawn where the numbers say: a rising curve ends higher than it starts."""
    from mnist_mlp.plots import save_curves

    rows = [
        {"epoch": e, "loss": 1.0 / e, "accuracy": 0.5 + e / 40, "val_loss": 1.2 / e,
         "val_accuracy": 0.45 + e / 40}
        for e in range(1, 11)
    ]
    save_curves(rows, tmp_path / "curves.png")
    pixels = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB"))
    rows_of = lambda panel: np.nonzero(  # noqa: E731
        np.abs(panel.astype(int) - _rgb(TRAIN_COLOR)).sum(axis=-1) < 30
    )
    for panel, falling in ((pixels[:, :500], True), (pixels[:, 500:], False)):
        y, x = rows_of(panel)
        left = y[x < x.min() + 15].mean()
        right = y[x > x.max() - 15].mean()
        # Image rows grow downwards: a falling loss ends lower on screen (larger y).
        assert (right > left) == falling


# -------------------------------------------------------------------- TensorBoard


def _scalars(folder):
    import tensorflow as tf

    values = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    values.setdefault(value.tag, {})[event.step] = float(
                        tf.make_ndarray(value.tensor)
                    )
    return values


def test_tensorboard_logs_hold_each_epochs_metrics(run_cli, tiny_npz, tmp_path):
    run_dir = tmp_path / "run"
    result = _tiny_train(run_cli, tiny_npz, run_dir, "--set", "logging.tensorboard=true")
    assert result.returncode == 0, result.stderr
    history = read_history(run_dir / "history.csv")
    train = _scalars(run_dir / "tensorboard" / "train")
    validation = _scalars(run_dir / "tensorboard" / "validation")
    assert train["epoch_loss"] == pytest.approx({i: r["loss"] for i, r in enumerate(history)})
    assert validation["epoch_accuracy"] == pytest.approx(
        {i: r["val_accuracy"] for i, r in enumerate(history)}
    )


def test_tensorboard_without_the_package_is_refused_before_the_run(monkeypatch, tmp_path):
    import importlib.util

    from mnist_mlp.config import load_config
    from mnist_mlp.errors import InstallError
    from mnist_mlp.train import train

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    config = load_config(None, ["logging.tensorboard=true", "device=cpu"])
    with pytest.raises(InstallError, match=r'pip install "mnist-mlp\[tensorboard\]"'):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------- evaluation reports


@needs_t10k
def test_evaluate_report_matches_the_models_own_predictions(trained_run, run_cli, split_arrays):
    from mnist_mlp import runtime

    runtime.import_tensorflow()
    import keras

    run_dir, _, _ = trained_run
    result = run_cli("evaluate", "--checkpoint", run_dir / "model.keras", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    model = keras.saving.load_model(run_dir / "model.keras")
    x = split_arrays["x_test"].reshape(-1, 784).astype("float32") / 255
    probabilities = model.predict(x, batch_size=1000, verbose=0)
    predicted, labels = probabilities.argmax(axis=1), split_arrays["y_test"]

    matrix = np.array(report["confusion_matrix"])
    assert matrix.sum() == report["total"] == 2000
    assert np.trace(matrix) == report["correct"] == round(report["accuracy"] * 2000)
    expected = np.zeros((10, 10), int)
    np.add.at(expected, (labels, predicted), 1)
    assert (matrix == expected).all()
    for c, cls in enumerate(report["per_class"]):
        tp = ((predicted == c) & (labels == c)).sum()
        assert cls["precision"] == pytest.approx(tp / (predicted == c).sum())
        assert cls["recall"] == pytest.approx(tp / (labels == c).sum())
    # The mistakes are wrong, and no wrong image was more confident than the last kept.
    wrong = np.flatnonzero(predicted != labels)
    kept = report["mistakes"]
    assert len(kept) == min(25, len(wrong))
    assert all(predicted[m["index"]] == m["predicted"] != labels[m["index"]] for m in kept)
    threshold = kept[-1]["probability"]
    assert (probabilities[wrong].max(axis=1) > threshold + 1e-6).sum() < len(kept)


@needs_t10k
def test_evaluate_output_writes_readable_figures_and_refuses_to_overwrite(
    trained_run, run_cli, tmp_path
):
    run_dir, _, _ = trained_run
    out = tmp_path / "report"
    args = ("evaluate", "--checkpoint", run_dir / "model.keras", "--output", out)
    result = run_cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "report.json").read_text()) == json.loads(result.stdout)
    with Image.open(out / "confusion_matrix.png") as image:
        assert image.format == "PNG" and image.size == (700, 600)
        pixels = np.asarray(image.convert("RGB")).astype(int)
    # A 95%-accurate model: the ten darkest-blue cells (share > 0.9) are the diagonal,
    # running from top left to bottom right (true rows down, predicted columns across).
    # (Left of x=600: the colour bar on the right is dark blue at its top too.)
    dark = (pixels[..., 2] > 60) & (pixels[..., 0] < 40) & (pixels[..., 1] < 80)
    y, x = np.nonzero(dark[:, :600])
    assert len(y) > 1000 and np.corrcoef(x, y)[0, 1] > 0.98
    kept = len(json.loads(result.stdout)["mistakes"])
    with Image.open(out / "mistakes.png") as image:
        assert image.size == mistakes_size(kept)
        # Digits are drawn dark on white: a grid of kept tiles has plenty of ink.
        assert (np.asarray(image.convert("L")) < 64).mean() > 0.02
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_one_line_error(run_cli(*args), "already exists", "report.json")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    afile = tmp_path / "a-file"
    afile.write_text("keep me")
    assert_one_line_error(
        run_cli("evaluate", "--checkpoint", run_dir / "model.keras", "--output", afile),
        "is a file",
    )
    assert_one_line_error(
        run_cli("evaluate", "--checkpoint", run_dir / "model.keras", "--output", afile / "sub"),
        "is inside",
        "a file",
    )
    assert afile.read_text() == "keep me"


@needs_t10k
def test_two_checkpoints_side_by_side(trained_run, run_cli, split_idx_dir, tmp_path):
    run_dir, _, _ = trained_run
    # A genuinely different model on the same data: a swap of A and B would show.
    small = tmp_path / "small-run"
    result = run_cli(
        "train", "--set", f"data.path={split_idx_dir}", "--set", "model.units=8", "--set",
        "train.epochs=1", "--run-dir", small, "--quiet",
    )
    assert result.returncode == 0, result.stderr
    a, b = run_dir / "model.keras", small / "model.keras"
    single = [
        json.loads(run_cli("evaluate", "--checkpoint", c, "--json").stdout) for c in (a, b)
    ]
    assert single[0]["accuracy"] != single[1]["accuracy"]
    both = run_cli("evaluate", "--checkpoint", a, "--checkpoint", b, "--json")
    assert both.returncode == 0, both.stderr
    assert json.loads(both.stdout)["reports"] == single
    text = run_cli("evaluate", "--checkpoint", a, "--checkpoint", b, "--output", tmp_path / "o")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    accuracy = next(line for line in lines if line.startswith("accuracy"))
    assert accuracy.split()[1:] == [f"{r['accuracy']:.4f}" for r in single]
    start = lines.index(next(x for x in lines if x.startswith("confusion matrix B - A")))
    diff = [[int(v) for v in line.split()[1:]] for line in lines[start + 2 : start + 12]]
    expected = np.array(single[1]["confusion_matrix"]) - np.array(single[0]["confusion_matrix"])
    assert (np.array(diff) == expected).all()
    folders = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert folders == ["1-quick-run-model", "2-small-run-model"]
    for folder, report in zip(folders, single, strict=True):
        saved = json.loads((tmp_path / "o" / folder / "report.json").read_text())
        assert saved["confusion_matrix"] == report["confusion_matrix"]
    again = run_cli("evaluate", "--checkpoint", a, "--checkpoint", f"{run_dir}/./model.keras")
    assert_one_line_error(again, "is the same file as")


def test_checkpoints_trained_on_different_data_are_not_compared_silently(
    run_cli, tiny_npz, tmp_path
):
    other = tmp_path / "other.npz"
    np.savez(other, **synthetic_arrays(n_train=128, n_test=32, seed=1))
    for name, data in (("a", tiny_npz), ("b", other)):
        result = run_cli(
            "train", "--set", f"data.path={data}", "--set", "model.units=8", "--set",
            "train.epochs=1", "--run-dir", tmp_path / name, "--quiet",
        )
        assert result.returncode == 0, result.stderr
    result = run_cli(
        "evaluate", "--checkpoint", tmp_path / "a" / "model.keras",
        "--checkpoint", tmp_path / "b" / "model.keras",
    )
    assert_one_line_error(result, "different data", "--data-path")
    # On one named test set they compare fine.
    result = run_cli(
        "evaluate", "--checkpoint", tmp_path / "a" / "model.keras",
        "--checkpoint", tmp_path / "b" / "model.keras", "--data-path", other, "--json",
    )
    assert result.returncode == 0, result.stderr
    assert [r["total"] for r in json.loads(result.stdout)["reports"]] == [32, 32]


# ------------------------------------------------------------ predict and export


@needs_t10k
def test_predict_on_digits_saved_as_images_agrees_with_the_arrays(
    trained_run, run_cli, split_arrays, tmp_path
):
    from mnist_mlp import runtime

    runtime.import_tensorflow()
    import keras

    run_dir, _, _ = trained_run
    model = keras.saving.load_model(run_dir / "model.keras")
    digits = split_arrays["x_test"][:40]
    expected = model.predict(digits.reshape(-1, 784) / 255.0, verbose=0).argmax(axis=1)
    inputs = []
    for i, digit in enumerate(digits):
        image = Image.fromarray(digit)
        if i % 2:  # a scan: dark ink on light paper, 3x larger
            image = Image.fromarray(255 - digit).resize((84, 84), Image.Resampling.BICUBIC)
        inputs.append(tmp_path / f"digit-{i}.{'jpg' if i % 4 == 3 else 'png'}")
        image.save(inputs[-1], quality=95)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a digit\n")
    array = tmp_path / "batch.npy"
    np.save(array, split_arrays["x_test"][40:50].reshape(10, 784))
    result = run_cli(
        "predict", "--checkpoint", run_dir / "model.keras", *inputs[:20], notes, array,
        *inputs[20:], "--json",
    )
    assert_one_line_error(result, "notes.txt", "not an image")  # exit 2, the rest classified
    document = json.loads(result.stdout)
    predictions = document["predictions"]
    assert [p["input"] for p in predictions] == (
        [str(p) for p in inputs[:20]] + [str(array)] * 10 + [str(p) for p in inputs[20:]]
    )
    images = predictions[:20] + predictions[30:]
    agree = np.mean([p["digit"] == e for p, e in zip(images, expected, strict=True)])
    assert agree >= 0.9, agree  # re-centring moves some digits by a pixel
    rows = model.predict(split_arrays["x_test"][40:50].reshape(-1, 784) / 255.0, verbose=0)
    assert [p["index"] for p in predictions[20:30]] == list(range(10))
    assert [p["digit"] for p in predictions[20:30]] == rows.argmax(axis=1).tolist()
    for p in predictions:
        top = [t["probability"] for t in p["top"]]
        assert len(top) == 3 and top == sorted(top, reverse=True) and top[0] <= 1.0
    assert document["errors"][0]["input"] == str(notes)


def _run_with_own_runtime(fmt, path, x):
    """Each export loaded as a deployment would, without the project's code."""
    if fmt == "savedmodel":
        import tensorflow as tf

        loaded = tf.saved_model.load(str(path))  # kept: its variables die with it
        return loaded.serve(tf.constant(x)).numpy()
    if fmt == "tflite":
        interpreter = pytest.importorskip("ai_edge_litert.interpreter").Interpreter(str(path))
        (source,), (result,) = interpreter.get_input_details(), interpreter.get_output_details()
        interpreter.resize_tensor_input(source["index"], list(x.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(source["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(result["index"])
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@needs_t10k
@pytest.mark.parametrize(
    ("fmt", "name", "runtime_name"),
    [
        ("savedmodel", "served", "tf.saved_model"),
        ("tflite", "model.tflite", "ai_edge_litert"),
        ("onnx", "model.onnx", "onnxruntime"),
    ],
)
def test_export_from_the_cli_runs_the_same_in_its_own_runtime(
    trained_run, run_cli, split_arrays, tmp_path, fmt, name, runtime_name
):
    from mnist_mlp import runtime

    runtime.import_tensorflow()
    import keras

    run_dir, _, _ = trained_run
    output = tmp_path / name
    args = ("export", "--checkpoint", run_dir / "model.keras", "--format", fmt)
    result = run_cli(*args, "--output", output)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"exported {fmt} to {output} (")
    checked = re.search(r"checked with (\S+) on 100 inputs: max \|difference\| to Keras (\S+) ",
                        result.stdout)
    assert checked and checked[1] == runtime_name and float(checked[2]) < 1e-5
    x = (split_arrays["x_test"][:100].reshape(-1, 784) / 255.0).astype("float32")
    reference = keras.saving.load_model(run_dir / "model.keras").predict(x, verbose=0)
    assert np.abs(_run_with_own_runtime(fmt, output, x) - reference).max() < 1e-5
    before = sorted((p.name, p.stat().st_size) for p in tmp_path.rglob("*"))
    assert_one_line_error(run_cli(*args, "--output", output), "already exists", "never overwrites")
    assert sorted((p.name, p.stat().st_size) for p in tmp_path.rglob("*")) == before


@needs_t10k
def test_export_json_reports_the_check(trained_run, run_cli, tmp_path):
    run_dir, _, _ = trained_run
    result = run_cli(
        "export", "--checkpoint", run_dir / "model.keras", "--format", "onnx", "--output",
        tmp_path / "m.onnx", "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["verified_with"] == "onnxruntime" and report["samples_compared"] == 100
    assert 0 <= report["max_abs_diff"] < 1e-5
    assert report["size_bytes"] == (tmp_path / "m.onnx").stat().st_size


@needs_t10k
def test_predict_survives_hostile_inputs_and_refuses_a_bad_checkpoint(
    trained_run, run_cli, split_arrays, tmp_path
):
    import numpy.lib.format as npy_format

    run_dir, _, _ = trained_run
    good = tmp_path / "good.npy"
    np.save(good, split_arrays["x_test"][:2])
    huge = tmp_path / "huge.npy"  # 1 kB on disk, a header claiming 7 TiB
    with open(huge, "wb") as handle:
        npy_format.write_array_header_1_0(
            handle, {"descr": "<f4", "fortran_order": False, "shape": (10**10, 784)}
        )
        handle.write(b"\0" * 1000)
    long_name = tmp_path / ("x" * 300 + ".png")
    result = run_cli("predict", "--checkpoint", run_dir / "model.keras", huge, long_name, good)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = result.stderr.splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)
    assert "huge.npy: truncated .npy file" in errors[0]
    assert "cannot access (File name too long)" in errors[1]
    assert [line.split()[0] for line in result.stdout.splitlines()] == [
        f"{good}[0]", f"{good}[1]"
    ]
    bad = run_cli("predict", "--checkpoint", good, good)
    assert_one_line_error(bad, "good.npy", "not a Keras model file")
