"""Run directories: naming, claiming a new one, and checking one to resume."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from mnist_mlp.config import Config, load_config
from mnist_mlp.errors import ConfigError, RunDirError

RUNS_ROOT = Path("runs")
# The training state saved after every epoch (see checkpoint.py).
STATE_FILE = "state.npz"


def extendable_key(config: Config) -> tuple[str, ...]:
    """The one key --resume may change: the epochs of the run's last phase.

    Anything else would make the resumed run a different experiment from the
    one its first epochs belong to. A pretrained model's train.epochs is where
    its fine-tuning starts, so only model.fine_tune.epochs may grow there
    (unless it has no fine-tuning phase).
    """
    if config.model.type == "pretrained" and config.model.fine_tune.epochs:
        return ("model", "fine_tune", "epochs")
    return ("train", "epochs")


def default_run_dir(name: str, root: Path = RUNS_ROOT, now: dt.datetime | None = None) -> Path:
    """`runs/<config name>-<UTC timestamp>`, with -2, -3... if that name is taken."""
    now = now or dt.datetime.now(dt.timezone.utc)
    base = root / f"{name}-{now:%Y%m%d-%H%M%S}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def check_new_run_dir(path: Path) -> None:
    """Refuse a run directory that holds anything, or one we cannot create.

    Raises:
        RunDirError: with what is wrong and how to fix it.
    """
    if path.exists():
        if not path.is_dir():
            raise RunDirError(f"run directory {path} is an existing file; choose another --run-dir")
        try:
            occupied = any(path.iterdir())
        except OSError as err:
            raise RunDirError(f"cannot read run directory {path}: {err.strerror}") from None
        if occupied:
            raise RunDirError(
                f"run directory {path} already exists and is not empty; runs are never "
                "overwritten: choose another --run-dir, leave it out for a new timestamped "
                f"one, or continue it with --resume {path}"
            )
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(
            f"cannot create run directory {path}: {parent} is not writable; "
            "choose a --run-dir in a folder you can write to"
        )


def claim_run_dir(path: Path) -> None:
    """Create `path` and claim it with an exclusively created config.yaml.

    check_new_run_dir runs before the data is loaded; another run may have
    taken the folder since. Creating the first file with O_EXCL makes the
    claim atomic.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path / "config.yaml", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        raise RunDirError(
            f"run directory {path} was taken by another run; choose another --run-dir"
        ) from None
    except OSError as err:
        raise RunDirError(f"cannot create run directory {path}: {err.strerror}") from None


def lock_run_dir(path: Path) -> int:
    """Hold an exclusive lock on the run folder while this process trains in it.

    Two processes resuming the same run would write over each other's state.
    The lock is on the folder itself (no lock file to clean up) and goes with
    the process, however it ends.

    Returns:
        The folder's descriptor; os.close() it (or exit) to release the lock.
    """
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirError(
            f"{path} is in use by another mnist-mlp process; wait for it to finish or stop it"
        ) from None
    return fd


def resume_config(run_dir: Path, config_path: str | None, overrides: tuple[str, ...]) -> Config:
    """The config to resume `run_dir` with: its own, plus the changes that are safe.

    Raises:
        RunDirError: the folder is not an unfinished run.
        ConfigError: --config differs from the run's, or --set changes an unsafe key.
    """
    if not run_dir.is_dir():
        raise RunDirError(f"--resume {run_dir}: no such run directory")
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not (run_dir / "history.csv").is_file():
        raise RunDirError(
            f"--resume {run_dir}: not a run directory (no config.yaml and history.csv); "
            "pass a folder written by `mnist-mlp train`"
        )
    if (run_dir / "metrics.json").is_file():
        raise RunDirError(
            f"--resume {run_dir}: this run already finished (it has metrics.json); "
            "start a new run, e.g. with --config " + str(saved)
        )
    if not (run_dir / STATE_FILE).is_file():
        raise RunDirError(
            f"--resume {run_dir}: the run stopped before its first epoch ended, so there is "
            "nothing to resume; start it again with a new --run-dir"
        )
    original = load_config(saved)
    candidate = load_config(config_path if config_path is not None else saved, overrides)
    changed = _changed_keys(original.model_dump(), candidate.model_dump())
    key = extendable_key(original)
    unsafe = [".".join(k) for k in changed if k != key]
    if unsafe:
        given = f"--config {config_path}" if config_path is not None else "--set"
        raise ConfigError(
            f"--resume {run_dir}: {given} would change {', '.join(unsafe)} of the run; only "
            f"{'.'.join(key)} may change when resuming (to extend the run)"
        )
    return candidate


def _changed_keys(old: dict, new: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    keys = []
    for key in old.keys() | new.keys():
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, prefix + (key,))
        elif a != b:
            keys.append(prefix + (key,))
    return sorted(keys)
