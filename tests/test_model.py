"""Model: the tutorial's layers in the tutorial's order, sizes from the config."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_mlp import runtime
from mnist_mlp.config import MlpConfig, TrainConfig
from mnist_mlp.model import build_model, compile_model


@pytest.fixture(scope="module")
def keras():
    runtime.import_tensorflow()
    import keras

    return keras


def test_layers_in_the_tutorials_order(keras):
    model = build_model(MlpConfig())
    kinds = [
        (
            type(layer).__name__,
            getattr(layer, "activation", None).__name__
            if type(layer).__name__ == "Activation"
            else None,
        )
        for layer in model.layers
    ]
    assert kinds == [
        ("Dense", None),
        ("Dropout", None),  # dropout before the ReLU, as the tutorial has it
        ("Activation", "relu"),
        ("Dense", None),
        ("Activation", "softmax"),
    ]
    assert model.layers[0].units == 784 and model.layers[3].units == 10
    assert model.layers[0].activation.__name__ == "linear"
    assert model.layers[1].rate == pytest.approx(0.4)


def test_parameter_count_and_shapes(keras):
    model = build_model(MlpConfig())
    assert model.count_params() == 623_290
    assert model.input_shape == (None, 784)
    assert model.output_shape == (None, 10)


def test_units_and_dropout_rate_come_from_the_config(keras):
    model = build_model(MlpConfig(units=32, dropout_rate=0.25))
    assert model.count_params() == 784 * 32 + 32 + 32 * 10 + 10
    assert model.layers[1].rate == pytest.approx(0.25)


def test_outputs_are_probabilities_and_dropout_only_acts_in_training(keras):
    keras.utils.set_random_seed(0)
    model = build_model(MlpConfig())
    x = np.random.default_rng(0).random((512, 784), dtype=np.float32)
    probabilities = model.predict(x, verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # Inference is deterministic: no units dropped.
    np.testing.assert_array_equal(probabilities, model.predict(x, verbose=0))

    hidden = keras.Model(model.inputs[0], model.get_layer("dropout").output)
    dense = keras.Model(model.inputs[0], model.get_layer("hidden").output)
    before = keras.ops.convert_to_numpy(dense(x))
    after = keras.ops.convert_to_numpy(hidden(x, training=True))
    dropped = np.mean((after == 0) & (before != 0))
    assert dropped == pytest.approx(0.4, abs=0.01)
    kept = after != 0
    # Survivors are scaled by 1 / (1 - rate), so the expected activation is unchanged.
    np.testing.assert_allclose(after[kept], before[kept] / 0.6, rtol=1e-5)


def test_compile_uses_adam_with_the_configured_rate(keras):
    model = build_model(MlpConfig())
    compile_model(model, TrainConfig(learning_rate=0.003))
    assert type(model.optimizer).__name__ == "Adam"
    assert float(model.optimizer.learning_rate) == pytest.approx(0.003)
    assert model.loss == "categorical_crossentropy"
