"""Data sources (Keras downloads, local .npz, LeCun IDX files) and preprocessing.

Everything read is validated before it reaches the model: 28x28 uint8 images,
integer labels in 0..9, as many labels as images. A bad file is reported in
one line naming the file and what is wrong with it.
"""

from __future__ import annotations

import gzip
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_mlp.config import DataConfig
from mnist_mlp.errors import DataError

IMAGE_SHAPE = (28, 28)
INPUT_DIM = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
NUM_CLASSES = 10

# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte), the rank.
IDX_IMAGES_MAGIC = 0x00000803  # 2051
IDX_LABELS_MAGIC = 0x00000801  # 2049

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
SPLITS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}

OFFLINE_HINT = (
    "to work offline, point data.path at a local copy of the same data set: a Keras-layout "
    ".npz or a folder of the four IDX files, e.g. --set data.path=/data/mnist (see README)"
)


@dataclass(frozen=True)
class Dataset:
    """Raw images (N, 28, 28) uint8 and labels (N,) uint8, per split."""

    source: str
    x_train: np.ndarray | None
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray

    def describe(self) -> str:
        train = f"{len(self.x_train):,} train / " if self.x_train is not None else ""
        return f"{self.source} ({train}{len(self.x_test):,} test images)"


def load_dataset(config: DataConfig, splits: tuple[str, ...] = ("train", "test")) -> Dataset:
    """Load and validate the splits named in `splits` from the configured source.

    Args:
        config: the `data` section.
        splits: "train" and/or "test"; "test" is always loaded. Evaluation asks
            for the test split only, so a folder with just the t10k files works.

    Raises:
        DataError: the source cannot be read or fails validation.
    """
    wanted = {"test", *splits}
    if config.path is None:
        arrays, source = _load_keras(config.name), f"keras.datasets.{config.name}"
    else:
        path = Path(config.path)
        if not path.exists():
            raise DataError(f"data.path not found: {path}; {OFFLINE_HINT}")
        reader = _load_idx_dir if path.is_dir() else _load_npz
        arrays = reader(path, wanted)
        source = str(path)
    for split in sorted(wanted):
        x_key, y_key = SPLITS[split]
        validate_split(arrays[x_key], arrays[y_key], f"{source} [{split}]")
    return Dataset(
        source=source,
        x_train=arrays["x_train"] if "train" in wanted else None,
        y_train=arrays["y_train"] if "train" in wanted else None,
        x_test=arrays["x_test"],
        y_test=arrays["y_test"],
    )


def preprocess(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tutorial's preprocessing: 784 float32 values in [0, 1], one-hot labels."""
    import keras

    targets = keras.utils.to_categorical(y, NUM_CLASSES).astype("float32")
    return preprocess_images(x), targets


def preprocess_images(x: np.ndarray) -> np.ndarray:
    """uint8 images (N, 28, 28) or (N, 784) as the model's input: (N, 784) float32 / 255."""
    return x.reshape(len(x), INPUT_DIM).astype("float32") / 255.0


def validate_split(x: np.ndarray, y: np.ndarray, where: str) -> None:
    """Check one split's images and labels; raise DataError naming the problem."""
    if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"{where}: images have shape {x.shape}; expected (N, 28, 28) grayscale digits"
        )
    if x.dtype != np.uint8:
        raise DataError(
            f"{where}: images have dtype {x.dtype}; expected uint8 pixel values 0..255 "
            "(the raw MNIST layout, before any scaling)"
        )
    if y.ndim != 1:
        raise DataError(f"{where}: labels have shape {y.shape}; expected (N,) class indices")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels have dtype {y.dtype}; expected integers 0..9")
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x):,} images but {len(y):,} labels; counts must match")
    if len(x) == 0:
        raise DataError(f"{where}: no images; the split is empty")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= NUM_CLASSES:
        bad = low if low < 0 else high
        raise DataError(f"{where}: label {bad} is outside 0..9")


# ----------------------------------------------------------------------- sources


def _load_keras(name: str) -> dict[str, np.ndarray]:
    """Download (once, into Keras's cache, hash-checked) a Keras dataset."""
    import keras

    module = {"mnist": keras.datasets.mnist, "fashion_mnist": keras.datasets.fashion_mnist}[name]
    try:
        (x_train, y_train), (x_test, y_test) = module.load_data()
    # keras.utils.get_file raises a bare Exception for network failures
    # ("URL fetch failure ..."), ValueError for a hash mismatch, OSError for the
    # cache; all mean the same to the user: the download did not work.
    except Exception as err:  # noqa: BLE001
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DataError(
            f"could not download {name} through Keras ({reason}); {OFFLINE_HINT}"
        ) from None
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _load_npz(path: Path, wanted: set[str]) -> dict[str, np.ndarray]:
    keys = [k for split in sorted(wanted) for k in SPLITS[split]]
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(
                f"{path}: a single .npy array, not an .npz archive; expected arrays "
                "x_train, y_train, x_test, y_test (numpy.savez)"
            )
        with archive:
            missing = [k for k in keys if k not in archive.files]
            if missing:
                raise DataError(
                    f"{path}: missing array(s) {', '.join(missing)}; the Keras layout has "
                    "x_train, y_train, x_test, y_test "
                    f"(found: {', '.join(archive.files) or 'none'})"
                )
            arrays = {k: archive[k] for k in keys}
    except DataError:
        raise
    except ValueError as err:
        # allow_pickle=False refuses object arrays, and np.load refuses non-array files.
        raise DataError(f"{path}: not a numeric .npz archive ({err})") from None
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise DataError(f"{path}: truncated or corrupt .npz ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    arrays.setdefault("x_train", None)
    arrays.setdefault("y_train", None)
    return arrays


def _load_idx_dir(folder: Path, wanted: set[str]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray | None] = {"x_train": None, "y_train": None}
    for split in sorted(wanted):
        for key in SPLITS[split]:
            stem = IDX_FILES[key]
            candidates = [folder / f"{stem}.gz", folder / stem]
            found = next((p for p in candidates if p.is_file()), None)
            if found is None:
                raise DataError(
                    f"{folder}: missing {stem}[.gz]; a data folder holds the four LeCun IDX "
                    f"files ({', '.join(IDX_FILES.values())}, gzipped or not)"
                )
            magic = IDX_IMAGES_MAGIC if key.startswith("x") else IDX_LABELS_MAGIC
            arrays[key] = read_idx(found, magic)
    return arrays


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read one IDX file (gzipped when its name ends in .gz) of unsigned bytes.

    Raises:
        DataError: wrong magic number, truncated data, or a corrupt gzip stream.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                raw = stream.read()
        else:
            raw = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(f"{path}: truncated or corrupt gzip file ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    kind = "images" if expected_magic == IDX_IMAGES_MAGIC else "labels"
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise DataError(
            f"{path}: IDX magic number {magic} is not {expected_magic} (IDX {kind} of "
            "unsigned bytes); is this the right file, and decompressed if not named .gz?"
        )
    rank = expected_magic & 0xFF
    header = 4 + 4 * rank
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{rank}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(raw) - header
    if actual != expected:
        state = "truncated" if actual < expected else "has trailing bytes"
        raise DataError(
            f"{path}: {state}: header {dims} needs {expected:,} bytes of data, found {actual:,}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


# ------------------------------------------------------------------- training order


def epoch_order(seed: int, epoch: int, samples: int) -> np.ndarray:
    """The order training samples are visited in during `epoch` (0-based).

    A pure function of (seed, epoch), unlike the shuffling inside `fit`, whose
    order depends on how many epochs the process has already run: a run
    resumed at epoch 7 must see epoch 7's order, not epoch 0's.
    """
    return np.random.default_rng([seed, epoch]).permutation(samples)


class TrainingBatches:
    """The training batches of one epoch per pass, as `fit` consumes its data.

    `fit` iterates its data once per epoch. Which epoch a pass yields is
    `epoch`, set by the callbacks.EpochFeed callback at each epoch's start
    (before fit opens the pass), so each epoch visits the images in
    `epoch_order(seed, epoch)`, whatever the process trained before it.

    A pass has `num_batches` batches, the last one partial, and ends there:
    Keras's `steps_per_execution` then groups steps without running into the
    next epoch. `skip` drops the first batches of every pass (the part of an
    epoch already trained before a mid-epoch resume; such a feed is used for
    that one epoch).

    The images stay uint8, once, and each batch is made as `preprocess` would
    make it (float32 / 255, one-hot), bit for bit: a float32 copy of the data
    would take four times the memory.
    """

    def __init__(self, images, labels, batch_size: int, seed: int, epoch: int, skip: int = 0):
        """Args: images (N, 784) uint8; labels (N,) integer classes; `epoch` 0-based."""
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.epoch, self.skip = batch_size, seed, epoch, skip
        self.num_batches = math.ceil(len(images) / batch_size) - skip
        if self.num_batches < 1:
            raise ValueError(f"skip={skip} leaves no batch of {len(images)} images")
        self._order: tuple[int, np.ndarray] | None = None

    def order(self) -> np.ndarray:
        """The sample indices of this pass: the epoch's order, less the skipped batches."""
        if self._order is None or self._order[0] != self.epoch:
            order = epoch_order(self.seed, self.epoch, len(self.images))
            self._order = (self.epoch, order[self.skip * self.batch_size :].astype(np.int64))
        return self._order[1]

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch `index` of this pass, as numpy arrays."""
        idx = self.order()[index * self.batch_size : (index + 1) * self.batch_size]
        return preprocess(self.images[idx], self.labels[idx])

    def for_fit(self, backend: str):
        """What `fit` is given: a tf.data pipeline under TensorFlow, else a keras PyDataset.

        tf.data runs in TensorFlow's own threads; under JAX its batches would be
        converted back from TensorFlow tensors, which costs more than making them
        with numpy in Keras's loop.
        """
        return self.tf_dataset() if backend == "tensorflow" else self.py_dataset()

    def tf_dataset(self):
        """The pass as a tf.data pipeline: gather, cast and one-hot inside TensorFlow."""
        import tensorflow as tf

        pixels, classes = tf.constant(self.images), tf.constant(self.labels)
        samples = len(self.images) - self.skip * self.batch_size

        def indices(_):
            # Runs at the start of each pass, so it reads the epoch of that pass.
            order = tf.numpy_function(self.order, [], tf.int64, stateful=True)
            order.set_shape([samples])
            return tf.data.Dataset.from_tensor_slices(order).batch(self.batch_size)

        def batch(idx):
            x = tf.cast(tf.gather(pixels, idx), tf.float32) / 255.0
            y = tf.one_hot(tf.gather(classes, idx), NUM_CLASSES, dtype=tf.float32)
            return x, y

        return (
            tf.data.Dataset.range(1)
            .flat_map(indices)
            .map(batch)
            # flat_map hides the length; Keras needs it to end each pass.
            .apply(tf.data.experimental.assert_cardinality(self.num_batches))
            .prefetch(tf.data.AUTOTUNE)
        )

    def py_dataset(self):
        """The pass as a keras.utils.PyDataset, batches made in Keras's loop (no threads)."""
        import keras

        feed = self

        class Batches(keras.utils.PyDataset):
            def __init__(self):
                super().__init__(workers=1, use_multiprocessing=False)

            def __len__(self):
                return feed.num_batches

            def __getitem__(self, index):
                return feed.batch(index)

        return Batches()
