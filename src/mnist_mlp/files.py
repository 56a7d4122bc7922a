"""Writing run files so that a crash or a full disk never leaves a half-written one."""

from __future__ import annotations

import contextlib
import json
import math
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
        # The rename itself must reach the disk too, or a power loss can undo it.
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as err:
        raise RunDirError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        # Also on Ctrl-C mid-write: the old file stays, the partial one goes.
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def to_json(data) -> str:
    """Strict JSON: NaN and infinities (a diverged loss) become null, which JSON allows."""
    return json.dumps(_finite(data), indent=2, allow_nan=False)


def write_json(path: Path, data: dict) -> None:
    write_text(path, to_json(data) + "\n")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def save_model(model, path: Path) -> None:
    atomic_write(path, lambda tmp: model.save(tmp))
