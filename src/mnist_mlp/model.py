"""Building and compiling the networks: the tutorial's MLP, a convnet, an RNN, a backbone.

Every model takes the tutorial's input, 784 values scaled from uint8 by 1/255,
and gives 10 class probabilities. The shape each kind works on (28x28x1
images, 28 rows of 28 pixels, resized RGB) is made by the model's own first
layers, so a checkpoint is all that `evaluate`, `predict`, `export` and a
resume need, and it loads in plain Keras (built-in layers only).
"""

from __future__ import annotations

import os
import warnings
from typing import Literal

from mnist_mlp.config import (
    CnnConfig,
    MlpConfig,
    ModelConfig,
    PretrainedConfig,
    RnnConfig,
    TrainConfig,
)
from mnist_mlp.data import IMAGE_SHAPE, INPUT_DIM, NUM_CLASSES
from mnist_mlp.errors import ConfigError

# keras.applications constructor, and which of Keras's preprocess_input modes
# the backbone's own preprocess_input uses ("caffe": RGB -> BGR, minus the
# ImageNet channel means, on 0..255; "tf": 0..255 to -1..1).
BACKBONES = {
    "mobilenet_v2": ("MobileNetV2", "tf"),
    "resnet50": ("ResNet50", "caffe"),
    "vgg16": ("VGG16", "caffe"),
}
# keras.applications' imagenet_utils: the "caffe" means, in BGR order.
CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)
# The smallest input keras.applications accepts for these backbones.
MIN_IMAGE_SIZE = 32

Phase = Literal["head", "fine_tune"]


def build_model(config: ModelConfig, load_weights: bool = True):
    """The network of `config.type`, uncompiled; (N, 784) in, (N, 10) probabilities out.

    With the defaults: mlp 623,290 parameters, cnn 34,826, rnn (LSTM) 81,674.
    A pretrained model comes with its backbone frozen (the head phase).

    Args:
        config: the `model` section.
        load_weights: False skips a pretrained backbone's `model.weights` (a
            resume sets every variable from its saved state instead, so the
            weights file or download is not needed again).

    Raises:
        ConfigError: the pretrained weights cannot be had, or fine_tune.layers
            is more than the backbone has.
    """
    if config.type == "pretrained":
        return _pretrained(config, load_weights)
    return {"mlp": _mlp, "cnn": _cnn, "rnn": _rnn}[config.type](config)


def _mlp(config: MlpConfig):
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
            *_classifier(),
        ],
        name="mnist_mlp",
    )


def _cnn(config: CnnConfig):
    import keras
    from keras import layers

    blocks = []
    for i, filters in enumerate(config.filters, 1):
        blocks += [
            layers.Conv2D(filters, config.kernel_size, activation="relu", name=f"conv{i}"),
            layers.MaxPooling2D(2, name=f"pool{i}"),
        ]
    return keras.Sequential(
        [
            keras.Input(shape=(INPUT_DIM,), name="pixels"),
            layers.Reshape((*IMAGE_SHAPE, 1), name="image"),
            *blocks,
            layers.Flatten(name="flatten"),
            layers.Dropout(config.dropout_rate, name="dropout"),
            *_classifier(),
        ],
        name="mnist_cnn",
    )


def _rnn(config: RnnConfig):
    import keras
    from keras import layers

    cell = {"lstm": layers.LSTM, "gru": layers.GRU}[config.cell]
    return keras.Sequential(
        [
            keras.Input(shape=(INPUT_DIM,), name="pixels"),
            # 28 time steps (the rows, top to bottom) of 28 pixels each.
            layers.Reshape(IMAGE_SHAPE, name="rows"),
            cell(config.units, name=config.cell),
            *_classifier(),
        ],
        name="mnist_rnn",
    )


def _classifier():
    from keras import layers

    return [
        layers.Dense(NUM_CLASSES, name="logits"),
        # float32 under mixed precision too, as Keras advises: the loss is
        # computed from these probabilities.
        layers.Activation("softmax", name="softmax", dtype="float32"),
    ]


def image_size(config: PretrainedConfig) -> int:
    """The side the digits are resized to for the backbone."""
    return config.image_size or MIN_IMAGE_SIZE


def _pretrained(config: PretrainedConfig, load_weights: bool):
    import keras
    from keras import layers

    size = image_size(config)
    backbone = _backbone(config, size, load_weights)
    inputs = keras.Input(shape=(INPUT_DIM,), name="pixels")
    x = layers.Reshape((*IMAGE_SHAPE, 1), name="image")(inputs)
    # training=False recorded here on purpose: Resizing's own default is True (it
    # shares the base of the random augmentation layers), and a functional model
    # called without `training` (serving, export, model(x)) would pass that on to
    # the BatchNormalization layers after it, which would then use batch
    # statistics. fit and evaluate pass `training` explicitly, which overrides it.
    x = layers.Resizing(size, size, name="resize")(x, training=False)
    # Grey to RGB: the same plane in all three channels.
    x = layers.Concatenate(name="rgb")([x, x, x])
    x = preprocess_layers(config.backbone)(x)
    # No training=False here: a Keras 3 BatchNormalization layer runs in
    # inference mode whenever it is frozen, which set_phase decides.
    x = backbone(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(config.dropout_rate, name="dropout")(x)
    for layer in _classifier():
        x = layer(x)
    model = keras.Model(inputs, x, name=f"mnist_{config.backbone}")
    set_phase(model, config, "head")
    return model


def preprocess_layers(backbone: str):
    """The backbone's preprocess_input on inputs in [0, 1], as built-in Keras layers.

    The inputs are the tutorial's values (uint8 / 255), so they are scaled back
    to 0..255 first, which is what keras.applications' preprocess_input expects.
    """
    import keras
    from keras import layers

    _, mode = BACKBONES[backbone]
    if mode == "tf":  # x / 127.5 - 1 on 0..255
        steps = [layers.Rescaling(255.0 / 127.5, offset=-1.0, name="to_unit_range")]
    else:
        # RGB -> BGR is the identity here (the three channels are equal), so
        # only the channel means are taken off.
        steps = [
            layers.Rescaling(255.0, name="to_0_255"),
            layers.Normalization(
                mean=list(CAFFE_BGR_MEANS), variance=[1.0, 1.0, 1.0], name="imagenet_means"
            ),
        ]
    return keras.Sequential(steps, name=f"{backbone}_preprocess")


def _backbone(config: PretrainedConfig, size: int, load_weights: bool):
    import keras

    constructor = getattr(keras.applications, BACKBONES[config.backbone][0])
    weights = config.weights if load_weights else "none"
    shape = (size, size, 3)
    if weights == "imagenet":
        try:
            with warnings.catch_warnings():
                # "Weights for input shape (224, 224) will be loaded": right, and
                # harmless without the top (convolution weights fit any size).
                warnings.filterwarnings("ignore", message=".*Weights for input shape")
                backbone = constructor(include_top=False, weights="imagenet", input_shape=shape)
        # keras.utils.get_file raises a bare Exception for network failures
        # ("URL fetch failure ..."), ValueError for a hash mismatch, OSError for the cache.
        except Exception as err:  # noqa: BLE001
            reason = " ".join(str(err).split())[:160] or type(err).__name__
            raise ConfigError(
                f"model.weights: imagenet: could not download the {config.backbone} ImageNet "
                f"weights ({reason}); connect to the internet once (they are kept in "
                "~/.keras/models), or pass a downloaded weights file as model.weights: PATH, "
                "or train from scratch with model.weights: none"
            ) from None
    else:
        backbone = constructor(include_top=False, weights=None, input_shape=shape)
        if weights != "none":
            _load_backbone_weights(backbone, config, weights)
    backbone.name = "backbone"
    count = len(backbone_layers(backbone))
    if config.fine_tune.layers is not None and config.fine_tune.layers > count:
        raise ConfigError(
            f"model.fine_tune.layers: got {config.fine_tune.layers}, but {config.backbone} has "
            f"{count} layers; give at most that, or null for all of them"
        )
    return backbone


def _load_backbone_weights(backbone, config: PretrainedConfig, path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigError(
            f"model.weights: {path} is not a file; pass the {config.backbone} weights file "
            "(without its top), imagenet, or none"
        )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backbone.load_weights(path)
        # Keras loads what matches and only warns about the rest ("Affected layers
        # will retain their freshly-initialized weights"): a silent partial load.
        skipped = [w for w in caught if "freshly-initialized" in str(w.message)]
        if skipped:
            raise ValueError(f"{len(skipped)} parts of the network are not in the file")
    except Exception as err:  # noqa: BLE001 - h5py and Keras raise many kinds here
        detail = " ".join(str(err).split())[:160] or type(err).__name__
        raise ConfigError(
            f"model.weights: {path} does not fit {config.backbone} without its top ({detail}); "
            f"pass weights saved from keras.applications.{BACKBONES[config.backbone][0]}"
            "(include_top=False)"
        ) from None


def backbone_of(model):
    """The keras.applications model inside a pretrained model."""
    return model.get_layer("backbone")


def backbone_layers(backbone) -> list:
    """The layers of a backbone a user counts and unfreezes: all but its InputLayer."""
    import keras

    return [layer for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]


def set_phase(model, config: ModelConfig, phase: Phase) -> None:
    """Freeze a pretrained model's backbone for `phase`; other kinds train whole.

    head: the whole backbone is frozen; only the new head trains.
    fine_tune: the top `config.fine_tune.layers` layers of the backbone train
    too, except BatchNormalization layers unless `fine_tune.train_batch_norm`
    (null: only for weights: none). Frozen, they keep their statistics and run
    in inference mode (Keras's advice: updating them on a small new dataset
    wrecks what was learned).

    The model must be compiled again afterwards for the change to take effect.
    """
    if config.type != "pretrained":
        return
    import keras

    backbone = backbone_of(model)
    layers = backbone_layers(backbone)
    if phase == "head":
        backbone.trainable = False
        return
    backbone.trainable = True
    count = config.fine_tune.layers or len(layers)
    train_batch_norm = config.fine_tune.train_batch_norm
    if train_batch_norm is None:  # nothing pretrained in them to keep
        train_batch_norm = config.weights == "none"
    for index, layer in enumerate(layers):
        unfrozen = index >= len(layers) - count
        batch_norm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = unfrozen and (train_batch_norm or not batch_norm)
        momentum = config.fine_tune.batch_norm_momentum
        if batch_norm and layer.trainable and momentum is not None:
            layer.momentum = momentum


def phase_of(config, epoch: int) -> Phase:
    """The phase epoch `epoch` (0-based) of a run belongs to."""
    fine = config.model.type == "pretrained" and epoch >= config.train.epochs
    return "fine_tune" if fine else "head"


def compile_model(model, config: TrainConfig, learning_rate: float | None = None) -> None:
    """Adam, categorical cross-entropy and accuracy, as in the tutorial.

    `config.steps_per_execution` training steps run per call into the backend.

    Args:
        learning_rate: instead of `config.learning_rate` (the fine-tuning phase).
    """
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate or config.learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=config.steps_per_execution,
    )


def compile_for_phase(model, config, phase: Phase) -> None:
    """Freeze for `phase` and compile with that phase's learning rate (a new Adam)."""
    set_phase(model, config.model, phase)
    rate = config.model.fine_tune.learning_rate if phase == "fine_tune" else None
    compile_model(model, config.train, rate)
