"""Writing run files so that a crash or a full disk never leaves a half-written one."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from mnist_mlp.errors import RunDirError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it over `path`.

    The rename is atomic on POSIX within one folder, so readers see either the
    old file or the complete new one.

    Raises:
        RunDirError: the file could not be written (permissions, disk full).
    """
    # Keep the suffix: Keras decides the format from the file name.
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise RunDirError(f"cannot write {path}: {err.strerror or err}") from None


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def save_model(model, path: Path) -> None:
    atomic_write(path, lambda tmp: model.save(tmp))
