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
