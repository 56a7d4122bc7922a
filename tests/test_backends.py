"""The JAX backend: same results as a run, exact resume, checkpoints across backends."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_one_line_error, needs_t10k
from test_resume import _args, _assert_same_run, _history, _start, _wait_for_epochs

from mnist_mlp import runtime
from mnist_mlp.errors import InstallError

pytest.importorskip("jax", reason='JAX not installed: pip install "mnist-mlp[jax]"')


@pytest.fixture(scope="module")
def jax_run(run_cli, split_npz, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("jax") / "run"
    result = run_cli("train", *_args(split_npz, "backend=jax"), "--run-dir", run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir


@needs_t10k
def test_a_jax_run_records_its_backend_and_learns(jax_run):
    import jax

    metrics = json.loads((jax_run / "metrics.json").read_text())
    assert metrics["backend"] == "jax"
    assert metrics["versions"]["jax"] == jax.__version__
    assert metrics["device"]["kind"] == "cpu" and metrics["device"]["visible"] == ["cpu:0"]
    # Four epochs on 8,000 real digits, as the TensorFlow run does.
    assert metrics["final"]["test"]["accuracy"] > 0.93


@needs_t10k
def test_two_jax_runs_with_the_same_seed_are_identical(jax_run, run_cli, split_npz, tmp_path):
    again = tmp_path / "again"
    result = run_cli("train", *_args(split_npz, "backend=jax"), "--run-dir", again)
    assert result.returncode == 0, result.stderr
    _assert_same_run(jax_run, again)


@needs_t10k
def test_a_killed_jax_run_resumes_exactly(jax_run, run_cli, cli_env, split_npz, tmp_path):
    run_dir = tmp_path / "killed"
    args = _args(split_npz, "backend=jax", "checkpoint.every_batches=10")
    process = _start(cli_env, *args, "--run-dir", run_dir)
    _wait_for_epochs(run_dir, 2, process)
    process.kill()
    process.communicate()
    result = run_cli("train", "--resume", run_dir)
    assert result.returncode == 0, result.stderr
    assert "resuming after epoch" in result.stdout
    _assert_same_run(jax_run, run_dir)


@needs_t10k
def test_checkpoints_evaluate_the_same_under_either_backend(jax_run, trained_run, run_cli):
    tf_run, _, _ = trained_run
    for run_dir in (jax_run, tf_run):
        metrics = json.loads((run_dir / "metrics.json").read_text())["final"]["test"]
        reports = {}
        for backend in ("tensorflow", "jax"):
            result = run_cli(
                "evaluate", "--checkpoint", run_dir / "model.keras", "--backend", backend, "--json"
            )
            assert result.returncode == 0, result.stderr
            reports[backend] = json.loads(result.stdout)
        trained_on = json.loads((run_dir / "metrics.json").read_text())["backend"]
        # Under the backend it was trained on, evaluate reproduces the run exactly ...
        assert reports[trained_on]["loss"] == metrics["loss"]
        assert reports[trained_on]["confusion_matrix"] == metrics["confusion_matrix"]
        # ... and under the other one, the same predictions up to float rounding.
        a, b = reports["tensorflow"], reports["jax"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert np.abs(np.array(a["confusion_matrix"]) - b["confusion_matrix"]).sum() <= 2


@needs_t10k
def test_the_jax_history_differs_from_tensorflows_only_by_rounding(jax_run, trained_run):
    # Same seed, same order of batches; the backends draw different dropout masks,
    # so the runs differ, but both learn the same amount.
    tf_run, _, _ = trained_run
    jax_losses = [float(row[1]) for row in _history(jax_run)]
    tf_losses = [float(row[1]) for row in _history(tf_run)]
    assert jax_losses[: len(tf_losses)] != tf_losses
    assert jax_losses[2] == pytest.approx(tf_losses[2], rel=0.1)


def test_backend_errors_are_one_line(monkeypatch, run_cli):
    # This process already runs Keras on TensorFlow: it cannot switch.
    runtime.import_tensorflow()
    with pytest.raises(InstallError, match="cannot switch to jax"):
        runtime.set_backend("jax")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "jax" else real(name)
    )
    with pytest.raises(InstallError, match=r'pip install "mnist-mlp\[jax\]"'):
        runtime.set_backend("jax")
    assert runtime.backend() == "tensorflow"
    assert_one_line_error(run_cli("config", "show", "--set", "backend=torch"), "backend", "jax")


def test_install_check_runs_the_product_on_jaxs_devices_too(run_cli):
    import jax

    report = json.loads(run_cli("install-check", "--json").stdout)
    assert report["jax"]["version"] == jax.__version__
    names = [d["name"] for d in report["jax"]["devices"]]
    assert names == [f"{d.platform}:{d.id}" for d in jax.devices()]
    assert all(d["ok"] for d in report["jax"]["devices"]) and report["ok"] is True


def test_a_wrong_jax_product_fails_the_install_check(monkeypatch):
    import jax

    from mnist_mlp import install_check

    real_put = jax.device_put
    # A device that corrupts what it is given: the product cannot come out exact.
    monkeypatch.setattr(jax, "device_put", lambda x, device: real_put(x + 1, device))
    report = install_check.check_jax()
    assert report["devices"] and not any(d["ok"] for d in report["devices"])
    assert report["devices"][0]["error"] == "the product is wrong"


# ------------------------------------------------------------------- precision


def test_precision_policy_choice_per_device():
    from mnist_mlp.errors import DeviceError

    assert runtime.precision_policy("float32", "cpu") == "float32"
    assert runtime.precision_policy("mixed_bfloat16", "cpu") == "mixed_bfloat16"
    assert runtime.precision_policy("mixed_float16", "gpu") == "mixed_float16"
    with pytest.raises(DeviceError, match="mixed_float16 needs a GPU"):
        runtime.precision_policy("mixed_float16", "cpu")


def test_mixed_float16_on_the_cpu_is_refused_before_any_work(run_cli, split_npz, tmp_path):
    result = run_cli(
        "train", *_args(split_npz, "train.precision=mixed_float16"), "--run-dir", tmp_path / "r"
    )
    assert_one_line_error(result, "mixed_float16 needs a GPU", "mixed_bfloat16")
    assert not (tmp_path / "r").exists()


@needs_t10k
def test_a_mixed_bfloat16_run_computes_in_bfloat16_and_resumes_exactly(
    run_cli, cli_env, split_npz, tmp_path
):
    from mnist_mlp import runtime as rt

    rt.import_tensorflow()
    import keras

    args = _args(split_npz, "train.precision=mixed_bfloat16")
    whole = tmp_path / "whole"
    result = run_cli("train", *args, "--run-dir", whole)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((whole / "metrics.json").read_text())
    assert metrics["precision"] == "mixed_bfloat16"
    assert metrics["final"]["test"]["accuracy"] > 0.93
    model = keras.saving.load_model(whole / "model.keras")
    hidden, softmax = model.get_layer("hidden"), model.get_layer("softmax")
    assert hidden.dtype_policy.name == "mixed_bfloat16" and hidden.compute_dtype == "bfloat16"
    assert hidden.kernel.dtype == "float32"  # weights stay float32
    assert softmax.compute_dtype == "float32"
    # Evaluate reproduces the run's test score exactly from the checkpoint.
    report = json.loads(run_cli("evaluate", "--checkpoint", whole / "model.keras", "--json").stdout)
    assert report["loss"] == metrics["final"]["test"]["loss"]
    # Killed after its first epoch and resumed: the same run, bit for bit.
    stopped = tmp_path / "stopped"
    process = _start(cli_env, *args, "--run-dir", stopped)
    _wait_for_epochs(stopped, 1, process)
    process.kill()
    process.communicate()
    assert run_cli("train", "--resume", stopped).returncode == 0
    _assert_same_run(whole, stopped)
