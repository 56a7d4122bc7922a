"""Run files: atomic replacement, a full disk, and strict JSON."""

from __future__ import annotations

import errno
import json

import pytest

from mnist_mlp import files
from mnist_mlp.errors import RunDirError


def test_write_replaces_atomically_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    files.write_json(target, {"a": 1})
    files.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_full_disk_keeps_the_previous_file(tmp_path):
    target = tmp_path / "model.keras"
    target.write_bytes(b"the good model")

    def fill_disk(tmp):
        tmp.write_bytes(b"half a mod")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RunDirError, match="No space left on device"):
        files.atomic_write(target, fill_disk)
    assert target.read_bytes() == b"the good model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.keras"]


def test_json_turns_non_finite_numbers_into_null():
    text = files.to_json({"loss": float("nan"), "rows": [1.0, float("inf")], "ok": 0.5})
    assert json.loads(text) == {"loss": None, "rows": [1.0, None], "ok": 0.5}
    assert "NaN" not in text and "Infinity" not in text


def test_tensorflow_failures_become_one_line_with_the_hint():
    import tensorflow as tf

    from mnist_mlp.errors import TrainingError

    err = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor\n  at ...")
    message = str(TrainingError.from_op_error(err, "lower train.batch_size"))
    assert message == (
        "TensorFlow failed: ResourceExhaustedError: OOM when allocating tensor; "
        "lower train.batch_size"
    )
    assert TrainingError.exit_code == 1
