"""Classifying users' digits: image files and .npy arrays in, digits and probabilities out.

Images are turned into MNIST-like inputs the way MNIST itself was made
(LeCun et al.): the digit's bounding box is fitted into 20x20 keeping its
aspect ratio, with antialiasing, and placed in a 28x28 field so that its
centre of mass is at the centre. Arrays are taken as already MNIST-like and
only scaled. A bad input is reported in one line naming the file; `classify`
collects those and still classifies the other inputs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mnist_mlp import runtime
from mnist_mlp.data import IMAGE_SHAPE, INPUT_DIM, NUM_CLASSES
from mnist_mlp.errors import MnistMlpError, TrainingError
from mnist_mlp.evaluate import EVAL_BATCH_SIZE, load_checkpoint

ACCEPTED = (
    "predict reads images (PNG, JPEG, ...; any size, either polarity) "
    "and .npy arrays of shape (28, 28), (N, 28, 28) or (N, 784)"
)

# MNIST's digits fill a 20x20 box inside the 28x28 field (LeCun et al.).
BOX_SIZE = 20
# Where MNIST puts the centre of mass, as (row, column) pixel indices: the
# t10k images' centres of mass average (13.99, 14.01) and all lie within half
# a pixel of 14, which an integer shift towards 14 reproduces.
CENTRE = 14.0
# Ink weaker than this fraction of the strongest ink is noise (paper texture,
# JPEG ringing around strokes): it is zeroed and does not widen the bounding box.
NOISE_LEVEL = 0.15
# An image whose strongest ink differs from the paper by less than a tenth of
# full scale has no digit: blank paper with JPEG noise stays below it.
MIN_CONTRAST = 0.1

_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


class InputError(MnistMlpError):
    """An input to `predict` is missing, unreadable, or not a digit image or array."""


@dataclass(frozen=True)
class Sample:
    """One model-ready digit.

    `input` is the path as given; `index` is the row in an array of many
    digits, None for an image or a single (28, 28) array; `pixels` are 784
    float32 values in [0, 1], ink high (white digit on black, as in MNIST).
    """

    input: str
    index: int | None
    pixels: np.ndarray

    @property
    def name(self) -> str:
        """How the sample is shown: `digit.png`, or `arr.npy[3]` for a row of an array."""
        return self.input if self.index is None else f"{self.input}[{self.index}]"


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one sample: the digit, the top guesses, all ten probabilities."""

    input: str
    index: int | None
    digit: int
    top: tuple[tuple[int, float], ...]
    probabilities: tuple[float, ...]

    @property
    def name(self) -> str:
        return self.input if self.index is None else f"{self.input}[{self.index}]"

    def as_dict(self) -> dict:
        return {
            "input": self.input,
            "index": self.index,
            "digit": self.digit,
            "top": [{"digit": d, "probability": p} for d, p in self.top],
            "probabilities": list(self.probabilities),
        }


class Classification(NamedTuple):
    """What `classify` returns; unpacks as `predictions, errors`."""

    predictions: list[Prediction]
    errors: list[tuple[str, str]]  # (input path, one-line message), in input order

    def as_dict(self) -> dict:
        return {
            "predictions": [p.as_dict() for p in self.predictions],
            "errors": [{"input": path, "message": message} for path, message in self.errors],
        }


# ------------------------------------------------------------------------ core


def classify(checkpoint: str | Path, inputs, device: str = "auto") -> Classification:
    """Classify every digit in `inputs` with the model saved at `checkpoint`.

    Args:
        checkpoint: a saved Keras model (784 inputs, 10 outputs).
        inputs: paths of image files and .npy arrays.
        device: "auto", "cpu" or "gpu".

    Returns:
        The predictions, in the order of `inputs` (an array's rows in order),
        and an (input, message) pair for each input that could not be read.

    Raises:
        CheckpointError: the model cannot be used; nothing is classified.
        DeviceError: the device is not available.
        TrainingError: TensorFlow failed while predicting.
    """
    runtime.select_device(device)
    tf = runtime.import_tensorflow()
    model = load_checkpoint(checkpoint)
    samples: list[Sample] = []
    errors: list[tuple[str, str]] = []
    for path in inputs:
        try:
            samples.extend(load_inputs(path))
        except InputError as err:
            errors.append((str(path), str(err)))
    try:
        # One call for all inputs: a model.predict call costs far more than a row.
        with runtime.quiet_tensorflow():
            predictions = predict(model, samples)
    except tf.errors.OpError as err:
        raise TrainingError.from_op_error(err) from None
    return Classification(predictions, errors)


def predict(model, samples: list[Sample], top: int = 3) -> list[Prediction]:
    """Run `model` on the samples' pixels; one Prediction per sample, in order.

    Args:
        model: a Keras model mapping (N, 784) to (N, 10) class probabilities.
        samples: from `load_inputs`.
        top: how many (digit, probability) pairs to keep, most probable first.

    Returns:
        The predictions; `digit` is the most probable class.
    """
    if not 1 <= top <= NUM_CLASSES:
        raise ValueError(f"top={top}: expected 1..{NUM_CLASSES} guesses")
    if not samples:
        return []
    x = np.stack([s.pixels for s in samples])
    # The batch size evaluation uses, so the same rows give the same numbers.
    probabilities = np.asarray(model.predict(x, batch_size=EVAL_BATCH_SIZE, verbose=0))
    results = []
    for sample, p in zip(samples, probabilities, strict=True):
        # Stable sort: equal probabilities list the smaller digit first, every time.
        order = np.argsort(-p, kind="stable")[:top]
        results.append(
            Prediction(
                input=sample.input,
                index=sample.index,
                digit=int(order[0]),
                top=tuple((int(d), float(p[d])) for d in order),
                probabilities=tuple(float(v) for v in p),
            )
        )
    return results


# ---------------------------------------------------------------------- inputs


def load_inputs(path: str | Path) -> list[Sample]:
    """Read one input file into model-ready samples.

    The kind is decided by content, not by the name: a .npy header means an
    array, anything Pillow opens is an image.

    Args:
        path: an image file (one digit) or a .npy array of one or many digits.

    Returns:
        One sample for an image or a (28, 28) array, N for an (N, 28, 28) or (N, 784) array.

    Raises:
        InputError: missing, unreadable, blank, or neither an image nor a fitting array.
    """
    name = str(path)
    path = Path(path)
    try:
        # stat can fail on its own (a name too long, a folder without permission).
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as err:
        raise InputError(f"{name}: cannot access ({err.strerror or err}); {ACCEPTED}") from None
    if not exists:
        raise InputError(f"{name}: file not found; {ACCEPTED}")
    if is_dir:
        raise InputError(f"{name}: is a directory; pass the image or .npy files in it")
    try:
        with path.open("rb") as handle:
            head = handle.read(len(_NPY_MAGIC))
    except OSError as err:
        raise InputError(f"{name}: cannot read ({err.strerror or err})") from None
    if head.startswith(_NPY_MAGIC):
        return _load_npy(path, name)
    if head.startswith(_ZIP_MAGIC) and path.suffix == ".npz":
        raise InputError(
            f"{name}: an .npz archive; save one array with numpy.save to a .npy file ({ACCEPTED})"
        )
    pixels = mnist_style(_read_gray(path, name), name=name)
    return [Sample(input=name, index=None, pixels=pixels.reshape(INPUT_DIM))]


def _read_gray(path: Path, name: str) -> np.ndarray:
    """The image as a 2-D array: uint8, or float in [0, 1] for 16-bit images."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # Over 89 megapixels Pillow warns on stderr; a big photo is fine here
            # (it is shrunk to 20x20), and twice that is refused below anyway.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                # Phones store photos sideways and say so in EXIF; upright is what was drawn.
                image = ImageOps.exif_transpose(image)
                image.load()
                return _to_gray(image)
    except UnidentifiedImageError:
        what = "not a valid .npy array" if path.suffix == ".npy" else "not an image or .npy array"
        raise InputError(f"{name}: {what}; {ACCEPTED}") from None
    except Image.DecompressionBombError as err:
        raise InputError(f"{name}: image too large to read safely ({err})") from None
    # Pillow reports a truncated or corrupt file as OSError ("image file is
    # truncated"), SyntaxError ("broken PNG file"), ValueError or EOFError.
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        detail = " ".join(str(err).split())[:160] or type(err).__name__
        raise InputError(
            f"{name}: cannot decode the image ({detail}); the file is truncated or corrupt"
        ) from None


def _to_gray(image) -> np.ndarray:
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's convert("L") clips 16-bit values at 255 instead of scaling them.
        return np.clip(np.asarray(image, dtype=np.float64) / 65535.0, 0.0, 1.0)
    if image.mode == "F":
        return np.clip(np.nan_to_num(np.asarray(image, dtype=np.float64)), 0.0, 1.0)
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        # A transparent background is the paper: composite onto white.
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(paper, rgba)
    return np.asarray(image.convert("L"), dtype=np.uint8)


def _load_npy(path: Path, name: str) -> list[Sample]:
    try:
        # Memory-mapped first: a header claiming (10**10, 784) must be refused by its
        # shape, not by trying to allocate terabytes. Rows are copied once accepted.
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as err:
        if "mmap length is greater than file size" in str(err):
            raise InputError(
                f"{name}: truncated .npy file (its header promises more data than the file "
                "holds); save the array again with numpy.save"
            ) from None
        # allow_pickle=False refuses object arrays; a damaged header is a ValueError too.
        detail = " ".join(str(err).split())[:160]
        raise InputError(
            f"{name}: not a numeric .npy array ({detail}); {ACCEPTED} of integers 0..255 "
            "or floats in [0, 1]"
        ) from None
    except (OSError, EOFError, MemoryError) as err:
        raise InputError(f"{name}: truncated or unreadable .npy file ({err})") from None
    kind = array.dtype.kind
    if kind not in "uif":
        raise InputError(
            f"{name}: array of dtype {array.dtype}; expected integers 0..255 or floats in [0, 1]"
        )
    if array.shape == IMAGE_SHAPE:
        rows, indices = array.reshape(1, INPUT_DIM), [None]
    elif (array.ndim == 3 and array.shape[1:] == IMAGE_SHAPE) or (
        array.ndim == 2 and array.shape[1] == INPUT_DIM
    ):
        if len(array) == 0:
            raise InputError(f"{name}: array of shape {array.shape} holds no digits")
        rows, indices = array.reshape(len(array), INPUT_DIM), list(range(len(array)))
    else:
        raise InputError(f"{name}: array of shape {array.shape}; {ACCEPTED}")
    if kind == "f":
        if not np.isfinite(rows).all():
            raise InputError(
                f"{name}: float array ({array.dtype}) holds NaN or infinite values; "
                "expected pixel values in [0, 1]"
            )
        low, high = float(rows.min()), float(rows.max())
        if low < 0.0 or high > 1.0:
            raise InputError(
                f"{name}: float array ({array.dtype}) has values {low:g}..{high:g}; expected "
                "pixel values in [0, 1] (divide 0..255 values by 255, or save them as uint8)"
            )
        pixels = rows.astype("float32")
    else:
        low, high = int(rows.min()), int(rows.max())
        if low < 0 or high > 255:
            raise InputError(
                f"{name}: integer array ({array.dtype}) has values {low}..{high}; expected "
                "pixel values 0..255"
            )
        # Exactly data.preprocess's arithmetic, so an array of MNIST images
        # predicts as the training pipeline sees it.
        pixels = rows.astype("float32") / 255.0
    return [Sample(input=name, index=i, pixels=p) for i, p in zip(indices, pixels, strict=True)]


# ------------------------------------------------------------- preprocessing


def mnist_style(gray: np.ndarray, name: str = "image") -> np.ndarray:
    """Turn a grayscale picture of one digit into a 28x28 MNIST-style image.

    Steps, as MNIST was made: find the paper's level from the border and the
    ink's polarity, subtract the paper, cut out the digit's bounding box, fit
    it into 20x20 keeping its aspect ratio (Lanczos antialiasing), and place
    it in a 28x28 field so that its centre of mass is at pixel (14, 14).

    Args:
        gray: 2-D uint8 (0..255) or float (0..1) array, of any size; dark ink
            on light paper and light ink on dark both work.
        name: the file it came from, for the error message.

    Returns:
        float32 (28, 28) in [0, 1], ink high and background 0.

    Raises:
        InputError: the picture has no ink (blank, or nearly uniform).
        ValueError: `gray` is not a 2-D uint8 or float array.
    """
    from PIL import Image

    gray = np.asarray(gray)
    if gray.ndim != 2 or gray.size == 0:
        raise ValueError(f"expected a non-empty 2-D grayscale array, got shape {gray.shape}")
    if gray.dtype == np.uint8:
        # float32 throughout: a 12-megapixel photo is 48 MB per copy, not 96.
        values = gray.astype(np.float32) / np.float32(255.0)
    elif gray.dtype.kind == "f":
        values = np.nan_to_num(gray.astype(np.float32))
        np.clip(values, 0.0, 1.0, out=values)
    else:
        raise ValueError(f"expected uint8 or float pixels, got dtype {gray.dtype}")

    paper = float(np.median(_border(values)))
    darker, lighter = paper - values.min(), values.max() - paper
    # The ink is whatever departs most from the paper: dark ink on light paper
    # is inverted, so ink is high as in MNIST, whatever the paper's grey.
    ink = paper - values if darker > lighter else values - paper
    strength = float(ink.max())
    if strength < MIN_CONTRAST:
        raise InputError(
            f"{name}: no digit found (the image is blank or nearly uniform); "
            "pass a picture of one handwritten digit"
        )
    ink /= strength
    # Also zeroes the negative side: paper lighter or darker than its median.
    ink[ink < NOISE_LEVEL] = 0.0
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    box = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    height, width = box.shape
    scale = BOX_SIZE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Mode "F" keeps the full float range through the resampling.
    resized = Image.fromarray(box.astype(np.float32)).resize(size, Image.Resampling.LANCZOS)
    # Lanczos rings slightly below 0 and above 1 next to sharp edges.
    digit = np.clip(np.asarray(resized, dtype=np.float64), 0.0, 1.0)
    digit /= digit.max() or 1.0

    height, width = digit.shape
    mass = digit.sum()
    centre_row = (digit.sum(axis=1) * np.arange(height)).sum() / mass
    centre_col = (digit.sum(axis=0) * np.arange(width)).sum() / mass
    side = IMAGE_SHAPE[0]
    # An integer shift, as MNIST used; kept inside the field so no ink is cut off.
    top = int(np.clip(round(CENTRE - centre_row), 0, side - height))
    left = int(np.clip(round(CENTRE - centre_col), 0, side - width))
    canvas = np.zeros(IMAGE_SHAPE, dtype=np.float32)
    canvas[top : top + height, left : left + width] = digit
    return canvas


def _border(values: np.ndarray) -> np.ndarray:
    """The outer ring of pixels, about 1/28 of the shorter side wide (1 px for 28x28)."""
    width = max(1, min(values.shape) // IMAGE_SHAPE[0])
    if min(values.shape) <= 2 * width:
        return values.ravel()
    inner = np.ones(values.shape, dtype=bool)
    inner[width:-width, width:-width] = False
    return values[inner]
