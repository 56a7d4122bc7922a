"""Exporting a checkpoint for serving: SavedModel, TFLite (LiteRT) or ONNX, checked before kept.

The conversion is Keras's own `Model.export`; what this module adds is the
contract around it: never overwrite, write atomically (a hidden staging folder
beside the output, renamed into place only once complete), keep the exporters'
console chatter out of the CLI's output, and run the artifact with its own
runtime to check that it computes what the Keras model computes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_mlp import runtime
from mnist_mlp.data import INPUT_DIM
from mnist_mlp.errors import MnistMlpError

# The CLI's --format names, mapped to Keras's `Model.export(format=...)` names.
KERAS_FORMATS = {"savedmodel": "tf_saved_model", "tflite": "litert", "onnx": "onnx"}
FORMATS = tuple(KERAS_FORMATS)

# The exported graph runs the same float32 ops as Keras; a correct export differs by
# rounding (about 1e-7 on softmax outputs). 1e-5 leaves room for a runtime that
# fuses or reorders ops, and is still far below anything that changes a prediction.
TOLERANCE = 1e-5

# Enough rows to exercise the batch dimension; few enough to check in milliseconds.
DEFAULT_SAMPLES = 100

ONNX_INSTALL_HINT = 'pip install "mnist-mlp[onnx]"'

# Name of the artifact inside the staging folder: Keras's litert exporter
# refuses a file name that does not end in .tflite.
_STAGED_NAMES = {"savedmodel": "model", "tflite": "model.tflite", "onnx": "model.onnx"}


class ExportError(MnistMlpError):
    """The export cannot be done as asked (format, output path, missing packages)."""


class ExportVerificationError(ExportError):
    """The exported model does not compute what the Keras model computes."""

    # The input was fine; the conversion was not (like a failed training run).
    exit_code = 1


@dataclass(frozen=True)
class ExportResult:
    """What `export_model` wrote and how it was checked."""

    format: str  # one of FORMATS
    output: str  # the file (tflite, onnx) or folder (savedmodel) written
    checkpoint: str
    size_bytes: int  # for a folder, the sum over its files
    verified_with: str | None  # the runtime that ran the artifact; None: not checked
    samples_compared: int
    max_abs_diff: float | None  # largest |exported - Keras| over all outputs; None: not checked
    tolerance: float
    not_verified_reason: str | None = None  # set when verified_with is None

    def as_dict(self) -> dict:
        return {
            "format": self.format,
            "output": self.output,
            "checkpoint": self.checkpoint,
            "size_bytes": self.size_bytes,
            "verified_with": self.verified_with,
            "samples_compared": self.samples_compared,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "not_verified_reason": self.not_verified_reason,
        }


def sample_inputs(n: int = DEFAULT_SAMPLES, seed: int = 0) -> np.ndarray:
    """Seeded synthetic images on the preprocessing grid (k/255), shape (n, 784), float32.

    Random pixels rather than digits: the check is that two programs compute the
    same function, which needs no real data, and this always works offline.
    """
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, INPUT_DIM)) / 255.0).astype("float32")


def verification_runtime(fmt: str) -> str | None:
    """The runtime `run_exported` uses for `fmt`, or None if it is not installed."""
    if fmt == "savedmodel":
        return "tf.saved_model"
    if fmt == "tflite":
        # LiteRT is the maintained home of the TFLite interpreter; tf.lite's copy
        # is deprecated but ships with TensorFlow, so there is always one.
        return "ai_edge_litert" if _installed("ai_edge_litert") else "tf.lite"
    if fmt == "onnx":
        return "onnxruntime" if _installed("onnxruntime") else None
    raise ExportError(_unknown_format(fmt))


def run_exported(fmt: str, path: str | Path, x: np.ndarray) -> np.ndarray:
    """Load an exported model with its format's own runtime and run it on `x`, on the CPU.

    Args:
        fmt: one of FORMATS.
        path: the exported file (tflite, onnx) or folder (savedmodel).
        x: inputs, shape (N, 784), float32; any N >= 1 (the batch size is dynamic).

    Returns:
        The class probabilities, shape (N, 10), float32.
    """
    runner = {"savedmodel": _run_savedmodel, "tflite": _run_tflite, "onnx": _run_onnx}.get(fmt)
    if runner is None:
        raise ExportError(_unknown_format(fmt))
    return runner(Path(path), np.ascontiguousarray(x, dtype="float32"))


def export_model(
    checkpoint: str | Path,
    fmt: str,
    output: str | Path,
    device: str = "auto",
    inputs: np.ndarray | None = None,
    quiet: bool = True,
) -> ExportResult:
    """Export a saved Keras model to `fmt` at `output`, then check the artifact runs the same.

    `output` must not exist; missing parent folders are created (and removed again
    if the export fails). Any file name is accepted: for tflite the name need not
    end in .tflite, since the artifact is staged under a name Keras accepts and
    renamed. On any failure, Ctrl-C included, nothing is left at `output`.

    Args:
        checkpoint: a .keras (or .h5) model taking 784 inputs and giving 10 outputs.
        fmt: "savedmodel" (a folder), "tflite" (a file) or "onnx" (a file).
        output: where to write the artifact.
        device: "auto", "cpu" or "gpu", as for the other commands. The comparison
            itself always runs on the CPU (see `_keras_outputs`).
        inputs: rows (N, 784) to compare on; default: `sample_inputs()`.
        quiet: hide what Keras, the converters and the runtimes print (False for
            the CLI's --verbose, to see their logs).

    Returns:
        An ExportResult. `max_abs_diff` is None when the format's runtime is not
        installed (onnxruntime), with the reason in `not_verified_reason`.

    Raises:
        ExportError: unknown format, output exists, missing packages, unwritable folder.
        ExportVerificationError: the artifact's outputs differ by more than TOLERANCE.
        CheckpointError: the checkpoint is missing or not a usable model.
    """
    from mnist_mlp.evaluate import load_checkpoint

    # Every check that needs no TensorFlow comes first, so a mistake answers at once.
    output = Path(output)
    x = _check_request(fmt, output, inputs)
    runtime.select_device(device)
    runtime.import_tensorflow()
    model = load_checkpoint(checkpoint)
    checker = verification_runtime(fmt)
    diff = _export_checked(model, fmt, output, x if checker else None, quiet)
    reason = None if checker else f"onnxruntime is not installed: {ONNX_INSTALL_HINT}"
    return ExportResult(
        format=fmt,
        output=str(output),
        checkpoint=str(checkpoint),
        size_bytes=_size(output),
        verified_with=checker,
        samples_compared=len(x) if checker else 0,
        max_abs_diff=diff,
        tolerance=TOLERANCE,
        not_verified_reason=reason,
    )


def _check_request(fmt: str, output: Path, inputs: np.ndarray | None) -> np.ndarray:
    """Refuse what cannot work before any work is done; return the comparison inputs."""
    if fmt not in KERAS_FORMATS:
        raise ExportError(_unknown_format(fmt))
    _check_output(output)
    if fmt == "onnx" and not (_installed("tf2onnx") and _installed("onnx")):
        raise ExportError(f"export --format onnx needs tf2onnx and onnx: {ONNX_INSTALL_HINT}")
    return sample_inputs() if inputs is None else _check_inputs(inputs)


def _export_checked(
    model, fmt: str, output: Path, x: np.ndarray | None, quiet: bool
) -> float | None:
    """Export into a hidden staging folder beside `output`, compare on `x`, rename into place.

    Returns:
        The max |difference| to the Keras model on `x`; None when `x` is None (not checked).
    """
    import tensorflow as tf

    # Always computed: Keras's onnx exporter also refuses a model never called.
    expected = _keras_outputs(model, sample_inputs(1) if x is None else x)
    created = _make_parents(output.parent)
    staging = None
    done = False
    try:
        staging = Path(
            tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".export", dir=output.parent)
        )
        staged = staging / _STAGED_NAMES[fmt]
        with _captured_output() if quiet else contextlib.nullcontext():
            model.export(str(staged), format=KERAS_FORMATS[fmt], verbose=False)
            try:
                actual = None if x is None else run_exported(fmt, staged, x)
            except (RuntimeError, ValueError) as err:
                # e.g. a GRU's tflite file needs TensorFlow's Flex ops, which the
                # built-in interpreter lacks: the file would not run where tflite runs.
                first = (str(err).splitlines() or [""])[0].split(". ")[0][:200]
                failure = ExportError(
                    f"the exported {fmt} model does not run in {verification_runtime(fmt)} "
                    f"({first}); nothing was written to {output}; export this model in "
                    "another format"
                )
                failure.exit_code = 1
                raise failure from None
        diff = None if actual is None else _max_abs_diff(expected, actual)
        if diff is not None and not diff <= TOLERANCE:  # `not <=`: a NaN fails too
            raise ExportVerificationError(
                f"the exported {fmt} model disagrees with the Keras model: max |difference| "
                f"{diff:.2e} over {len(x)} inputs (tolerance {TOLERANCE:.0e}); nothing was "
                f"written to {output}; please report this with your TensorFlow and Keras versions"
            )
        _fsync_tree(staged)
        if os.path.lexists(output):
            raise ExportError(_exists_message(output, "appeared while exporting"))
        os.rename(staged, output)
        _fsync_dir(output.parent)
        done = True
    except ImportError as err:
        # find_spec saw the package, but it does not import (a broken or mismatched install).
        extra = "[onnx]" if fmt == "onnx" else ""
        raise ExportError(
            f"the {fmt} exporter could not load {err.name or 'a module'} ({err}); reinstall: "
            f'pip install --force-reinstall "mnist-mlp{extra}"'
        ) from None
    except OSError as err:
        raise ExportError(
            f"cannot write {output}: {err.strerror or err}; check the folder's permissions "
            "and free space, or choose another --output"
        ) from None
    except tf.errors.OpError as err:
        first = (err.message.splitlines() or [""])[0][:200]
        failure = ExportError(
            f"TensorFlow failed exporting to {fmt}: {type(err).__name__}: {first}"
        )
        failure.exit_code = 1  # the input was fine; the run was not (as for TrainingError)
        raise failure from None
    finally:
        # Also on Ctrl-C: the staging folder (and any partial artifact in it) goes,
        # and so do the parent folders this call created.
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if not done:
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()
    return diff


def _unknown_format(fmt: str) -> str:
    return f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}"


def _exists_message(output: Path, how: str = "already exists") -> str:
    return f"{output} {how}; export never overwrites: choose another --output or remove it"


def _installed(module: str) -> bool:
    # find_spec, not import: tf2onnx and onnxruntime take seconds to import.
    return importlib.util.find_spec(module) is not None


def _check_output(output: Path) -> None:
    # lexists: a dangling symlink is something there too; writing through it is a surprise.
    if os.path.lexists(output):
        raise ExportError(_exists_message(output))
    parent = output.parent
    for folder in (parent, *parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ExportError(
                    f"{folder} is a file, so {output} cannot be created in it; "
                    "choose another --output"
                )
            return


def _check_inputs(inputs: np.ndarray) -> np.ndarray:
    x = np.asarray(inputs)
    if x.ndim != 2 or x.shape[1] != INPUT_DIM or len(x) == 0:
        raise ExportError(
            f"comparison inputs have shape {x.shape}; expected (N, {INPUT_DIM}) with N >= 1, "
            "preprocessed images as `mnist_mlp.data.preprocess` makes them"
        )
    return np.ascontiguousarray(x, dtype="float32")


def _keras_outputs(model, x: np.ndarray) -> np.ndarray:
    """The Keras model's outputs on the CPU, where the exported runtimes run too.

    On a GPU, TensorFlow multiplies in TF32 by default (about 1e-3 relative error),
    which would make a faithful export fail the check.
    """
    import tensorflow as tf

    with tf.device("/CPU:0"):
        return model(tf.constant(x), training=False).numpy()


def _max_abs_diff(expected: np.ndarray, actual: np.ndarray) -> float:
    if actual.shape != expected.shape:
        raise ExportVerificationError(
            f"the exported model gives outputs of shape {actual.shape}, the Keras model "
            f"{expected.shape}; please report this with your TensorFlow and Keras versions"
        )
    diff = np.abs(expected.astype("float64") - actual.astype("float64"))
    # A NaN in both (a diverged checkpoint) is reproduced faithfully, not a mismatch.
    diff[np.isnan(expected) & np.isnan(actual)] = 0.0
    return float(diff.max())


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and missing parents; return those created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    missing.reverse()
    try:
        for path in missing:
            path.mkdir()
    except OSError as err:
        for path in reversed(missing):
            with contextlib.suppress(OSError):
                path.rmdir()
        raise ExportError(
            f"cannot create folder {path}: {err.strerror or err}; choose another --output"
        ) from None
    return missing


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _fsync_tree(path: Path) -> None:
    """Flush the artifact to disk before it appears under its final name."""
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    # The rename must reach the disk too, or a power loss can undo it.
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


@contextlib.contextmanager
def _captured_output() -> Iterator[None]:
    """Collect what the exporters and runtimes print, so the CLI prints one summary.

    Keras's tf2onnx patch warns (a numpy FutureWarning), tf2onnx logs, and the TFLite
    converter and interpreters write C++ lines straight to file descriptors 1 and 2,
    which runtime.quiet_tensorflow() passes through (it drops only known start-up
    lines). The verification after the export is what tells whether it worked.
    If the export raises something unexpected, the collected text is replayed to
    stderr, so the cause is not hidden.
    """
    python_level = io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        saved = _redirect_fds(sink.fileno())
        tf2onnx_logger = logging.getLogger("tf2onnx")
        level = tf2onnx_logger.level
        tf2onnx_logger.setLevel(logging.ERROR)
        try:
            with (
                contextlib.redirect_stdout(python_level),
                contextlib.redirect_stderr(python_level),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("ignore")
                yield
        except (MnistMlpError, OSError, ImportError):
            raise  # reported as one line by the caller; the exporters' text adds nothing
        except Exception:
            _restore_fds(saved)
            saved = []
            sink.seek(0)
            sys.stderr.write(sink.read().decode("utf-8", errors="replace"))
            sys.stderr.write(python_level.getvalue())
            sys.stderr.flush()
            raise
        finally:
            tf2onnx_logger.setLevel(level)
            _restore_fds(saved)


def _redirect_fds(target: int) -> list[tuple[int, int]]:
    saved = []
    for fd in (1, 2):
        try:
            saved.append((fd, os.dup(fd)))
        except OSError:  # no such descriptor (embedded interpreter): nothing to redirect
            continue
        os.dup2(target, fd)
    return saved


def _restore_fds(saved: list[tuple[int, int]]) -> None:
    for fd, copy in saved:
        os.dup2(copy, fd)
        os.close(copy)


def _run_savedmodel(path: Path, x: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    with tf.device("/CPU:0"):
        # `serve` is the endpoint Keras's export writes (also signature serving_default).
        loaded = tf.saved_model.load(str(path))
        return loaded.serve(tf.constant(x)).numpy()


def _run_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    if _installed("ai_edge_litert"):
        from ai_edge_litert.interpreter import Interpreter
    else:
        import tensorflow as tf

        # (A class, named as the library names it.)
        Interpreter = getattr(tf.lite, "Interpreter", None)  # noqa: N806
        if Interpreter is None:  # TensorFlow has announced its removal
            raise ExportError(
                "this TensorFlow has no tf.lite.Interpreter to check the tflite export with: "
                "pip install ai-edge-litert"
            )
    with warnings.catch_warnings():
        # tf.lite.Interpreter's deprecation notice; the fallback is deliberate.
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        interpreter = Interpreter(model_path=str(path))
    (source,) = interpreter.get_input_details()
    (result,) = interpreter.get_output_details()
    # The file is saved with batch size 1 (shape_signature -1): resize to N first.
    interpreter.resize_tensor_input(source["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], x)
    interpreter.invoke()
    return np.array(interpreter.get_tensor(result["index"]))


def _run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only; warnings would reach the terminal
    # CPU explicitly: onnxruntime-gpu would otherwise pick CUDA, and TF32 with it.
    session = onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    (source,) = session.get_inputs()
    return session.run(None, {source.name: x})[0]
