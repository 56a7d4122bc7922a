"""Export: each format runs in its own runtime and matches Keras; refusals leave no trace."""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from mnist_mlp import export, runtime
from mnist_mlp.config import MlpConfig, TrainConfig
from mnist_mlp.errors import CheckpointError
from mnist_mlp.export import ExportError, ExportVerificationError, export_model, sample_inputs
from mnist_mlp.model import build_model, compile_model

# The runtime each test loads the artifact with, independently of mnist_mlp.export.
RUNTIME_PACKAGE = {"savedmodel": "tensorflow", "tflite": "ai_edge_litert", "onnx": "onnxruntime"}
OUTPUT_NAME = {"savedmodel": "model_savedmodel", "tflite": "model.tflite", "onnx": "model.onnx"}


@pytest.fixture(scope="module")
def keras():
    runtime.select_device("cpu")
    runtime.import_tensorflow()
    import keras

    return keras


@pytest.fixture(scope="module")
def checkpoint(keras, tmp_path_factory) -> Path:
    """A small trained model: weights moved away from their initial values."""
    keras.utils.set_random_seed(0)
    model = build_model(MlpConfig(units=64))
    compile_model(model, TrainConfig(learning_rate=0.01))
    rng = np.random.default_rng(1)
    x = rng.random((512, 784), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, size=512), 10)
    path = tmp_path_factory.mktemp("export-model") / "model.keras"
    with warnings.catch_warnings():
        # Keras's fit and save under numpy 2 (EagerTensor.__array__ without `copy`).
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        model.fit(x, y, batch_size=64, epochs=2, verbose=0)
        model.save(path)
    return path


@pytest.fixture(scope="module")
def reference(keras, checkpoint):
    """The checkpoint's own predictions: what every export must reproduce."""
    model = keras.saving.load_model(checkpoint, compile=False)
    return lambda x: model.predict(x, batch_size=1000, verbose=0)


@pytest.fixture(params=["synthetic", "mnist"])
def images(request) -> tuple[str, np.ndarray | None, np.ndarray]:
    """(name, inputs to pass to export_model, the 100 rows it compares on)."""
    if request.param == "synthetic":
        return "synthetic", None, sample_inputs()
    x, _ = request.getfixturevalue("t10k")
    rows = (x[:100].reshape(100, 784) / 255.0).astype("float32")
    return "mnist", rows, rows


def run_independently(fmt: str, path: Path, x: np.ndarray) -> np.ndarray:
    """Run an exported model with its runtime's plain API, not mnist_mlp.export's runners."""
    if fmt == "savedmodel":
        import tensorflow as tf

        loaded = tf.saved_model.load(str(path))
        spec = loaded.signatures["serving_default"].structured_input_signature[1]["pixels"]
        assert spec.shape.as_list() == [None, 784], "batch dimension must stay dynamic"
        return loaded.serve(tf.constant(x)).numpy()
    if fmt == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path))
        (source,) = interpreter.get_input_details()
        assert list(source["shape_signature"]) == [-1, 784], "batch dimension must stay dynamic"
        interpreter.resize_tensor_input(source["index"], list(x.shape))
        interpreter.allocate_tensors()
        interpreter.set_tensor(source["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (source,) = session.get_inputs()
    assert not isinstance(source.shape[0], int) and source.shape[1] == 784, source.shape
    return session.run(None, {source.name: x})[0]


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_export_matches_keras_in_the_formats_own_runtime(
    fmt, images, checkpoint, reference, tmp_path, capfd
):
    pytest.importorskip(RUNTIME_PACKAGE[fmt], reason=f"{fmt} runtime not installed")
    _, inputs, x = images
    output = tmp_path / OUTPUT_NAME[fmt]
    capfd.readouterr()

    result = export_model(checkpoint, fmt, output, device="cpu", inputs=inputs)

    # The exporters' chatter (converter logs, warnings) must not reach the terminal.
    assert capfd.readouterr() == ("", "")
    expected = reference(x)
    actual = run_independently(fmt, output, x)
    assert actual.shape == (100, 10)
    measured = float(np.abs(actual - expected).max())
    assert measured < export.TOLERANCE
    single = run_independently(fmt, output, x[:1])
    assert single.shape == (1, 10)
    np.testing.assert_allclose(single, expected[:1], rtol=0, atol=export.TOLERANCE)
    # The recorded check is the one just repeated: same runtime, same inputs.
    assert result.max_abs_diff is not None and result.max_abs_diff < export.TOLERANCE
    assert result.max_abs_diff == pytest.approx(measured, abs=1e-6)
    assert result.samples_compared == 100
    assert result.verified_with == {"savedmodel": "tf.saved_model"}.get(fmt, RUNTIME_PACKAGE[fmt])
    assert result.output == str(output) and result.format == fmt
    files = list(output.rglob("*")) if output.is_dir() else [output]
    assert result.size_bytes == sum(f.stat().st_size for f in files if f.is_file()) > 0
    assert result.as_dict()["max_abs_diff"] == result.max_abs_diff
    # Only the artifact itself is left in the folder: no staging leftovers.
    assert sorted(p.name for p in tmp_path.iterdir()) == [output.name]


def test_artifacts_have_their_formats_layout(checkpoint, tmp_path):
    onnx = pytest.importorskip("onnx")
    export_model(checkpoint, "savedmodel", tmp_path / "sm", device="cpu")
    export_model(checkpoint, "tflite", tmp_path / "m.tflite", device="cpu")
    export_model(checkpoint, "onnx", tmp_path / "m.onnx", device="cpu")

    assert (tmp_path / "sm" / "saved_model.pb").is_file()
    assert (tmp_path / "sm" / "variables").is_dir()
    assert (tmp_path / "m.tflite").read_bytes()[4:8] == b"TFL3"  # the flatbuffer identifier
    onnx.checker.check_model(onnx.load(tmp_path / "m.onnx"))


def test_tflite_accepts_any_file_name_and_creates_parents(checkpoint, tmp_path):
    pytest.importorskip("ai_edge_litert")
    output = tmp_path / "new" / "deeper" / "digits.bin"

    result = export_model(checkpoint, "tflite", output, device="cpu")

    assert output.is_file() and result.output == str(output)
    assert sorted(p.name for p in output.parent.iterdir()) == ["digits.bin"]
    x = sample_inputs(7, seed=3)
    np.testing.assert_allclose(
        export.run_exported("tflite", output, x),
        run_independently("tflite", output, x),
        rtol=0,
        atol=1e-7,
    )


def test_onnx_without_onnxruntime_exports_but_says_it_did_not_check(
    checkpoint, tmp_path, monkeypatch
):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else real(name, *a),
    )

    result = export_model(checkpoint, "onnx", tmp_path / "m.onnx", device="cpu")

    assert (tmp_path / "m.onnx").is_file()
    assert result.verified_with is None and result.max_abs_diff is None
    assert result.samples_compared == 0
    assert 'pip install "mnist-mlp[onnx]"' in result.not_verified_reason


@pytest.mark.parametrize("missing", ["tf2onnx", "onnx"])
def test_onnx_without_converter_packages_is_refused_before_any_work(missing, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a)
    )

    # The checkpoint does not exist: the package check must come before loading it.
    with pytest.raises(ExportError) as caught:
        export_model(tmp_path / "absent.keras", "onnx", tmp_path / "out" / "m.onnx")

    message = str(caught.value)
    assert message == ('export --format onnx needs tf2onnx and onnx: pip install "mnist-mlp[onnx]"')
    assert caught.value.exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_lists_the_formats(tmp_path):
    with pytest.raises(ExportError) as caught:
        export_model(tmp_path / "absent.keras", "coreml", tmp_path / "m.mlmodel")
    message = str(caught.value)
    assert "'coreml'" in message and "savedmodel, tflite, onnx" in message
    assert "\n" not in message


@pytest.mark.parametrize("kind", ["file", "folder", "dangling symlink"])
def test_existing_output_is_refused_and_left_untouched(kind, checkpoint, tmp_path):
    output = tmp_path / "model.onnx"
    if kind == "file":
        output.write_bytes(b"someone's model")
    elif kind == "folder":
        output.mkdir()
        (output / "keep.txt").write_bytes(b"keep me")
    else:
        output.symlink_to(tmp_path / "nowhere")

    with pytest.raises(ExportError) as caught:
        export_model(checkpoint, "onnx", output, device="cpu")

    message = str(caught.value)
    assert str(output) in message and "already exists" in message
    assert "choose another --output or remove it" in message
    if kind == "file":
        assert output.read_bytes() == b"someone's model"
    elif kind == "folder":
        assert [p.name for p in output.iterdir()] == ["keep.txt"]
        assert (output / "keep.txt").read_bytes() == b"keep me"
    else:
        assert output.is_symlink() and not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_bad_checkpoint_is_a_checkpoint_error_and_creates_nothing(tmp_path):
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip archive")
    output = tmp_path / "new" / "model.tflite"

    with pytest.raises(CheckpointError, match="not a valid .keras archive"):
        export_model(broken, "tflite", output, device="cpu")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        export_model(tmp_path / "absent.keras", "tflite", output, device="cpu")

    # Parent folders are only created once every check has passed.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.keras"]


def test_output_under_a_file_is_refused(checkpoint, tmp_path):
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_model(checkpoint, "tflite", tmp_path / "plain" / "m.tflite", device="cpu")


def test_comparison_inputs_of_the_wrong_shape_are_refused(checkpoint, tmp_path):
    with pytest.raises(ExportError, match=r"shape \(5, 28, 28\)"):
        export_model(checkpoint, "tflite", tmp_path / "m.tflite", inputs=np.zeros((5, 28, 28)))


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError("converter crashed"),
        OSError(errno.ENOSPC, "No space left"),
        KeyboardInterrupt(),
    ],
    ids=["crash", "disk-full", "ctrl-c"],
)
@pytest.mark.parametrize("fmt", ["savedmodel", "tflite"])
def test_failure_mid_export_leaves_nothing(
    fmt, failure, keras, checkpoint, tmp_path, monkeypatch, capfd
):
    def half_written(self, filepath, format="tf_saved_model", verbose=None, **kwargs):
        # Write part of an artifact where Keras was told to, then fail.
        print("converter: step 3 of 5")
        path = Path(filepath)
        if format == "tf_saved_model":
            (path / "variables").mkdir(parents=True)
            (path / "saved_model.pb").write_bytes(b"partial")
        else:
            path.write_bytes(b"TFL3 partial")
        raise failure

    monkeypatch.setattr(keras.Model, "export", half_written)
    output = tmp_path / "new" / OUTPUT_NAME[fmt]

    expected = ExportError if isinstance(failure, OSError) else type(failure)
    with pytest.raises(expected) as caught:
        export_model(checkpoint, fmt, output, device="cpu")

    if isinstance(failure, OSError):
        assert "No space left" in str(caught.value) and str(output) in str(caught.value)
    # What the exporter printed is shown only when it may explain an unexpected crash.
    replayed = "converter: step 3 of 5" in capfd.readouterr().err
    assert replayed == isinstance(failure, RuntimeError)
    # No artifact, no hidden staging folder, and not even the parent this call made.
    assert list(tmp_path.iterdir()) == []


def test_tensorflow_failure_is_one_line_with_exit_code_1(keras, checkpoint, tmp_path, monkeypatch):
    import tensorflow as tf

    def out_of_memory(self, filepath, *args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM allocating\nstack trace")

    monkeypatch.setattr(keras.Model, "export", out_of_memory)
    with pytest.raises(ExportError) as caught:
        export_model(checkpoint, "onnx", tmp_path / "m.onnx", device="cpu")

    assert str(caught.value) == (
        "TensorFlow failed exporting to onnx: ResourceExhaustedError: OOM allocating"
    )
    assert caught.value.exit_code == 1
    assert list(tmp_path.iterdir()) == []


def test_not_quiet_lets_the_exporters_output_through(
    keras, checkpoint, tmp_path, monkeypatch, capfd
):
    real_export = keras.Model.export

    def chatty(self, filepath, *args, **kwargs):
        print("converter: hello")
        return real_export(self, filepath, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "export", chatty)
    export_model(checkpoint, "savedmodel", tmp_path / "quiet", device="cpu")
    assert "converter: hello" not in capfd.readouterr().out
    export_model(checkpoint, "savedmodel", tmp_path / "loud", device="cpu", quiet=False)
    assert "converter: hello" in capfd.readouterr().out


def test_verification_mismatch_is_an_error_and_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    real_run = export.run_exported
    monkeypatch.setattr(
        export, "run_exported", lambda fmt, path, x: real_run(fmt, path, x) + np.float32(1e-3)
    )
    (tmp_path / "other.txt").write_text("unrelated")
    output = tmp_path / "model.onnx"

    with pytest.raises(ExportVerificationError) as caught:
        export_model(checkpoint, "onnx", output, device="cpu")

    message = str(caught.value)
    assert "disagrees with the Keras model" in message and "1.00e-03" in message
    assert "over 100 inputs" in message and "\n" not in message
    assert caught.value.exit_code == 1
    assert sorted(os.listdir(tmp_path)) == ["other.txt"]


def test_nan_outputs_fail_the_check(checkpoint, tmp_path, monkeypatch):
    real_run = export.run_exported

    def nan_in_one_place(fmt, path, x):
        out = real_run(fmt, path, x)
        out[3, 4] = np.nan
        return out

    monkeypatch.setattr(export, "run_exported", nan_in_one_place)
    with pytest.raises(ExportVerificationError, match=re.escape("max |difference| nan")):
        export_model(checkpoint, "savedmodel", tmp_path / "sm", device="cpu")
    assert list(tmp_path.iterdir()) == []
