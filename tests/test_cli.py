"""The CLI as users run it: the installed executable, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import CONFIGS, ROOT, assert_one_line_error

from mnist_mlp import __version__
from mnist_mlp.config import load_config, validate


def test_help_version_and_config_errors_do_not_import_tensorflow():
    # One interpreter runs every answer that must stay fast, then reports what
    # got imported.
    code = r"""
import sys
from mnist_mlp.cli import main
for argv in (["--help"], ["train", "--help"], ["evaluate", "--help"], ["predict", "--help"],
             ["export", "--help"], ["install-check", "--help"], ["config", "show", "--help"],
             ["--version"], ["train", "--quiet", "--verbose"],
             ["train", "--set", "train.epochs=0"], ["train", "--config", "missing.yaml"],
             ["config", "show", "--set", "model.units=32"]):
    try:
        main(argv)
    except SystemExit:
        pass
heavy = sorted(m for m in ("tensorflow", "keras", "numpy") if m in sys.modules)
# export checks its output path before loading TensorFlow (numpy is fine there).
try:
    main(["export", "--checkpoint", "m.keras", "--format", "onnx", "--output", "README.md"])
except SystemExit:
    pass
heavy += sorted(m for m in ("tensorflow", "keras") if m in sys.modules)
print("IMPORTED=" + ",".join(heavy), file=sys.stderr)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT
    )
    assert result.stderr.splitlines()[-1] == "IMPORTED=", result.stderr
    assert "error: README.md already exists" in result.stderr  # refused before TensorFlow
    assert "error: --quiet and --verbose contradict" in result.stderr
    assert "Commands:" in result.stdout and "install-check" in result.stdout
    assert "error: --set: train.epochs: got 0" in result.stderr  # the config error was answered


def test_version(run_cli):
    result = run_cli("--version")
    assert result.returncode == 0
    assert __version__ in result.stdout


@pytest.mark.parametrize(
    "command", ["train", "evaluate", "predict", "export", "install-check", "config"]
)
def test_each_command_has_help(run_cli, command):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and "Usage: mnist-mlp" in result.stdout


def test_config_show_prints_the_resolved_config(run_cli):
    result = run_cli("config", "show", "--config", CONFIGS / "cpu.yaml", "--set", "train.epochs=3")
    assert result.returncode == 0, result.stderr
    shown = validate(yaml.safe_load(result.stdout))
    expected = load_config(CONFIGS / "cpu.yaml", ["train.epochs=3"])
    assert shown == expected and shown.train.epochs == 3


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["config", "show", "--config", "nope.yaml"], ["config file not found: nope.yaml"]),
        (["config", "show", "--set", "train.epochs=0"], ["train.epochs", "got 0"]),
        (["config", "show", "--set", "train.epochs"], ["expected KEY=VALUE"]),
        (["config", "show", "--set", "model.unit=3"], ["did you mean 'model.units'"]),
        (["trian"], ["No such command 'trian'", "train"]),
        (["train", "--bogus"], ["No such option", "--bogus"]),
        (["train", "--config", str(CONFIGS)], ["is a directory"]),
        (["evaluate"], ["Missing option '--checkpoint'"]),
        (["install-check", "--cuda"], ["No such option", "--cuda"]),
        (["predict", "--checkpoint", "m.keras"], ["Missing argument 'INPUT...'"]),
        (["export", "--checkpoint", "m.keras", "--output", "x"], ["Missing option '--format'"]),
        (
            ["export", "--checkpoint", "m.keras", "--format", "pb", "--output", "x"],
            ["'pb' is not one of", "savedmodel"],
        ),
        (["config", "show", "--set", "data.path="], ["empty value"]),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(run_cli, args, fragments):
    assert_one_line_error(run_cli(*args), *fragments)


def test_bad_yaml_file(run_cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [5\n")
    assert_one_line_error(run_cli("train", "--config", bad), "malformed YAML", str(bad))


def test_train_gpu_without_gpu_fails_before_any_work(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", "--config", CONFIGS / "gpu.yaml", "--run-dir", run_dir)
    if "device: GPU" in result.stdout:
        pytest.skip("this machine has a GPU")
    assert_one_line_error(result, "no GPU", "install-check --gpu")
    assert not run_dir.exists()


def test_download_failure_is_one_line_with_the_offline_fix(run_cli, tmp_path):
    # cli_env points Keras at an empty cache and the proxy at a closed port.
    run_dir = tmp_path / "run"
    result = run_cli(
        "train", "--config", CONFIGS / "quick.yaml", "--set", "device=cpu", "--run-dir", run_dir
    )
    assert_one_line_error(result, "could not download mnist", "data.path")
    assert not run_dir.exists()


def test_train_with_missing_data_path(run_cli, tmp_path):
    result = run_cli(
        "train", "--set", f"data.path={tmp_path / 'none.npz'}", "--run-dir", tmp_path / "run"
    )
    assert_one_line_error(result, "data.path not found", "none.npz")
    assert not (tmp_path / "run").exists()


def test_train_with_a_corrupt_data_file(run_cli, tmp_path):
    (tmp_path / "d.npz").write_bytes(b"PK\x03\x04 truncated")
    result = run_cli(
        "train", "--set", f"data.path={tmp_path / 'd.npz'}", "--run-dir", tmp_path / "run"
    )
    assert_one_line_error(result, "d.npz")
    assert not (tmp_path / "run").exists()


def test_train_into_an_unwritable_place(run_cli, tmp_path, split_npz):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = run_cli("train", "--set", f"data.path={split_npz}", "--run-dir", blocker / "run")
    assert_one_line_error(result, "cannot create run directory", "not writable")


def test_install_check_passes_on_this_machine(run_cli):
    result = run_cli("install-check")
    assert result.returncode == 0, result.stderr
    assert "tensorflow" in result.stdout and "/device:CPU:0" in result.stdout
    assert "install OK" in result.stdout


def test_install_check_json_reports_versions_build_and_devices(run_cli):
    import keras
    import tensorflow as tf

    report = json.loads(run_cli("install-check", "--json").stdout)
    assert report["versions"]["tensorflow"] == tf.__version__
    assert report["versions"]["keras"] == keras.__version__
    assert report["build"]["is_cuda_build"] == tf.sysconfig.get_build_info()["is_cuda_build"]
    cpu = [d for d in report["devices"] if d["device_type"] == "CPU"]
    assert cpu and all(d["ok"] for d in cpu) and cpu[0]["ran_on"].endswith("CPU:0")
    assert report["ok"] is True


def test_install_check_gpu_fails_on_a_cpu_machine_with_guidance(run_cli):
    result = run_cli("install-check", "--gpu")
    if "GPU           usable" in result.stdout:
        pytest.skip("this machine has a GPU")
    line = assert_one_line_error(result, "no usable GPU", code=1)
    assert "NVIDIA driver" in line and 'pip install "mnist-mlp[gpu]"' in line


def test_train_into_a_folder_without_write_permission(run_cli, tmp_path, split_npz):
    # Root may write anywhere a mode allows, so use a file system no one may
    # create folders in: sysfs.
    import os

    if not os.path.isdir("/sys/kernel"):
        pytest.skip("no sysfs here")
    result = run_cli(
        "train",
        "--set",
        f"data.path={split_npz}",
        "--set",
        "train.epochs=1",
        "--run-dir",
        "/sys/mnist-mlp-test-run",
    )
    assert_one_line_error(result, "cannot create run directory /sys/mnist-mlp-test-run")
