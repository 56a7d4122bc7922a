"""Scoring a model on a split, and loading a saved checkpoint to score it.

`score` is the one function that turns a model and a split into numbers:
training calls it for metrics.json and `evaluate` calls it on the reloaded
checkpoint, so the two agree exactly.
"""

from __future__ import annotations

import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mnist_mlp import runtime
from mnist_mlp.config import DataConfig
from mnist_mlp.data import INPUT_DIM, NUM_CLASSES, load_dataset, preprocess
from mnist_mlp.errors import CheckpointError, TrainingError

# Fixed, not the run's batch size: prediction results must not depend on
# which command computed them.
EVAL_BATCH_SIZE = 1000


@dataclass(frozen=True)
class ClassScore:
    label: int
    correct: int
    total: int

    @property
    def accuracy(self) -> float | None:
        """None when the split has no images of this class."""
        return self.correct / self.total if self.total else None


@dataclass(frozen=True)
class Score:
    """Loss, accuracy and per-class accuracy of a model on one split."""

    loss: float
    correct: int
    total: int
    per_class: tuple[ClassScore, ...]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    def as_dict(self) -> dict:
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "correct": self.correct,
            "total": self.total,
            "per_class": [asdict(c) | {"accuracy": c.accuracy} for c in self.per_class],
        }


@dataclass(frozen=True)
class EvalReport:
    checkpoint: str
    data: str
    score: Score

    def as_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "data": self.data} | self.score.as_dict()


def score(model, x: np.ndarray, y: np.ndarray) -> Score:
    """Score `model` on preprocessed inputs `x` (N, 784) and one-hot targets `y` (N, 10)."""
    import keras

    probabilities = model.predict(x, batch_size=EVAL_BATCH_SIZE, verbose=0)
    loss = float(
        keras.ops.convert_to_numpy(keras.losses.categorical_crossentropy(y, probabilities))
        .astype("float64")
        .mean()
    )
    labels = y.argmax(axis=1)
    hits = probabilities.argmax(axis=1) == labels
    per_class = tuple(
        ClassScore(label=c, correct=int(hits[labels == c].sum()), total=int((labels == c).sum()))
        for c in range(NUM_CLASSES)
    )
    return Score(loss=loss, correct=int(hits.sum()), total=len(labels), per_class=per_class)


def load_checkpoint(path: str | Path):
    """Load a saved Keras model that takes 784 inputs and gives 10 outputs.

    Raises:
        CheckpointError: missing, unreadable, not a Keras model, or wrong shapes.
    """
    import keras

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}; pass a model.keras from a run folder")
    if path.is_dir():
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


def evaluate(checkpoint: str | Path, data: DataConfig, device: str = "auto") -> EvalReport:
    """Score a saved model on the test split of `data`, on `device` (auto, cpu, gpu)."""
    runtime.select_device(device)
    tf = runtime.import_tensorflow()
    model = load_checkpoint(checkpoint)
    dataset = load_dataset(data, splits=("test",))
    x, y = preprocess(dataset.x_test, dataset.y_test)
    try:
        result = score(model, x, y)
    except tf.errors.OpError as err:
        raise TrainingError.from_op_error(err) from None
    return EvalReport(checkpoint=str(checkpoint), data=dataset.describe(), score=result)
