"""Typed, validated, immutable configuration.

One precedence order, applied by :func:`load_config`:
schema defaults < YAML file < ``--set key=value`` overrides.

The defaults are the tutorial's experiment, so an empty override list on the
shipped ``configs/cpu.yaml`` and the bare defaults describe the same run.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from mnist_mlp.errors import ConfigError

# The digits' side in pixels (data.IMAGE_SHAPE, without importing numpy here).
IMAGE_SIDE = 28


class _Section(BaseModel):
    # frozen: a run's config cannot drift after it is recorded.
    # extra="forbid": a typo such as `epoch:` must fail, not be silently ignored.
    # strict: YAML already yields native types; `epochs: true` or `epochs: 2.5`
    # is a mistake, not something to coerce.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class DataConfig(_Section):
    """Where the images come from."""

    # Which Keras dataset to download when `path` is not set.
    name: Literal["mnist", "fashion_mnist"] = "mnist"
    # A local .npz (Keras layout) or a folder of the four IDX files; overrides `name`.
    path: str | None = None

    @field_validator("path")
    @classmethod
    def _absolute_path(cls, value: str | None) -> str | None:
        # Stored absolute so the run's config.yaml means the same from any folder.
        if value is None:
            return None
        if not value.strip():
            raise ValueError("should be a file or folder path, or null to download `data.name`")
        return os.path.abspath(os.path.expanduser(value))


class MlpConfig(_Section):
    """The tutorial's network: Dense(units) -> Dropout -> ReLU -> Dense(10) -> softmax."""

    type: Literal["mlp"] = "mlp"
    units: int = Field(784, ge=1, le=65536)
    dropout_rate: float = Field(0.4, ge=0.0, lt=1.0)


class CnnConfig(_Section):
    """The classic Keras MNIST convnet, on the digits as 28x28x1 images."""

    type: Literal["cnn"] = "cnn"
    # One Conv2D(n, kernel_size, relu) + MaxPooling2D(2) block per entry.
    filters: tuple[int, ...] = Field((32, 64), min_length=1, max_length=4)
    kernel_size: int = Field(3, ge=1, le=28)
    # Dropout between Flatten and the softmax layer.
    dropout_rate: float = Field(0.5, ge=0.0, lt=1.0)

    @field_validator("filters", mode="before")
    @classmethod
    def _list_to_tuple(cls, value: Any) -> Any:
        # YAML gives a list; the frozen config holds a tuple.
        return tuple(value) if isinstance(value, list) else value

    @field_validator("filters")
    @classmethod
    def _positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(n < 1 or n > 4096 for n in value):
            raise ValueError("should be a list of integers 1 .. 4096, e.g. [32, 64]")
        return value

    @model_validator(mode="after")
    def _image_not_used_up(self) -> CnnConfig:
        # Each block's convolution ("valid") shrinks the side by kernel_size - 1, its
        # pooling halves it; with too many blocks nothing is left to classify.
        side = IMAGE_SIDE
        for block in range(len(self.filters)):
            side = (side - self.kernel_size + 1) // 2
            if side < 1:
                raise ValueError(
                    f"model.filters has {len(self.filters)} blocks and model.kernel_size is "
                    f"{self.kernel_size}: block {block + 1} gets a 28x28 digit down to nothing; "
                    "use fewer blocks or a smaller kernel_size"
                )
        return self


class RnnConfig(_Section):
    """Each digit read as a sequence of 28 rows of 28 pixels by one recurrent layer."""

    type: Literal["rnn"] = "rnn"
    cell: Literal["lstm", "gru"] = "lstm"
    units: int = Field(128, ge=1, le=65536)


class FineTuneConfig(_Section):
    """The second phase of a pretrained run: part of the backbone trains too."""

    # Layers at the top of the backbone to unfreeze; null: the whole backbone.
    layers: int | None = Field(None, ge=1)
    # Epochs of this phase, after the train.epochs of the head alone; 0: none.
    epochs: int = Field(5, ge=0, le=100_000)
    # Small, so the pretrained features are adjusted rather than overwritten.
    learning_rate: float = Field(1e-5, gt=0.0, le=10.0)
    # Train the BatchNormalization layers among the unfrozen ones too, their
    # statistics included. false: they stay frozen, in inference mode, as Keras
    # advises for pretrained weights. null: true for weights: none only.
    train_batch_norm: bool | None = None
    # Momentum of the moving statistics of the BatchNormalization layers that
    # train; null: the backbone's own (0.999 for mobilenet_v2, made for long
    # ImageNet runs: from random weights, a few epochs leave them far behind).
    batch_norm_momentum: float | None = Field(None, ge=0.0, lt=1.0)


class PretrainedConfig(_Section):
    """A keras.applications backbone with a new 10-way head, fine-tuned in two phases."""

    type: Literal["pretrained"] = "pretrained"
    backbone: Literal["mobilenet_v2", "resnet50", "vgg16"] = "mobilenet_v2"
    # imagenet (downloaded once into ~/.keras/models), none (random), or the
    # path of a weights file for the backbone without its top (.h5, .weights.h5).
    weights: str = "imagenet"
    # Side the digits are resized to; null: the backbone's minimum, 32.
    image_size: int | None = Field(None, ge=32, le=1024)
    # Dropout before the new Dense(10) head.
    dropout_rate: float = Field(0.2, ge=0.0, lt=1.0)
    fine_tune: FineTuneConfig = FineTuneConfig()

    @field_validator("weights", mode="before")
    @classmethod
    def _weights(cls, value: Any) -> Any:
        if value is None:  # `weights: null` means the same as none
            return "none"
        if not isinstance(value, str):
            return value
        if value in ("imagenet", "none"):
            return value
        if not value.endswith((".h5", ".keras")):
            raise ValueError(
                "should be imagenet, none, or the path of a weights file "
                "(.weights.h5, .h5 or .keras) for the backbone without its top"
            )
        # Stored absolute so the run's config.yaml means the same from any folder.
        return os.path.abspath(os.path.expanduser(value))


def _model_type(value: Any) -> str:
    # `type` may be left out: the tutorial's MLP.
    kind = value.get("type", "mlp") if isinstance(value, Mapping) else getattr(value, "type", "mlp")
    return kind if isinstance(kind, str) else repr(kind)


MODEL_TYPES: dict[str, type[_Section]] = {
    "mlp": MlpConfig,
    "cnn": CnnConfig,
    "rnn": RnnConfig,
    "pretrained": PretrainedConfig,
}
# The `model` section: one of the kinds above, chosen by its `type` key.
ModelConfig = Annotated[
    Union[tuple(Annotated[cls, Tag(name)] for name, cls in MODEL_TYPES.items())],  # noqa: UP007
    Discriminator(_model_type),
]


Monitor = Literal["val_accuracy", "val_loss", "accuracy", "loss"]


class EarlyStoppingConfig(_Section):
    """Keras's EarlyStopping; absent (null) means off."""

    # The metric to watch; null: checkpoint.monitor, the one best.keras follows.
    monitor: Monitor | None = None
    # Epochs without improvement before stopping.
    patience: int = Field(5, ge=1, le=100_000)
    # Smallest change of the monitored value that counts as an improvement.
    min_delta: float = Field(0.0, ge=0.0)
    # End with the weights of the best epoch (from best.keras), not the last.
    restore_best_weights: bool = True


class TrainConfig(_Section):
    """How the network is fitted."""

    epochs: int = Field(100, ge=1, le=100_000)
    batch_size: int = Field(128, ge=1, le=1_000_000)
    # Keras's default for Adam.
    learning_rate: float = Field(0.001, gt=0.0, le=10.0)
    # 0 validates on the test set after each epoch, as the tutorial reports it;
    # a fraction in (0, 1) holds out the last part of the training set instead.
    validation_split: float = Field(0.0, ge=0.0, lt=1.0)
    # Deterministic TensorFlow ops (tf.config.experimental.enable_op_determinism):
    # identical weights for the same config and seed. null: on for CPU, off for GPU,
    # where deterministic kernels are slower.
    deterministic: bool | None = None
    # null (off), or a mapping such as {patience: 5}; see EarlyStoppingConfig.
    early_stopping: EarlyStoppingConfig | None = None
    # Keras's mixed precision: float32 everywhere, or the matrix products in
    # bfloat16 (CPU or GPU) or float16 (GPU only) with float32 weights and outputs.
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16"] = "float32"
    # Training steps Keras runs per call into the backend (compile's
    # steps_per_execution): fewer round trips through Python. Callbacks then see
    # every Nth batch, so the progress bar, Ctrl-C and checkpoint.every_batches
    # act at most N - 1 batches later; the weights are the same for any N.
    steps_per_execution: int = Field(32, ge=1, le=10_000)


class CheckpointConfig(_Section):
    """What the run keeps while it trains."""

    # best.keras holds the model of the epoch with the best value of this metric
    # (accuracies are maximised, losses minimised); early stopping watches it too.
    monitor: Monitor = "val_accuracy"
    # Also save the training state every N batches (null: only at epoch ends),
    # so a killed run loses at most N batches, not the epoch in progress.
    every_batches: int | None = Field(None, ge=1)


class LoggingConfig(_Section):
    """What a run records for watching it, besides history.csv and curves.png."""

    # Keras's TensorBoard callback writes event files to <run>/tensorboard
    # (view with `tensorboard --logdir runs`; needs pip install "mnist-mlp[tensorboard]").
    tensorboard: bool = False


class Config(_Section):
    """The whole resolved configuration of a run."""

    # Seeds Python, NumPy and the backend via keras.utils.set_random_seed.
    seed: int = Field(42, ge=0, le=2**32 - 1)
    # auto: a GPU when the backend finds one, else the CPU.
    device: Literal["auto", "cpu", "gpu"] = "auto"
    # The Keras backend that computes: tensorflow, or jax (pip install "mnist-mlp[jax]";
    # about twice as fast on CPUs here). Checkpoints load under either.
    backend: Literal["tensorflow", "jax"] = "tensorflow"
    data: DataConfig = DataConfig()
    model: ModelConfig = MlpConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _best_weights_come_from_best_keras(self) -> Config:
        stopping = self.train.early_stopping
        if (
            stopping
            and stopping.restore_best_weights
            and stopping.monitor not in (None, self.checkpoint.monitor)
        ):
            # The best weights are best.keras's, which stay exact over a resume.
            raise ValueError(
                f"train.early_stopping.monitor={stopping.monitor} with restore_best_weights "
                f"restores best.keras, which follows checkpoint.monitor={self.checkpoint.monitor}; "
                "set both to the same metric, or restore_best_weights: false"
            )
        return self


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float and rejects duplicate keys.

    PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; users write it
    for learning rates all the time. A duplicated key silently keeps the last
    value in PyYAML, which hides mistakes.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
            raise yaml.constructor.ConstructorError(
                None, None, f"a {kind} used as a key; keys are names", key_node.start_mark
            )
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text with the project's loader, raising ConfigError on bad syntax."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(
            f"{source}: malformed YAML{where}: {problem}; fix the syntax "
            "(keys as `name: value`, nested sections indented by spaces)"
        ) from None


def read_config_file(path: str | os.PathLike) -> dict:
    """Read a config file into a plain mapping, with one-line errors for every bad file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}; pass an existing YAML file to --config")
    if path.is_dir():
        raise ConfigError(f"config path is a directory: {path}; pass a YAML file to --config")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; --config expects YAML") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    data = parse_yaml(text, str(path))
    if data is None:
        raise ConfigError(
            f"{path}: the file is empty; write at least one section, e.g. `train: {{epochs: 10}}`"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level is a {_yaml_kind(data)}; expected a mapping of sections "
            "such as `train:`, `model:`, `data:`"
        )
    return data


# ---------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """Split `train.epochs=5` into (("train", "epochs"), 5); the value is a YAML scalar."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. --set train.epochs=5"
        )
    if not raw.strip():
        # An unset shell variable (`--set data.path=$DATA`) must not mean "null".
        raise ConfigError(f"--set {text!r}: empty value; give one, or write {key}=null to unset it")
    parts = tuple(key.split("."))
    if any(not p for p in parts):
        raise ConfigError(f"--set {text!r}: empty part in key {key!r}; write e.g. train.epochs")
    _check_key_path(parts, origin=f"--set {text!r}")
    return parts, parse_yaml(raw, f"--set {text!r}")


def apply_overrides(data: Mapping, overrides: Iterable[str]) -> dict:
    """Return a deep copy of `data` with each `key=value` override applied in order."""
    merged = _deep_copy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = merged
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"--set {text!r}: {where} is a {_yaml_kind(child)} in the config file, "
                    "not a section"
                )
            node = child
        node[parts[-1]] = value
    return merged


# --------------------------------------------------------------------- validation


def validate(
    data: Mapping, source: str | None = None, overridden: Iterable[tuple[str, ...]] = ()
) -> Config:
    """Validate a plain mapping into a frozen Config, or raise a one-line ConfigError.

    Args:
        data: nested sections as read from YAML.
        source: the file the mapping came from, to prefix the error with.
        overridden: key paths set by --set; an error there is blamed on --set.
    """
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        keys = _resolve(tuple(str(p) for p in first["loc"]))[0]
        if first["type"] == "union_tag_invalid":
            keys += ("type",)
        # A key set by --set, or inside or around one (model.fine_tune for
        # model.fine_tune.epochs): the override is what made the error.
        caused = bool(keys) and any(
            keys[: len(o)] == o or o[: len(keys)] == keys for o in overridden
        )
        origin = "--set" if caused else source
        prefix = f"{origin}: " if origin else ""
        raise ConfigError(f"{prefix}{_describe(first)}{more}") from None


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> Config:
    """Resolve defaults < file < overrides into a validated Config."""
    overrides = list(overrides)
    data = read_config_file(path) if path is not None else {}
    return validate(
        apply_overrides(data, overrides),
        str(path) if path is not None else None,
        overridden=[parse_override(text)[0] for text in overrides],
    )


def to_yaml(config: Config) -> str:
    """The resolved config as YAML, in schema order; loads back to an equal Config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def total_epochs(config: Config) -> int:
    """Epochs of the whole run: train.epochs, then a pretrained model's fine-tuning phase."""
    model = config.model
    return config.train.epochs + (model.fine_tune.epochs if model.type == "pretrained" else 0)


def config_name(path: str | os.PathLike | None) -> str:
    """The name a run is filed under: the config file's stem, or `default`."""
    return Path(path).stem if path is not None else "default"


# ------------------------------------------------------------------------ helpers


def _members(annotation: Any) -> dict[str | None, type[BaseModel]]:
    """The sections an annotation can hold, by union tag (None: untagged)."""
    found: dict[str | None, type[BaseModel]] = {}
    stack = [(annotation, None)]
    while stack:
        kind, tag = stack.pop(0)
        if typing.get_origin(kind) is Annotated:
            base, *meta = typing.get_args(kind)
            tags = [m.tag for m in meta if isinstance(m, Tag)]
            stack.append((base, tags[0] if tags else tag))
        elif isinstance(kind, type) and issubclass(kind, BaseModel):
            found[tag] = kind
        else:
            stack += [(arg, tag) for arg in typing.get_args(kind)]
    return found


def _resolve(
    loc: tuple[str, ...],
) -> tuple[tuple[str, ...], list[type[BaseModel]], str | None, tuple[str, ...]]:
    """Walk a pydantic error location through the schema.

    Returns:
        The key path without union tags (pydantic puts `cnn` in
        `model.cnn.filters`), the sections that own its last key, the tagged
        kind chosen on the way (e.g. "cnn"), if any, and the key path of the
        section it was chosen for (("model",)).
    """
    sections: list[type[BaseModel]] = [Config]
    keys: list[str] = []
    kind, kind_at = None, ()
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        keys.append(part)
        if not parts:
            break
        members: dict[str | None, type[BaseModel]] = {}
        for section in sections:
            if part in section.model_fields:
                members |= _members(section.model_fields[part].annotation)
        if parts[0] in members and None not in members:
            kind, kind_at = parts.pop(0), tuple(keys)
            sections = [members[kind]]
        else:
            sections = list(dict.fromkeys(members.values()))
        if not parts or not sections:
            keys += parts
            break
    return tuple(keys), sections, kind, kind_at


def _unknown_key_message(
    keys: tuple[str, ...],
    sections: list[type[BaseModel]],
    kind: str | None = None,
    kind_at: tuple[str, ...] = (),
) -> str:
    """Say that `keys[-1]` is not a key of `sections`, with the nearest valid one."""
    name = ".".join(keys)
    prefix = ".".join(keys[:-1] + ("",))
    if keys[:-1] == ("model",) and keys[-1] in MODEL_TYPES:
        fields = ", ".join("model." + k for k in MODEL_TYPES[keys[-1]].model_fields)
        return (
            f"unknown key {name!r}: the kind is chosen by model.type; write "
            f"model.type: {keys[-1]} and its keys directly under model ({fields})"
        )
    valid = list(dict.fromkeys(k for section in sections for k in section.model_fields))
    close = difflib.get_close_matches(keys[-1], valid, n=1, cutoff=0.6)
    where = f" for {'.'.join(kind_at)}.type {kind}" if kind and keys[:-1] == kind_at else ""
    hint = (
        f"did you mean {prefix + close[0]!r}?"
        if close
        else f"valid keys{where or ' here'}: " + ", ".join(prefix + k for k in valid)
    )
    if kind and keys[:-1] == kind_at:  # e.g. model.units left in a file with --set model.type=cnn
        elsewhere = [
            tag for tag, cls in MODEL_TYPES.items() if tag != kind and keys[-1] in cls.model_fields
        ]
        if elsewhere:
            hint += f" ({name} belongs to model.type {' and '.join(elsewhere)})"
    return f"unknown key {name!r}{where}; {hint}"


def _check_key_path(parts: tuple[str, ...], origin: str) -> None:
    """Refuse a --set key that no config can have (checked against every model kind:
    which one applies is known only after merging)."""
    sections: list[type[BaseModel]] = [Config]
    for depth, part in enumerate(parts):
        fields = [s.model_fields[part] for s in sections if part in s.model_fields]
        if not fields:
            raise ConfigError(f"{origin}: {_unknown_key_message(parts[: depth + 1], sections)}")
        members: dict[str | None, type[BaseModel]] = {}
        for field in fields:
            members |= _members(field.annotation)
        if depth < len(parts) - 1 and not members:
            raise ConfigError(
                f"{origin}: unknown key {'.'.join(parts)!r}: "
                f"{'.'.join(parts[: depth + 1])!r} is a value, not a section"
            )
        sections = list(dict.fromkeys(members.values()))


def _describe(error: Mapping[str, Any]) -> str:
    parts = tuple(str(p) for p in error["loc"])
    keys, sections, kind, kind_at = _resolve(parts)
    if error["type"] == "extra_forbidden":
        return _unknown_key_message(keys, sections, kind, kind_at)
    if error["type"] == "union_tag_invalid":  # model.type names no kind
        kinds = ", ".join(MODEL_TYPES)
        value = error["input"].get("type")
        return f"{'.'.join(keys)}.type: got {_short(value)}; should be one of {kinds}"
    name = ".".join(keys)
    message = error["msg"]
    # pydantic says "Input should be ..."/"Value error, ..."; reword to name the key.
    message = re.sub(r"^(Value error, |Input )", "", message)
    if error["type"] == "model_type" or error["type"] == "dict_type":
        message = "should be a section (a mapping of keys)"
    if not keys:  # a rule across keys (a model validator): its message names them
        return message
    if error["type"] == "value_error" and message.startswith(name + "."):
        return message  # a rule across the keys of one section names them itself
    return f"{name}: got {_short(error.get('input'))}; {message}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _yaml_kind(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return f"scalar ({_short(value)})"


def _deep_copy(data: Mapping) -> dict:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}
