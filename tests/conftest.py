"""Shared fixtures: real MNIST test images from ../shared, small data sets, the CLI."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_mlp.data import IDX_FILES, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
T10K = Path(os.environ.get("MNIST_T10K_DIR", ROOT.parent / "shared" / "data" / "mnist-t10k"))
FASHION = Path("/usr/share/datasets/fashion-mnist")
# The console script installed beside this interpreter: tests run what users run.
EXECUTABLE = Path(sys.executable).with_name("mnist-mlp")

needs_t10k = pytest.mark.skipif(
    not (T10K / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"real MNIST test images not found at {T10K} (a user's clone has no ../shared)",
)
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not found at {FASHION}: apt-get install -y dataset-fashion-mnist",
)


def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    """Write `array` as an IDX file of unsigned bytes (gzipped if the name ends in .gz)."""
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(payload)
    return path


def write_idx_dir(folder: Path, arrays: dict[str, np.ndarray], gz: bool = True) -> Path:
    """Write the four LeCun files for `arrays` (keys x_train, y_train, x_test, y_test)."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in IDX_FILES.items():
        magic = IDX_IMAGES_MAGIC if key.startswith("x") else IDX_LABELS_MAGIC
        write_idx(folder / (stem + (".gz" if gz else "")), arrays[key], magic)
    return folder


def synthetic_arrays(n_train: int = 64, n_test: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Random 28x28 uint8 digits with labels 0..9: the right shapes, no meaning."""
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, size=n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }


@pytest.fixture(scope="session")
def t10k() -> tuple[np.ndarray, np.ndarray]:
    """The real 10,000 MNIST test images and labels."""
    if not (T10K / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST test images not found at {T10K}")
    x = read_idx(T10K / "t10k-images-idx3-ubyte.gz", IDX_IMAGES_MAGIC)
    y = read_idx(T10K / "t10k-labels-idx1-ubyte.gz", IDX_LABELS_MAGIC)
    return x, y


@pytest.fixture(scope="session")
def split_arrays(t10k) -> dict[str, np.ndarray]:
    """The real 8,000/2,000 split: first 8,000 test images train, the last 2,000 test."""
    x, y = t10k
    return {"x_train": x[:8000], "y_train": y[:8000], "x_test": x[8000:], "y_test": y[8000:]}


@pytest.fixture(scope="session")
def split_npz(split_arrays, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("split") / "mnist-split.npz"
    np.savez(path, **split_arrays)
    return path


@pytest.fixture(scope="session")
def split_idx_dir(split_arrays, tmp_path_factory) -> Path:
    return write_idx_dir(tmp_path_factory.mktemp("split-idx"), split_arrays, gz=True)


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict[str, str]:
    """Environment for CLI subprocesses: a private, empty Keras cache, no network."""
    home = tmp_path_factory.mktemp("keras-home")
    env = dict(os.environ)
    env["KERAS_HOME"] = str(home)
    # Any download attempt fails at once against a closed local port instead of
    # waiting on the network.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[var] = "http://127.0.0.1:9"
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    return env


@pytest.fixture(scope="session")
def run_cli(cli_env):
    """Run the installed `mnist-mlp` executable; returns the CompletedProcess."""
    assert EXECUTABLE.is_file(), f"{EXECUTABLE} missing: install the project (pip install -e .)"

    def run(
        *args: str, cwd: Path | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(EXECUTABLE), *map(str, args)],
            cwd=cwd,
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


EPOCHS = 3


@pytest.fixture(scope="session")
def trained_run(run_cli, split_idx_dir, tmp_path_factory):
    """One real run: 3 epochs on the 8,000/2,000 split, read from gzipped IDX files.

    Returns the run folder, the finished CompletedProcess and the config it used.
    """
    from mnist_mlp.config import load_config

    run_dir = tmp_path_factory.mktemp("runs") / "quick-run"
    overrides = [f"train.epochs={EPOCHS}", "device=cpu", f"data.path={split_idx_dir}"]
    args = ["train", "--config", CONFIGS / "quick.yaml", "--run-dir", run_dir]
    for override in overrides:
        args += ["--set", override]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    return run_dir, result, load_config(CONFIGS / "quick.yaml", overrides)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, code: int = 2):
    """The CLI's contract for bad input: exit code, one stderr line, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, f"expected one stderr line, got:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]
