"""Device choice and TensorFlow start-up handling, testable on a CPU-only machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mnist_mlp import runtime
from mnist_mlp.errors import DeviceError
from mnist_mlp.install_check import GPU_EXTRA_HINT, gpu_advice


@pytest.mark.parametrize(
    ("requested", "gpus", "expected"),
    [
        ("auto", [], "cpu"),
        ("auto", ["/physical_device:GPU:0"], "gpu"),
        ("cpu", ["/physical_device:GPU:0"], "cpu"),
        ("cpu", [], "cpu"),
        ("gpu", ["/physical_device:GPU:0", "/physical_device:GPU:1"], "gpu"),
    ],
)
def test_resolve_device(requested, gpus, expected):
    assert runtime.resolve_device(requested, gpus) == expected


def test_gpu_requested_without_one_is_an_error_never_a_cpu_run():
    with pytest.raises(DeviceError, match="no GPU") as info:
        runtime.resolve_device("gpu", [])
    assert "install-check --gpu" in str(info.value)
    assert "device=cpu" in str(info.value)


def test_gpu_advice_for_each_broken_setup():
    assert gpu_advice(True, "NVRM version: 550", gpus_found=1) is None
    no_driver = gpu_advice(True, None, gpus_found=0)
    assert "install the NVIDIA driver" in no_driver and GPU_EXTRA_HINT in no_driver
    cpu_build = gpu_advice(False, "NVRM version: 550", gpus_found=0)
    assert "no CUDA support" in cpu_build and GPU_EXTRA_HINT in cpu_build
    unseen = gpu_advice(True, "NVRM version: 550", gpus_found=0, cuda_version="12.5.1")
    assert "CUDA 12.5.1" in unseen and "CUDA_VISIBLE_DEVICES" in unseen


def test_startup_noise_is_filtered_and_real_messages_kept(capfd):
    with runtime._filtered_stderr():
        # Written to the file descriptor, as TensorFlow's C++ logging does.
        os.write(2, b"I0000 00:00:1.0 1 cpu_feature_guard.cc:227] This TensorFlow binary\n")
        os.write(2, b"W0000 00:00:1.0 1 something.cc:1] a real warning\n")
    err = capfd.readouterr().err
    assert "a real warning" in err
    assert "cpu_feature_guard" not in err
    assert any("cpu_feature_guard" in m for m in runtime.startup_messages())


def test_select_cpu_device_hides_gpus_and_prints_no_startup_noise():
    # A fresh interpreter: GPUs can only be hidden before TensorFlow initialises.
    code = (
        "import json; from mnist_mlp import runtime; d = runtime.select_device('cpu'); "
        "import tensorflow as tf; "
        "print(json.dumps([d.kind, d.name, [x.name for x in tf.config.list_logical_devices()]]))"
    )
    env = dict(os.environ, KERAS_BACKEND="jax")  # a stray setting must not switch backends
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    kind, name, logical = json.loads(result.stdout.splitlines()[-1])
    assert (kind, name) == ("cpu", "/device:CPU:0")
    assert logical and all("GPU" not in x for x in logical)
    assert "absl::InitializeLog" not in result.stderr
    assert "cpu_feature_guard" not in result.stderr


def test_select_gpu_device_on_a_cpu_machine_fails():
    tf = runtime.import_tensorflow()
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="no GPU"):
        runtime.select_device("gpu")


class _FakeTensor:
    def __init__(self, value, device):
        self.value, self.device = value, device

    def numpy(self):
        return self.value


class _FakeTF:
    """Just enough of tf for check_device: a matmul that can be wrong or misplaced."""

    class errors:  # noqa: N801 - mirrors tf.errors
        OpError = RuntimeError

    def __init__(self, corrupt=False, placed="/job:localhost/replica:0/task:0/device:GPU:0"):
        self.corrupt, self.placed = corrupt, placed
        self.linalg = self

    def device(self, name):
        import contextlib

        return contextlib.nullcontext()

    def constant(self, value):
        return value

    def matmul(self, a, b):
        product = a @ b
        if self.corrupt:
            product = product.copy()
            product[0, 0] += 1
        return _FakeTensor(product, self.placed)


def test_device_check_catches_wrong_results_and_silent_misplacement():
    from mnist_mlp.install_check import check_device

    assert check_device(_FakeTF(), "/device:GPU:0", "GPU").ok
    wrong = check_device(_FakeTF(corrupt=True), "/device:GPU:0", "GPU")
    assert not wrong.ok and "1 of 8192 entries" in wrong.error
    elsewhere = check_device(_FakeTF(placed="/job:localhost/device:CPU:0"), "/device:GPU:0", "GPU")
    assert not elsewhere.ok and "not on /device:GPU:0" in elsewhere.error
