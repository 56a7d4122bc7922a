"""Data: the IDX and npz readers, validation of what they read, and preprocessing."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
from conftest import T10K, needs_t10k, synthetic_arrays, write_idx, write_idx_dir

from mnist_mlp.config import DataConfig
from mnist_mlp.data import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, load_dataset, preprocess, read_idx
from mnist_mlp.errors import DataError


def _load(path, splits=("train", "test")):
    return load_dataset(DataConfig(path=str(path)), splits=splits)


@needs_t10k
def test_real_mnist_test_set_matches_its_published_counts(t10k):
    x, y = t10k
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    # ../shared/data/README.md: label counts per digit and the first ten labels.
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert 0 < x.mean() < 255 and x.max() == 255


@needs_t10k
def test_a_folder_with_only_the_test_files_serves_evaluation():
    dataset = _load(T10K, splits=("test",))
    assert dataset.x_train is None and dataset.x_test.shape == (10000, 28, 28)
    with pytest.raises(DataError, match="missing train-images-idx3-ubyte"):
        _load(T10K)


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_idx_folder_round_trip(tmp_path, gz):
    arrays = synthetic_arrays()
    dataset = _load(write_idx_dir(tmp_path, arrays, gz=gz))
    for key, expected in arrays.items():
        np.testing.assert_array_equal(getattr(dataset, key), expected)
    assert dataset.source == str(tmp_path)


def test_npz_round_trip_equals_idx(tmp_path):
    arrays = synthetic_arrays()
    np.savez(tmp_path / "d.npz", **arrays)
    from_npz = _load(tmp_path / "d.npz")
    from_idx = _load(write_idx_dir(tmp_path / "idx", arrays))
    for key in arrays:
        np.testing.assert_array_equal(getattr(from_npz, key), getattr(from_idx, key))


def test_preprocessing_is_the_tutorials():
    arrays = synthetic_arrays(n_train=50)
    x, y = preprocess(arrays["x_train"], arrays["y_train"])
    assert x.shape == (50, 784) and x.dtype == np.float32
    assert y.shape == (50, 10) and y.dtype == np.float32
    # Each row is the image read row by row, divided by 255.
    np.testing.assert_array_equal(x[3], arrays["x_train"][3].reshape(784).astype(np.float32) / 255)
    assert x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_array_equal(y.argmax(axis=1), arrays["y_train"])
    np.testing.assert_array_equal(y.sum(axis=1), np.ones(50))


# ----------------------------------------------------------------- bad files


def _idx_dir_with(tmp_path, key, writer):
    """A valid IDX folder whose file for `key` is replaced by `writer(path)`."""
    folder = write_idx_dir(tmp_path, synthetic_arrays(), gz=True)
    target = (
        folder
        / {
            "x_train": "train-images-idx3-ubyte.gz",
            "y_train": "train-labels-idx1-ubyte.gz",
            "x_test": "t10k-images-idx3-ubyte.gz",
            "y_test": "t10k-labels-idx1-ubyte.gz",
        }[key]
    )
    writer(target)
    return folder, target


def test_wrong_magic_number(tmp_path):
    labels = np.zeros(64, dtype=np.uint8)
    folder, target = _idx_dir_with(
        tmp_path, "x_train", lambda p: write_idx(p, labels, IDX_LABELS_MAGIC)
    )
    with pytest.raises(DataError, match="magic number 2049 is not 2051") as info:
        _load(folder)
    assert str(target) in str(info.value)


def test_truncated_gzip(tmp_path):
    def truncate(path):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    folder, target = _idx_dir_with(tmp_path, "x_test", truncate)
    with pytest.raises(DataError, match="truncated or corrupt gzip") as info:
        _load(folder)
    assert str(target) in str(info.value)


def test_not_gzip_despite_the_name(tmp_path):
    folder, _ = _idx_dir_with(tmp_path, "y_test", lambda p: p.write_bytes(b"hello world"))
    with pytest.raises(DataError, match="corrupt gzip"):
        _load(folder)


def test_truncated_pixel_data(tmp_path):
    def cut(path):
        with gzip.open(path, "rb") as f:
            raw = f.read()
        with gzip.open(path, "wb") as f:
            f.write(raw[:-100])

    folder, _ = _idx_dir_with(tmp_path, "x_train", cut)
    with pytest.raises(DataError, match=r"truncated: header \(64, 28, 28\) needs 50,176 bytes"):
        _load(folder)


def test_images_of_the_wrong_size(tmp_path):
    big = np.zeros((64, 32, 32), dtype=np.uint8)
    folder, _ = _idx_dir_with(tmp_path, "x_train", lambda p: write_idx(p, big, IDX_IMAGES_MAGIC))
    with pytest.raises(DataError, match=r"shape \(64, 32, 32\); expected \(N, 28, 28\)"):
        _load(folder)


def test_label_out_of_range(tmp_path):
    labels = np.full(32, 3, dtype=np.uint8)
    labels[5] = 10
    folder, _ = _idx_dir_with(tmp_path, "y_test", lambda p: write_idx(p, labels, IDX_LABELS_MAGIC))
    with pytest.raises(DataError, match=r"\[test\]: label 10 is outside 0..9"):
        _load(folder)


def test_unequal_counts(tmp_path):
    labels = np.zeros(63, dtype=np.uint8)
    folder, _ = _idx_dir_with(tmp_path, "y_train", lambda p: write_idx(p, labels, IDX_LABELS_MAGIC))
    with pytest.raises(DataError, match="64 images but 63 labels"):
        _load(folder)


def test_missing_file_and_missing_path(tmp_path):
    folder = write_idx_dir(tmp_path / "d", synthetic_arrays())
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        _load(folder)
    with pytest.raises(DataError, match="data.path not found"):
        _load(tmp_path / "nothing-here")


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match="missing"):
        _load(tmp_path)


def test_npz_missing_array(tmp_path):
    arrays = synthetic_arrays()
    del arrays["y_test"]
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=r"missing array\(s\) y_test"):
        _load(tmp_path / "d.npz")


def test_npz_with_pickled_objects_is_refused(tmp_path):
    arrays = synthetic_arrays()
    arrays["y_train"] = np.array([object()] * 64, dtype=object)
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match="not a numeric .npz"):
        _load(tmp_path / "d.npz")


def test_npz_with_scaled_float_images(tmp_path):
    arrays = synthetic_arrays()
    arrays["x_train"] = arrays["x_train"].astype(np.float32) / 255
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match="dtype float32; expected uint8"):
        _load(tmp_path / "d.npz")


def test_npz_with_flat_images(tmp_path):
    arrays = synthetic_arrays()
    arrays["x_test"] = arrays["x_test"].reshape(32, 784)
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=r"\[test\]: images have shape \(32, 784\)"):
        _load(tmp_path / "d.npz")


def test_truncated_npz(tmp_path):
    np.savez(tmp_path / "d.npz", **synthetic_arrays())
    data = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "d.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="d.npz"):
        _load(tmp_path / "d.npz")


def test_a_text_file_as_data(tmp_path):
    (tmp_path / "notes.txt").write_text("not data\n")
    with pytest.raises(DataError, match="notes.txt"):
        _load(tmp_path / "notes.txt")


def test_npy_instead_of_npz(tmp_path):
    np.save(tmp_path / "x.npy", synthetic_arrays()["x_train"])
    with pytest.raises(DataError, match="single .npy array"):
        _load(tmp_path / "x.npy")


def test_read_idx_direct_on_plain_file(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    path = write_idx(tmp_path / "labels", labels, IDX_LABELS_MAGIC)
    np.testing.assert_array_equal(read_idx(path, IDX_LABELS_MAGIC), labels)
    with pytest.raises(DataError, match="magic number 2049 is not 2051"):
        read_idx(path, IDX_IMAGES_MAGIC)
    shutil.copy(path, tmp_path / "short")
    (tmp_path / "short").write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="too short"):
        read_idx(tmp_path / "short", IDX_LABELS_MAGIC)


@needs_t10k
def test_make_split_script_writes_the_8000_2000_split(tmp_path, split_arrays):
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "split.npz"
    result = subprocess.run(
        [sys.executable, ROOT / "scripts" / "make_split.py", T10K, out],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    with np.load(out) as written:
        for key, expected in split_arrays.items():
            np.testing.assert_array_equal(written[key], expected)


@pytest.mark.parametrize("form", ["tensorflow", "jax"], ids=["tf.data", "PyDataset"])
def test_training_batches_follow_the_seed_and_epoch_order_and_skip(form):
    from mnist_mlp import runtime
    from mnist_mlp.data import TrainingBatches, epoch_order, preprocess

    runtime.import_tensorflow()
    images = np.random.default_rng(0).integers(0, 256, size=(10, 784), dtype=np.uint8)
    labels = np.arange(10) % 10
    x, y = preprocess(images, labels)

    def passes(feed, epochs):
        data = feed.for_fit(form)  # built once, iterated once per epoch as fit does
        for epoch in epochs:
            feed.epoch = epoch  # what callbacks.EpochFeed does at each epoch begin
            if form == "tensorflow":
                yield [(bx.numpy(), by.numpy()) for bx, by in data]
            else:
                yield [data[i] for i in range(len(data))]

    first, second = epoch_order(3, 1, 10), epoch_order(3, 2, 10)
    full = TrainingBatches(images, labels, 4, 3, epoch=1)
    # Each pass is one epoch in that epoch's order; the last batch is partial.
    expected = [[first[:4], first[4:8], first[8:]], [second[:4], second[4:8], second[8:]]]
    got = list(passes(full, [1, 2]))
    # A feed that skips (a mid-epoch resume) starts its epoch after the skipped batches.
    got.append(next(passes(TrainingBatches(images, labels, 4, 3, epoch=1, skip=1), [1])))
    expected.append([first[4:8], first[8:]])
    assert full.num_batches == 3
    assert [len(p) for p in got] == [len(p) for p in expected]
    for pass_, orders in zip(got, expected, strict=True):
        for (bx, by), order in zip(pass_, orders, strict=True):
            # Bit for bit what preprocess gives, in the epoch's order.
            np.testing.assert_array_equal(bx, x[order])
            np.testing.assert_array_equal(by, y[order])
            assert bx.dtype.name == "float32" and by.dtype.name == "float32"
    assert not np.array_equal(first, second)  # every epoch has its own order
    np.testing.assert_array_equal(epoch_order(3, 1, 10), first)  # and it is reproducible
