"""The model kinds: shapes, training, reloading, and a pretrained model's fine-tuning."""

from __future__ import annotations

import json
import shutil
import signal

import numpy as np
import pytest
from conftest import CONFIGS, assert_one_line_error, needs_t10k, synthetic_arrays
from test_resume import _assert_same_run

from mnist_mlp import runtime
from mnist_mlp.config import load_config
from mnist_mlp.errors import ConfigError


@pytest.fixture(scope="module")
def keras():
    runtime.import_tensorflow()
    import keras

    return keras


def _model(*overrides):
    from mnist_mlp.model import build_model

    return build_model(load_config(None, list(overrides)).model)


def _conv(kernel, channels_in, filters):
    return kernel * kernel * channels_in * filters + filters


def _recurrent(gates, features, units, biases=1):
    return gates * (units * (features + units) + biases * units)


@pytest.mark.parametrize(
    "overrides, parameters, shapes",
    [
        (
            ["model.type=cnn"],  # the classic Keras MNIST convnet
            34_826,
            {
                "image": (28, 28, 1),
                "conv1": (26, 26, 32),
                "pool1": (13, 13, 32),
                "conv2": (11, 11, 64),
                "pool2": (5, 5, 64),
                "flatten": (1600,),
            },
        ),
        (
            ["model.type=cnn", "model.filters=[8, 16, 16]", "model.kernel_size=2"],
            _conv(2, 1, 8) + _conv(2, 8, 16) + _conv(2, 16, 16) + 2 * 2 * 16 * 10 + 10,
            {"pool1": (13, 13, 8), "pool2": (6, 6, 16), "pool3": (2, 2, 16)},
        ),
        (["model.type=rnn"], 81_674, {"rows": (28, 28), "lstm": (128,)}),
        (
            ["model.type=rnn", "model.cell=gru", "model.units=64"],
            # Keras's GRU (reset_after) has two bias vectors per gate.
            _recurrent(3, 28, 64, biases=2) + 64 * 10 + 10,
            {"rows": (28, 28), "gru": (64,)},
        ),
    ],
)
def test_each_kind_has_its_documented_shapes_and_parameters(keras, overrides, parameters, shapes):
    model = _model(*overrides)
    assert model.count_params() == parameters
    # The tutorial's input for every kind; the model makes its own shape of it.
    assert model.input_shape == (None, 784) and model.output_shape == (None, 10)
    for name, shape in shapes.items():
        assert model.get_layer(name).output.shape == (None, *shape), name
    assert model.get_layer("softmax").compute_dtype == "float32"


@pytest.mark.parametrize(
    "backbone, constructor, features",
    [
        ("mobilenet_v2", "MobileNetV2", 1280),
        ("resnet50", "ResNet50", 2048),
        ("vgg16", "VGG16", 512),
    ],
)
def test_pretrained_models_are_the_backbone_and_a_new_head(keras, backbone, constructor, features):
    from mnist_mlp.model import backbone_of

    model = _model("model.type=pretrained", f"model.backbone={backbone}", "model.weights=none")
    reference = getattr(keras.applications, constructor)(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    assert model.count_params() == reference.count_params() + features * 10 + 10
    assert model.input_shape == (None, 784) and model.output_shape == (None, 10)
    # Resized to the backbones' minimum, then the grey plane repeated to RGB.
    assert model.get_layer("resize").output.shape == (None, 32, 32, 1)
    assert model.get_layer("rgb").output.shape == (None, 32, 32, 3)
    assert backbone_of(model).input_shape == (None, 32, 32, 3)
    assert [w.shape for w in backbone_of(model).weights] == [w.shape for w in reference.weights]


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet50", "vgg16"])
def test_pretrained_inputs_get_the_backbones_own_preprocess_input(keras, backbone):
    import importlib

    module = importlib.import_module(f"keras.applications.{backbone}")
    model = _model(
        "model.type=pretrained",
        f"model.backbone={backbone}",
        "model.weights=none",
        "model.image_size=40",
    )
    front = keras.Model(model.inputs, model.get_layer(f"{backbone}_preprocess").output)
    digits = np.random.default_rng(0).integers(0, 256, size=(16, 28, 28), dtype=np.uint8)
    scaled = digits.reshape(16, 784).astype("float32") / 255.0  # the tutorial's input
    ours = keras.ops.convert_to_numpy(front(scaled))
    resized = keras.ops.convert_to_numpy(
        keras.ops.image.resize(scaled.reshape(16, 28, 28, 1), (40, 40))
    )
    expected = module.preprocess_input(np.repeat(resized * 255.0, 3, axis=-1))
    assert ours.shape == (16, 40, 40, 3)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-4)


def _trainable_layers(model):
    from mnist_mlp.model import backbone_of

    return [
        layer.name
        for layer in backbone_of(model).layers
        if layer.trainable and not isinstance(layer, keras_layers().InputLayer)
    ]


def keras_layers():
    import keras

    return keras.layers


def test_freezing_schedule_of_the_two_phases(keras):
    from mnist_mlp.model import backbone_of, set_phase

    config = load_config(
        None, ["model.type=pretrained", "model.weights=none", "model.fine_tune.layers=10"]
    ).model
    model = _model("model.type=pretrained", "model.weights=none", "model.fine_tune.layers=10")
    layers = [layer for layer in backbone_of(model).layers[1:]]  # without the InputLayer
    is_bn = {layer.name: isinstance(layer, keras.layers.BatchNormalization) for layer in layers}
    # Built in the head phase: nothing of the backbone trains, only the new Dense(10).
    assert _trainable_layers(model) == []
    assert sorted(tuple(v.shape) for v in model.trainable_variables) == [(10,), (1280, 10)]
    # Fine-tuning: the top 10 layers; weights: none trains their BatchNormalization too.
    set_phase(model, config, "fine_tune")
    assert _trainable_layers(model) == [layer.name for layer in layers[-10:]]
    assert any(is_bn[name] for name in _trainable_layers(model))
    # Called without `training` (serving, export), trainable BatchNormalization
    # layers still use their moving statistics, as with training=False.
    x = np.random.default_rng(0).random((8, 784), dtype=np.float32)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model(x)), keras.ops.convert_to_numpy(model(x, training=False))
    )
    # Their statistics' momentum is the backbone's own unless batch_norm_momentum says.
    momentum = config.model_copy(
        update={"fine_tune": config.fine_tune.model_copy(update={"batch_norm_momentum": 0.99})}
    )
    set_phase(model, momentum, "fine_tune")
    momenta = {layer.name: layer.momentum for layer in layers if is_bn[layer.name]}
    trained = set(_trainable_layers(model))
    assert {m for name, m in momenta.items() if name in trained} == {0.99}
    assert {m for name, m in momenta.items() if name not in trained} == {0.999}
    # With train_batch_norm: false (the default for pretrained weights) they stay frozen.
    frozen_bn = config.model_copy(
        update={"fine_tune": config.fine_tune.model_copy(update={"train_batch_norm": False})}
    )
    set_phase(model, frozen_bn, "fine_tune")
    assert _trainable_layers(model) == [
        layer.name for layer in layers[-10:] if not is_bn[layer.name]
    ]
    everything = frozen_bn.model_copy(
        update={"fine_tune": frozen_bn.fine_tune.model_copy(update={"layers": None})}
    )
    set_phase(model, everything, "fine_tune")
    assert _trainable_layers(model) == [layer.name for layer in layers if not is_bn[layer.name]]
    set_phase(model, everything, "head")
    assert _trainable_layers(model) == []


def test_pretrained_weights_load_from_a_local_file(keras, tmp_path):
    from mnist_mlp.model import backbone_of

    keras.utils.set_random_seed(1)
    source = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    path = tmp_path / "mobilenet_v2_notop.weights.h5"
    source.save_weights(path)
    keras.utils.set_random_seed(2)
    loaded = backbone_of(_model("model.type=pretrained", f"model.weights={path}"))
    for a, b in zip(loaded.weights, source.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    keras.utils.set_random_seed(2)
    fresh = backbone_of(_model("model.type=pretrained", "model.weights=none"))
    assert not np.array_equal(fresh.weights[0].numpy(), loaded.weights[0].numpy())

    # Weights of another network, or no file: one line naming the file.
    narrow = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.35
    )
    other = tmp_path / "narrow.weights.h5"
    narrow.save_weights(other)
    with pytest.raises(ConfigError, match=rf"model.weights: {other} does not fit mobilenet_v2"):
        _model("model.type=pretrained", f"model.weights={other}")
    with pytest.raises(ConfigError, match="is not a file"):
        _model("model.type=pretrained", f"model.weights={tmp_path / 'missing.h5'}")
    with pytest.raises(ConfigError, match=r"model.fine_tune.layers: got 99, but vgg16 has 18"):
        _model(
            "model.type=pretrained",
            "model.weights=none",
            "model.backbone=vgg16",
            "model.fine_tune.layers=99",
        )


def test_imagenet_weights_offline_is_one_line_and_no_run(run_cli, tmp_path):
    data = tmp_path / "tiny.npz"
    np.savez(data, **synthetic_arrays())
    run_dir = tmp_path / "run"
    result = run_cli(
        "train",
        "--config",
        CONFIGS / "pretrained.yaml",
        "--set",
        f"data.path={data}",
        "--run-dir",
        run_dir,
    )
    line = assert_one_line_error(
        result, "model.weights: imagenet: could not download the mobilenet_v2 ImageNet weights"
    )
    assert "model.weights: none" in line and "model.weights: PATH" in line
    assert not run_dir.exists()


def test_a_key_of_another_kind_is_refused_naming_its_kind(run_cli):
    line = assert_one_line_error(
        run_cli("config", "show", "--config", CONFIGS / "cpu.yaml", "--set", "model.type=cnn"),
        "unknown key 'model.units' for model.type cnn",
    )
    assert "model.filters" in line and "belongs to model.type mlp and rnn" in line


# ------------------------------------------------------------ training and reloading


@pytest.fixture(scope="module")
def kind_runs(run_cli, split_npz, tmp_path_factory):
    """One epoch of cnn and of rnn on the real 8,000/2,000 split, through the CLI."""
    root = tmp_path_factory.mktemp("kinds")
    runs = {}
    for kind in ("cnn", "rnn"):
        runs[kind] = root / kind
        result = run_cli(
            "train",
            "--config",
            CONFIGS / f"{kind}.yaml",
            "--set",
            f"data.path={split_npz}",
            "--set",
            "train.epochs=1",
            "--set",
            "device=cpu",
            "--run-dir",
            runs[kind],
            "--quiet",
        )
        assert result.returncode == 0, result.stderr
    return runs


@needs_t10k
def test_cnn_and_rnn_train_evaluate_and_predict_from_their_checkpoints(
    kind_runs, run_cli, split_arrays, tmp_path, keras
):
    checkpoints = [kind_runs[kind] / "model.keras" for kind in ("cnn", "rnn")]
    result = run_cli("evaluate", *[a for c in checkpoints for a in ("--checkpoint", c)], "--json")
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout)["reports"]
    digits = split_arrays["x_test"][:20]
    np.save(tmp_path / "digits.npy", digits)
    for kind, report in zip(("cnn", "rnn"), reports, strict=True):
        metrics = json.loads((kind_runs[kind] / "metrics.json").read_text())
        # One epoch beats chance (0.1) by far (measured: cnn 0.93, rnn 0.69);
        # evaluate reproduces the run's score from the checkpoint.
        assert metrics["final"]["test"]["accuracy"] > 0.5, kind
        assert report["accuracy"] == metrics["final"]["test"]["accuracy"]
        assert report["loss"] == metrics["final"]["test"]["loss"]
        predicted = run_cli(
            "predict",
            "--checkpoint",
            kind_runs[kind] / "model.keras",
            tmp_path / "digits.npy",
            "--json",
        )
        assert predicted.returncode == 0, predicted.stderr
        model = keras.saving.load_model(kind_runs[kind] / "model.keras")
        expected = model.predict(digits.reshape(20, 784) / 255.0, verbose=0).argmax(axis=1)
        assert [p["digit"] for p in json.loads(predicted.stdout)["predictions"]] == list(expected)


@needs_t10k
def test_rnn_exports_where_its_ops_exist_and_says_so_where_not(kind_runs, run_cli, tmp_path):
    checkpoint = kind_runs["rnn"] / "model.keras"
    result = run_cli(
        "export", "--checkpoint", checkpoint, "--format", "savedmodel", "--output", tmp_path / "sm"
    )
    assert result.returncode == 0, result.stderr
    assert "checked with tf.saved_model on 100 inputs" in result.stdout
    # The LSTM's loop needs TensorFlow's Flex ops in a tflite file, which the
    # built-in interpreter lacks: one line, and no file left that would not run.
    failed = run_cli(
        "export",
        "--checkpoint",
        checkpoint,
        "--format",
        "tflite",
        "--output",
        tmp_path / "m.tflite",
    )
    assert_one_line_error(failed, "does not run in", "another format", code=1)
    assert not (tmp_path / "m.tflite").exists()


@pytest.fixture(scope="module")
def split_2k(split_arrays, tmp_path_factory):
    """2,000 of the split's training digits and its 2,000 test digits: backbones are slow."""
    path = tmp_path_factory.mktemp("split-2k") / "split-2k.npz"
    np.savez(
        path,
        x_train=split_arrays["x_train"][:2000],
        y_train=split_arrays["y_train"][:2000],
        x_test=split_arrays["x_test"],
        y_test=split_arrays["y_test"],
    )
    return path


@pytest.fixture(scope="module")
def backbone_file(split_arrays, tmp_path_factory, keras):
    """A MobileNetV2 trained a little on digits by the test itself: weights with something in them.

    ImageNet cannot be downloaded here. Trained from scratch for 2 epochs, its
    BatchNormalization statistics lag behind (momentum 0.999), so they are set
    from one batch afterwards, as a finished pretraining would have them.
    """
    from mnist_mlp.model import backbone_of

    keras.utils.set_random_seed(0)
    model = _model("model.type=pretrained", "model.weights=none")
    backbone = backbone_of(model)
    backbone.trainable = True
    model.compile("adam", "categorical_crossentropy")
    x = split_arrays["x_train"][-2000:].reshape(2000, 784).astype("float32") / 255.0
    y = keras.utils.to_categorical(split_arrays["y_train"][-2000:], 10)
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    norms = [
        layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    for layer in norms:
        layer.momentum = 0.0
    model(x[:500], training=True)
    path = tmp_path_factory.mktemp("backbone") / "mobilenet_v2_digits.weights.h5"
    backbone.save_weights(path)
    # By layer name; the InputLayer (no weights) is numbered per process, so it is left out.
    weighted = [layer for layer in backbone.layers if layer.weights]
    return path, {layer.name: [w.numpy() for w in layer.weights] for layer in weighted}


def _pretrained_overrides(split_2k, weights):
    return [
        f"data.path={split_2k}",
        f"model.weights={weights}",
        "train.epochs=1",
        "model.fine_tune.epochs=1",
        "model.fine_tune.layers=12",
        "model.fine_tune.learning_rate=1e-4",
        "device=cpu",
        # Reports every 4 of the epoch's 16 batches, so a stop can come mid-epoch.
        "train.steps_per_execution=4",
    ]


@pytest.fixture(scope="module")
def pretrained_run(run_cli, split_2k, backbone_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrained") / "run"
    sets = [a for o in _pretrained_overrides(split_2k, backbone_file[0]) for a in ("--set", o)]
    result = run_cli("train", "--config", CONFIGS / "pretrained.yaml", *sets, "--run-dir", run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir, result


@needs_t10k
def test_pretrained_fine_tunes_only_the_top_layers_and_beats_chance(
    pretrained_run, backbone_file, keras
):
    from mnist_mlp.model import backbone_of

    run_dir, result = pretrained_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    assert metrics["final"]["test"]["accuracy"] > 0.25  # chance: 0.1
    _, saved = backbone_file
    backbone = backbone_of(keras.saving.load_model(run_dir / "model.keras"))
    layers = backbone.layers[1:]
    top = {layer.name for layer in layers[-12:]}
    moved = []
    for layer in layers:
        for before, after in zip(saved.get(layer.name, []), layer.weights, strict=True):
            if not np.array_equal(before, after.numpy()):
                moved.append(layer.name)
    # Only the unfrozen layers moved: not the 140 below them, not the BatchNormalization
    # layers among them (statistics included), which stay frozen for pretrained weights.
    expected = [
        layer.name
        for layer in layers
        if layer.name in top
        and layer.weights
        and not isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert sorted(set(moved)) == sorted(expected) and expected
    line = (
        f"fine-tuning from epoch 2: the top 12 of {len(layers)} layers of mobilenet_v2 "
        f"unfrozen ({len(expected)} with weights that train)"
    )
    assert line in result.stdout


@needs_t10k
def test_pretrained_resumes_in_either_phase_bit_for_bit(
    pretrained_run, split_2k, backbone_file, tmp_path, monkeypatch, keras
):
    from mnist_mlp import checkpoint, runs, signals
    from mnist_mlp.model import backbone_of, build_model, compile_for_phase
    from mnist_mlp.train import train

    path, saved = backbone_file
    weights = tmp_path / "copy.weights.h5"
    shutil.copy(path, weights)
    config = load_config(CONFIGS / "pretrained.yaml", _pretrained_overrides(split_2k, weights))
    run_dir = tmp_path / "stopped"

    # 1. Stopped at the end of epoch 1, the last of the head phase.
    def stop():
        raise signals.StopRequested(signal.SIGINT)

    monkeypatch.setattr(signals, "check", stop)
    with pytest.raises(signals.StopRequested):
        train(config, run_dir)
    monkeypatch.undo()
    model = build_model(config.model)
    compile_for_phase(model, config, "head")
    progress = checkpoint.load_state(model, run_dir / "state.npz")
    assert (progress.epochs_done, progress.batches_done) == (1, 0)
    # The head trained (it left the weights it was built with) ...
    keras.utils.set_random_seed(config.seed)
    initial = build_model(config.model).get_layer("logits").kernel.numpy()
    assert not np.array_equal(model.get_layer("logits").kernel.numpy(), initial)
    # ... and the whole backbone is as the file has it.
    for layer in backbone_of(model).layers:
        for before, after in zip(saved.get(layer.name, []), layer.weights, strict=True):
            np.testing.assert_array_equal(before, after.numpy(), err_msg=layer.name)
    # Only the fine-tuning's epochs may change on resume for this kind; and the
    # resume needs the checkpoint alone, not the weights file any more.
    with pytest.raises(ConfigError, match="only model.fine_tune.epochs may change"):
        runs.resume_config(run_dir, None, ("train.epochs=2",))
    weights.unlink()

    # 2. Resumed into fine-tuning, and stopped again after 8 of its 16 batches.
    asked = iter([False, True])

    def requested():
        if next(asked, False):
            signals._requested = signal.SIGINT
        return signals._requested is not None

    monkeypatch.setattr(signals, "requested", requested)
    with pytest.raises(signals.StopRequested):
        train(runs.resume_config(run_dir, None, ()), run_dir, resume=True)
    monkeypatch.undo()
    assert checkpoint.read_progress(run_dir / "state.npz") == checkpoint.Progress(1, 8)

    # 3. Resumed mid-phase 2: the same run as the uninterrupted one, bit for bit.
    train(runs.resume_config(run_dir, None, ()), run_dir, resume=True)
    _assert_same_run(pretrained_run[0], run_dir)
