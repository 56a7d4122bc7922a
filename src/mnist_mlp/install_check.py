"""Is this installation able to train, and on which devices?"""

from __future__ import annotations

import importlib.util
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mnist_mlp import runtime

GPU_EXTRA_HINT = 'pip install "mnist-mlp[gpu]" (TensorFlow with CUDA: tensorflow[and-cuda])'


@dataclass(frozen=True)
class DeviceCheck:
    """A small matrix product run on one device and compared with NumPy."""

    name: str
    device_type: str
    ok: bool
    ran_on: str = ""
    seconds: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class InstallReport:
    versions: dict[str, str]
    backend: str
    build: dict
    driver: str | None
    devices: list[DeviceCheck]
    tensorflow_messages: list[str] = field(default_factory=list)
    # The JAX backend (backend: jax): its version and the same check on each of
    # its devices; None when JAX is not installed.
    jax: dict | None = None

    @property
    def gpus(self) -> list[DeviceCheck]:
        return [d for d in self.devices if d.device_type == "GPU"]

    @property
    def ok(self) -> bool:
        """Every device TensorFlow (and JAX, when installed) lists computed the product right."""
        jax_ok = self.jax is None or (
            bool(self.jax["devices"]) and all(d["ok"] for d in self.jax["devices"])
        )
        return bool(self.devices) and all(d.ok for d in self.devices) and jax_ok

    @property
    def gpu_ok(self) -> bool:
        return any(d.ok for d in self.gpus)

    @property
    def gpu_advice(self) -> str | None:
        return gpu_advice(
            bool(self.build.get("is_cuda_build")),
            self.driver,
            len(self.gpus),
            self.build.get("cuda_version"),
        )

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "gpu_ok": self.gpu_ok,
            "versions": self.versions,
            "backend": self.backend,
            "build": self.build,
            "nvidia_driver": self.driver,
            "devices": [asdict(d) for d in self.devices],
            "gpu_advice": self.gpu_advice,
            "tensorflow_messages": self.tensorflow_messages,
            "jax": self.jax,
        }


def gpu_advice(
    is_cuda_build: bool, driver: str | None, gpus_found: int, cuda_version: str | None = None
) -> str | None:
    """What to do when no GPU is usable, or None when one is.

    Args:
        is_cuda_build: TensorFlow was built with CUDA.
        driver: the NVIDIA kernel driver version line, or None when absent.
        gpus_found: GPUs TensorFlow lists.
        cuda_version: the CUDA version TensorFlow was built with.
    """
    if gpus_found:
        return None
    if driver is None:
        return (
            "no NVIDIA driver found: install the NVIDIA driver for your GPU "
            f"(nvidia-smi must list it), then {GPU_EXTRA_HINT}"
        )
    if not is_cuda_build:
        return f"this TensorFlow build has no CUDA support: {GPU_EXTRA_HINT}"
    return (
        "the NVIDIA driver is loaded but TensorFlow lists no GPU: "
        f"{GPU_EXTRA_HINT} for the CUDA {cuda_version or ''} libraries it needs, "
        "and check that CUDA_VISIBLE_DEVICES does not hide the GPU"
    )


def nvidia_driver() -> str | None:
    """The loaded NVIDIA kernel driver's version line, or None."""
    version_file = Path("/proc/driver/nvidia/version")
    try:
        return version_file.read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return None


def check_device(tf, name: str, device_type: str) -> DeviceCheck:
    """Multiply two small-integer matrices on `name`; the result must be exact.

    Small integers are exact in float32 (and in the TF32 that GPUs use for
    matmul), so any difference from NumPy is a broken device, not rounding.
    """
    a, b, expected = _test_matrices()
    start = time.perf_counter()
    try:
        with tf.device(name):
            product = tf.linalg.matmul(tf.constant(a), tf.constant(b))
        result = product.numpy()
    except (tf.errors.OpError, RuntimeError, ValueError) as err:
        message = " ".join(str(err).split())[:200]
        return DeviceCheck(name, device_type, ok=False, error=message)
    seconds = time.perf_counter() - start
    error = ""
    if not product.device.endswith(name.lstrip("/")):
        # Soft placement can quietly run the op elsewhere; that is not this device working.
        error = f"the product ran on {product.device}, not on {name}"
    elif not np.array_equal(result, expected):
        wrong = int((result != expected).sum())
        error = f"{wrong} of {expected.size} entries of the product are wrong"
    return DeviceCheck(
        name, device_type, ok=not error, ran_on=product.device, seconds=seconds, error=error
    )


def _test_matrices() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = rng.integers(-3, 4, size=(128, 96)).astype("float32")
    b = rng.integers(-3, 4, size=(96, 64)).astype("float32")
    return a, b, a @ b


def check_jax() -> dict | None:
    """JAX's version and the exact small-integer product on each JAX device, if installed."""
    if importlib.util.find_spec("jax") is None:
        return None
    try:
        import jax
    except ImportError as err:
        return {"version": None, "devices": [], "error": f"cannot import jax ({err})"}
    a, b, expected = _test_matrices()
    devices = []
    for device in jax.devices():
        name = f"{device.platform}:{device.id}"
        try:
            result = np.asarray(jax.device_put(a, device) @ jax.device_put(b, device))
            ok = bool(np.array_equal(result, expected))
            error = "" if ok else "the product is wrong"
        except RuntimeError as err:  # XlaRuntimeError: a broken device or driver
            ok, error = False, " ".join(str(err).split())[:200]
        devices.append({"name": name, "kind": device.device_kind, "ok": ok, "error": error})
    return {"version": jax.__version__, "devices": devices, "error": ""}


def run_install_check() -> InstallReport:
    """Report versions, the CUDA build, and a matrix-product check on every device."""
    tf = runtime.import_tensorflow()
    info = dict(tf.sysconfig.get_build_info())
    build = {
        "is_cuda_build": bool(info.get("is_cuda_build", False)),
        "cuda_version": info.get("cuda_version"),
        "cudnn_version": info.get("cudnn_version"),
    }
    devices = [check_device(tf, d.name, d.device_type) for d in tf.config.list_logical_devices()]
    # TensorFlow's own reason for finding no GPU, e.g. "failed call to cuInit: ...".
    messages = [
        re.sub(r"^[IWEF]\d{4} [\d:. ]+\S+\] ", "", m)
        for m in runtime.startup_messages()
        if "cuInit" in m
    ]
    return InstallReport(
        versions=runtime.versions(),
        backend=runtime.backend(),
        build=build,
        driver=nvidia_driver(),
        devices=devices,
        tensorflow_messages=messages,
        jax=check_jax(),
    )
