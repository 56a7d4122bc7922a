"""Scoring a model on a split, and loading a saved checkpoint to score it.

`score` is the one function that turns a model and a split into numbers:
training calls it for metrics.json and `evaluate` calls it on the reloaded
checkpoint, so the two agree exactly.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mnist_mlp import files, runtime
from mnist_mlp.config import DataConfig
from mnist_mlp.data import INPUT_DIM, NUM_CLASSES, load_dataset, preprocess_images
from mnist_mlp.errors import CheckpointError, RunDirError, TrainingError

# Fixed, not the run's batch size: prediction results must not depend on
# which command computed them.
EVAL_BATCH_SIZE = 1000


# How many of the most confidently wrong images a report keeps (mistakes.png is 5x5).
MISTAKES_KEPT = 25


@dataclass(frozen=True)
class ClassScore:
    """One class's row and column of the confusion matrix."""

    label: int
    correct: int  # images of this class predicted as it (true positives)
    total: int  # images of this class (support)
    predicted: int  # images predicted as this class, right or wrong

    @property
    def accuracy(self) -> float | None:
        """The fraction of this class's images classified right: its recall.

        None when the split has no images of this class.
        """
        return self.correct / self.total if self.total else None

    @property
    def recall(self) -> float | None:
        return self.accuracy

    @property
    def precision(self) -> float | None:
        """None when nothing was predicted as this class (scikit-learn would say 0, and warn)."""
        return self.correct / self.predicted if self.predicted else None

    @property
    def f1(self) -> float | None:
        p, r = self.precision, self.recall
        if p is None or r is None:
            return None
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {
            "accuracy": self.accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
        }


@dataclass(frozen=True)
class Score:
    """Loss and confusion matrix of a model on one split, and what follows from them."""

    loss: float
    # confusion[true][predicted]: counts, rows are the labels, columns the predictions.
    confusion: tuple[tuple[int, ...], ...]

    @property
    def total(self) -> int:
        return sum(map(sum, self.confusion))

    @property
    def correct(self) -> int:
        return sum(self.confusion[c][c] for c in range(len(self.confusion)))

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    @property
    def per_class(self) -> tuple[ClassScore, ...]:
        m = self.confusion
        return tuple(
            ClassScore(
                label=c,
                correct=m[c][c],
                total=sum(m[c]),
                predicted=sum(row[c] for row in m),
            )
            for c in range(len(m))
        )

    def macro_average(self) -> dict[str, float | None]:
        """Unweighted means over the classes that have a value (as scikit-learn's 'macro')."""
        result = {}
        for name in ("precision", "recall", "f1"):
            values = [getattr(c, name) for c in self.per_class]
            values = [v for v in values if v is not None]
            result[name] = sum(values) / len(values) if values else None
        return result

    def as_dict(self) -> dict:
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "correct": self.correct,
            "total": self.total,
            "per_class": [c.as_dict() for c in self.per_class],
            "macro_average": self.macro_average(),
            "confusion_matrix": [list(row) for row in self.confusion],
        }


@dataclass(frozen=True)
class Mistake:
    """A test image the model got wrong: its index in the split, label, guess and confidence."""

    index: int
    label: int
    predicted: int
    probability: float


@dataclass(frozen=True)
class EvalReport:
    checkpoint: str
    data: str
    score: Score
    # The most confidently wrong images, most confident first.
    mistakes: tuple[Mistake, ...] = ()

    def as_dict(self) -> dict:
        return (
            {"checkpoint": self.checkpoint, "data": self.data}
            | self.score.as_dict()
            | {"mistakes": [asdict(m) for m in self.mistakes]}
        )


# Images preprocessed per call of model.predict: float32 copies of a whole
# training set would cost four times its uint8 size in memory.
SCORE_CHUNK = 10 * EVAL_BATCH_SIZE


def predict_probabilities(model, images: np.ndarray) -> np.ndarray:
    """Class probabilities (N, 10) for raw uint8 images (N, 28, 28) or (N, 784).

    Chunks are whole multiples of EVAL_BATCH_SIZE, so every batch the model
    sees, and so every number, is the same as one predict call over all images.
    """
    parts = [
        model.predict(
            preprocess_images(images[i : i + SCORE_CHUNK]), batch_size=EVAL_BATCH_SIZE, verbose=0
        )
        for i in range(0, len(images), SCORE_CHUNK)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, NUM_CLASSES), "float32")


def score(model, images: np.ndarray, labels: np.ndarray) -> Score:
    """Score `model` on raw uint8 images and their integer labels."""
    return score_probabilities(predict_probabilities(model, images), labels)


def score_probabilities(probabilities: np.ndarray, labels: np.ndarray) -> Score:
    """The Score of predicted class probabilities (N, 10) against integer labels (N,)."""
    import keras

    targets = np.eye(NUM_CLASSES, dtype="float32")[labels]
    loss = float(
        keras.ops.convert_to_numpy(keras.losses.categorical_crossentropy(targets, probabilities))
        .astype("float64")
        .mean()
    )
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    return Score(loss=loss, confusion=tuple(tuple(int(v) for v in row) for row in confusion))


def most_confident_mistakes(
    probabilities: np.ndarray, labels: np.ndarray, count: int = MISTAKES_KEPT
) -> tuple[Mistake, ...]:
    """The `count` wrongly classified images whose wrong guess had the highest probability.

    Ties are broken by the lower index, so the choice is the same on every run.
    """
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    # lexsort's last key is the primary one: confidence descending, then index.
    order = wrong[np.lexsort((wrong, -confidence[wrong]))][:count]
    return tuple(
        Mistake(
            index=int(i),
            label=int(labels[i]),
            predicted=int(predicted[i]),
            probability=float(confidence[i]),
        )
        for i in order
    )


def load_checkpoint(path: str | Path):
    """Load a saved Keras model that takes 784 inputs and gives 10 outputs.

    Raises:
        CheckpointError: missing, unreadable, not a Keras model, or wrong shapes.
    """
    import keras

    path = Path(path)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as err:  # a name too long, a folder without permission
        raise CheckpointError(
            f"{path}: cannot access ({err.strerror or err}); pass a model.keras from a run folder"
        ) from None
    if not exists:
        raise CheckpointError(f"checkpoint not found: {path}; pass a model.keras from a run folder")
    if is_dir:
        raise CheckpointError(f"checkpoint is a directory: {path}; pass its model.keras file")
    if path.suffix not in (".keras", ".h5"):
        raise CheckpointError(f"{path}: not a Keras model file; expected a .keras (or .h5) file")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        # Keras reports an unreadable archive as "File not found", which misleads.
        raise CheckpointError(
            f"{path}: not a valid .keras archive (truncated, corrupt, or not saved by Keras); "
            "use the model.keras of a finished run"
        )
    try:
        model = keras.saving.load_model(path, compile=False)
    except (ValueError, OSError, zipfile.BadZipFile, KeyError, EOFError, TypeError) as err:
        detail = " ".join(str(err).split())[:160] or type(err).__name__
        raise CheckpointError(
            f"{path}: cannot load as a Keras model ({detail}); the file is truncated, corrupt, "
            "or not a model saved by Keras"
        ) from None
    input_shape = tuple(getattr(model, "input_shape", ()) or ())
    output_shape = tuple(getattr(model, "output_shape", ()) or ())
    if input_shape[1:] != (INPUT_DIM,):
        raise CheckpointError(
            f"{path}: the model takes inputs of shape {input_shape[1:]}; this tool feeds "
            f"({INPUT_DIM},) flattened 28x28 images"
        )
    if output_shape[1:] != (NUM_CLASSES,):
        raise CheckpointError(
            f"{path}: the model gives outputs of shape {output_shape[1:]}; expected "
            f"({NUM_CLASSES},) class probabilities"
        )
    return model


REPORT_FILES = ("report.json", "confusion_matrix.png", "mistakes.png")


def output_folders(output: str | Path, checkpoints: list[str]) -> list[Path]:
    """Where each checkpoint's report files go: `output` itself, or one subfolder each.

    Raises:
        RunDirError: `output` is a file, or a report file is already there
            (reports are never overwritten).
    """
    output = Path(output)
    try:
        # The nearest folder that exists must be a folder: fail now, not after scoring.
        nearest = next(p for p in (output, *output.parents) if p.exists() or p == Path(p.anchor))
        if not nearest.is_dir():
            where = "is a file" if nearest == output else f"is inside {nearest}, a file"
            raise RunDirError(
                f"--output {output}: {where}; give a folder for the report files"
            )
        if not os.access(nearest, os.W_OK | os.X_OK):
            raise RunDirError(
                f"--output {output}: {nearest} is not writable; choose another --output"
            )
    except OSError as err:
        raise RunDirError(
            f"--output {output}: cannot access ({err.strerror or err}); choose another --output"
        ) from None
    if len(checkpoints) == 1:
        folders = [output]
    else:
        # Numbered: two checkpoints may share a name (runs/a/model.keras, runs/b/model.keras).
        folders = [
            output / f"{i}-{Path(c).parent.name or 'model'}-{Path(c).stem}"
            for i, c in enumerate(checkpoints, 1)
        ]
    for folder in folders:
        for name in REPORT_FILES:
            if (folder / name).exists():
                raise RunDirError(
                    f"--output {output}: {folder / name} already exists; reports are never "
                    "overwritten: choose another folder or remove the old report"
                )
    return folders


def evaluate(
    checkpoints: list[str | Path],
    data: DataConfig,
    device: str = "auto",
    output: str | Path | None = None,
) -> list[EvalReport]:
    """Score saved models on the test split of `data`, on `device` (auto, cpu, gpu).

    Args:
        checkpoints: one model file, or several to compare on the same images.
        data: where the test images come from.
        device: auto, cpu or gpu.
        output: a folder for report.json, confusion_matrix.png and mistakes.png
            (one subfolder per checkpoint when there are several); None: no files.

    Returns:
        One report per checkpoint, in the order given.
    """
    checkpoints = [str(c) for c in checkpoints]
    # Every check that can fail fast runs before the slow work.
    folders = output_folders(output, checkpoints) if output is not None else None
    runtime.select_device(device)
    tf = runtime.import_tensorflow()
    models = [load_checkpoint(c) for c in checkpoints]
    dataset = load_dataset(data, splits=("test",))
    reports = []
    for checkpoint, model in zip(checkpoints, models, strict=True):
        try:
            with runtime.quiet_tensorflow():
                probabilities = predict_probabilities(model, dataset.x_test)
        except tf.errors.OpError as err:
            raise TrainingError.from_op_error(err) from None
        reports.append(
            EvalReport(
                checkpoint=checkpoint,
                data=dataset.describe(),
                score=score_probabilities(probabilities, dataset.y_test),
                mistakes=most_confident_mistakes(probabilities, dataset.y_test),
            )
        )
    if folders is not None:
        for report, folder in zip(reports, folders, strict=True):
            write_report_files(report, dataset.x_test, folder)
    return reports


def write_report_files(report: EvalReport, images: np.ndarray, folder: Path) -> None:
    """report.json, confusion_matrix.png and mistakes.png of one report, into `folder`."""
    from mnist_mlp import plots

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(
            f"cannot create {folder}: {err.strerror or err}; choose another --output"
        ) from None
    files.write_json(folder / "report.json", report.as_dict())
    plots.save_confusion_matrix(
        report.score.confusion,
        folder / "confusion_matrix.png",
        title=f"{Path(report.checkpoint).name}: accuracy {report.score.accuracy:.4f} "
        f"on {report.score.total:,} images",
    )
    plots.save_mistakes(images, report.mistakes, folder / "mistakes.png")
