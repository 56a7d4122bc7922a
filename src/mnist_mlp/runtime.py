"""Backend and device choice, in one place.

Everything that touches TensorFlow's process-wide state goes through here:
the environment set before the first import, the quieting of its C++
start-up log, and which device a run uses. A second backend (JAX) or a
distribution strategy plugs in here without the data, model or training
modules changing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from mnist_mlp.errors import DeviceError, InstallError

# The Keras backends a run can use (config key `backend`). TensorFlow is imported
# under both: the input pipeline is tf.data, and export and install-check use it.
BACKENDS = ("tensorflow", "jax")
_backend = "tensorflow"

# C++ start-up lines TensorFlow prints on every import, before absl logging is
# initialised (so TF_CPP_MIN_LOG_LEVEL cannot silence them). They say nothing a
# user can act on; anything not matched here is passed through untouched.
_STARTUP_NOISE = [
    re.compile(p)
    for p in (
        r"^WARNING: All log messages before absl::InitializeLog\(\) is called",
        r"cudart_stub\.cc.*Could not find cuda drivers",
        r"cpu_feature_guard\.cc",
        r"^To enable the following instructions:.*rebuild TensorFlow",
        r"oneDNN custom operations are on",
        r"Unable to register cu(DNN|FFT|BLAS) factory",
        r"computation placer already registered",
        r"TF-TRT Warning: Could not find TensorRT",
        # On a machine without a GPU this is expected; install-check reports it.
        r"cuda_platform\.cc.*failed call to cuInit",
        r"cuda_executor\.cc.*could not open file to read NUMA node",
        # tf.data graphs built by this TensorFlow name an attribute its own C++
        # ops do not know yet (harmless, printed at error level on every fit).
        r"NodeDef mentions attribute use_unbounded_threadpool",
    )
]

_startup_messages: list[str] = []
# --verbose: TensorFlow's own logs, INFO lines and start-up noise included.
_verbose = False


def set_verbose(verbose: bool) -> None:
    """Show everything TensorFlow logs (call before TensorFlow is first imported)."""
    global _verbose
    _verbose = verbose


@dataclass(frozen=True)
class Device:
    """The device a run uses, as recorded in metrics.json."""

    kind: str  # "cpu" or "gpu"
    name: str  # TensorFlow's logical device name, e.g. "/device:GPU:0"
    description: str  # human-readable, e.g. "GPU 0: NVIDIA H200"
    gpus_found: int = 0
    visible: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "description": self.description,
            "gpus_found": self.gpus_found,
            "visible": list(self.visible),
        }


def backend() -> str:
    """The Keras backend of this process: "tensorflow" or "jax"."""
    return _backend


def set_backend(name: str) -> None:
    """Choose the Keras backend; only before Keras is first imported.

    Raises:
        InstallError: the backend's package is missing, or Keras already runs on
            another backend in this process (it cannot switch).
    """
    global _backend
    if name not in BACKENDS:
        raise InstallError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if name == "jax" and importlib.util.find_spec("jax") is None:
        raise InstallError(
            'backend: jax needs JAX: pip install "mnist-mlp[jax]" (CPU), or set backend: tensorflow'
        )
    if name == _backend:
        return
    if "keras" in sys.modules:
        raise InstallError(
            f"Keras already runs on {_backend} in this process and cannot switch to {name}; "
            "start a new process"
        )
    _backend = name


def prepare_environment() -> None:
    """Set what TensorFlow and Keras read at import time."""
    # Forced, not defaulted: a KERAS_BACKEND=jax left in the shell would otherwise
    # run another backend while metrics.json records this one.
    os.environ["KERAS_BACKEND"] = _backend
    if _verbose:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    else:
        # Drop INFO lines once absl logging is up; warnings and errors still show.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


def import_tensorflow():
    """Import TensorFlow and Keras once, with the start-up noise filtered out.

    Returns:
        The `tensorflow` module.
    """
    if "tensorflow" in sys.modules and "keras" in sys.modules:
        return sys.modules["tensorflow"]
    prepare_environment()
    try:
        with _filtered_stderr():
            import keras  # noqa: F401  (registers the backend while stderr is filtered)
            import tensorflow as tf

            # Device discovery prints its own CUDA lines; do it inside the filter.
            gpus = tf.config.list_physical_devices("GPU")
            if _backend != "tensorflow" and gpus:
                # TensorFlow only feeds the data then: it must not take the GPU's
                # memory from the backend that computes.
                _hide_gpus(tf, f"backend: {_backend}")
    except ImportError as err:
        raise InstallError(
            f"cannot import TensorFlow/Keras ({err}); reinstall with "
            '`pip install --force-reinstall "mnist-mlp"` in this environment'
        ) from None
    return tf


def versions() -> dict[str, str]:
    """Versions that decide a run's numbers, for metrics.json and install-check."""
    import platform

    tf = import_tensorflow()
    import keras
    import numpy

    from mnist_mlp import __version__

    found = {
        "mnist_mlp": __version__,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": numpy.__version__,
    }
    if _backend == "jax":
        import jax

        found["jax"] = jax.__version__
    return found


def startup_messages() -> list[str]:
    """The start-up lines that were filtered out (install-check shows them)."""
    return list(_startup_messages)


def resolve_device(requested: str, gpus: list[str], finder: str = "TensorFlow") -> str:
    """Decide which kind of device a run uses.

    Args:
        requested: "auto", "cpu" or "gpu", from the config.
        gpus: names of the GPUs the backend lists.
        finder: who looked for them, for the error message.

    Returns:
        "gpu" or "cpu".

    Raises:
        DeviceError: "gpu" was requested and none was found.
    """
    if requested == "cpu":
        return "cpu"
    if gpus:
        return "gpu"
    if requested == "gpu":
        raise DeviceError(
            f"device: gpu was requested but {finder} finds no GPU; run "
            "`mnist-mlp install-check --gpu` to see why, or use --set device=cpu"
        )
    return "cpu"


def select_device(requested: str) -> Device:
    """Make the requested device the one the backend uses, before any tensor exists."""
    if _backend == "jax":
        return _select_jax_device(requested)
    tf = import_tensorflow()
    gpus = tf.config.list_physical_devices("GPU")
    kind = resolve_device(requested, [g.name for g in gpus])
    if kind == "cpu" and gpus:
        _hide_gpus(tf, "device: cpu")
    if kind == "gpu":
        details = tf.config.experimental.get_device_details(gpus[0])
        description = f"GPU 0: {details.get('device_name', gpus[0].name)}"
        name = "/device:GPU:0"
    else:
        description = "CPU"
        name = "/device:CPU:0"
    visible = tuple(d.name for d in tf.config.list_logical_devices())
    return Device(kind, name, description, gpus_found=len(gpus), visible=visible)


def _hide_gpus(tf, why: str) -> None:
    """Keep TensorFlow off every GPU; only possible before it initialises them."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as err:
        raise DeviceError(
            f"cannot hide the GPUs from TensorFlow for {why} ({err}); "
            "set CUDA_VISIBLE_DEVICES=-1 before starting"
        ) from None


def _select_jax_device(requested: str) -> Device:
    if requested == "cpu":
        # Read when JAX starts its backends: GPUs stay unused, as device: cpu says.
        os.environ["JAX_PLATFORMS"] = "cpu"
    import_tensorflow()
    import jax

    if requested == "cpu":
        jax.config.update("jax_platforms", "cpu")
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:  # no GPU backend: CPU-only jaxlib, or no driver
        gpus = []
    kind = resolve_device(requested, [str(g) for g in gpus], finder="JAX")
    if kind == "gpu":
        description = f"GPU 0: {gpus[0].device_kind}"
        name = f"gpu:{gpus[0].id}"
    else:
        description = "CPU"
        name = "cpu:0"
    visible = tuple(f"{d.platform}:{d.id}" for d in jax.devices())
    return Device(kind, name, description, gpus_found=len(gpus), visible=visible)


def precision_policy(precision: str, device_kind: str) -> str:
    """The Keras dtype policy for `train.precision` on a device of `device_kind`.

    Raises:
        DeviceError: mixed_float16 on a CPU, which has no float16 arithmetic (Keras
            would emulate it, many times slower than float32).
    """
    if precision == "mixed_float16" and device_kind != "gpu":
        raise DeviceError(
            "train.precision: mixed_float16 needs a GPU (CPUs have no float16 arithmetic); "
            "use mixed_bfloat16 or float32 on the CPU"
        )
    return precision


def quiet_tensorflow():
    """A context in which TensorFlow's known noise on stderr is dropped (see _STARTUP_NOISE)."""
    return _filtered_stderr()


@contextlib.contextmanager
def _filtered_stderr():
    """Route file descriptor 2 (where C++ logs go) through a filter, live.

    A thread forwards every line that is not known start-up noise as soon as it
    arrives, so nothing real is held back even if the import crashes the process.
    """
    if _verbose:
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr (embedded interpreter); nothing to filter
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_pump, args=(read_end, saved), daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump sees EOF
        pump.join(timeout=5)
        os.close(saved)


def _pump(read_end: int, target: int) -> None:
    with os.fdopen(read_end, "rb") as stream:
        for raw in stream:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if any(p.search(line) for p in _STARTUP_NOISE):
                _startup_messages.append(line)
            else:
                os.write(target, raw)
