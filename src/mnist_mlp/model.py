"""Building and compiling the tutorial's network."""

from __future__ import annotations

from mnist_mlp.config import ModelConfig, TrainConfig
from mnist_mlp.data import INPUT_DIM, NUM_CLASSES


def build_model(config: ModelConfig):
    """The tutorial's MLP: 784 -> Dense(units) -> Dropout -> ReLU -> Dense(10) -> softmax.

    With the defaults (784 units) it has 623,290 parameters.

    Args:
        config: the `model` section (units, dropout_rate).

    Returns:
        An uncompiled `keras.Sequential`.
    """
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input(shape=(INPUT_DIM,), name="pixels"),
            layers.Dense(config.units, name="hidden"),
            # The tutorial applies dropout before the ReLU; kept as published.
            # (ReLU(0) = 0, so the dropped units and the forward pass are the same
            # as the usual order, but the surviving pre-activations are scaled
            # by 1/(1 - rate) before the ReLU rather than after.)
            layers.Dropout(config.dropout_rate, name="dropout"),
            layers.Activation("relu", name="relu"),
            layers.Dense(NUM_CLASSES, name="logits"),
            # float32 under mixed precision too, as Keras advises: the loss is
            # computed from these probabilities.
            layers.Activation("softmax", name="softmax", dtype="float32"),
        ],
        name="mnist_mlp",
    )


def compile_model(model, config: TrainConfig) -> None:
    """Adam, categorical cross-entropy and accuracy, as in the tutorial.

    `config.steps_per_execution` training steps run per call into the backend.
    """
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=config.steps_per_execution,
    )
