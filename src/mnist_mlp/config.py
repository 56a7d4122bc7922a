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
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mnist_mlp.errors import ConfigError


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


class ModelConfig(_Section):
    """The tutorial's network: Dense(units) -> Dropout -> ReLU -> Dense(10) -> softmax."""

    units: int = Field(784, ge=1, le=65536)
    dropout_rate: float = Field(0.4, ge=0.0, lt=1.0)


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
    model: ModelConfig = ModelConfig()
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
        loc = tuple(str(p) for p in first["loc"])
        origin = "--set" if loc in set(overridden) else source
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


def config_name(path: str | os.PathLike | None) -> str:
    """The name a run is filed under: the config file's stem, or `default`."""
    return Path(path).stem if path is not None else "default"


# ------------------------------------------------------------------------ helpers


def _section_at(parts: tuple[str, ...]) -> type[BaseModel] | None:
    """The schema class owning the key at `parts[-1]`, or None if the parent is not a section."""
    section: type[BaseModel] = Config
    for part in parts[:-1]:
        field = section.model_fields.get(part)
        candidates = typing.get_args(field.annotation) or (field.annotation,) if field else ()
        models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not models:
            return None
        section = models[0]
    return section


def _unknown_key_message(parts: tuple[str, ...]) -> str:
    section = _section_at(parts)
    name = ".".join(parts)
    if section is None:
        parent = ".".join(parts[:-1])
        return f"unknown key {name!r}: {parent!r} is a value, not a section"
    valid = list(section.model_fields)
    close = difflib.get_close_matches(parts[-1], valid, n=1, cutoff=0.6)
    prefix = ".".join(parts[:-1] + ("",))
    hint = (
        f"did you mean {prefix + close[0]!r}?"
        if close
        else "valid keys here: " + ", ".join(prefix + k for k in valid)
    )
    return f"unknown key {name!r}; {hint}"


def _check_key_path(parts: tuple[str, ...], origin: str) -> None:
    section = _section_at(parts)
    if section is None or parts[-1] not in section.model_fields:
        raise ConfigError(f"{origin}: {_unknown_key_message(parts)}")


def _describe(error: Mapping[str, Any]) -> str:
    parts = tuple(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return _unknown_key_message(parts)
    name = ".".join(parts)
    message = error["msg"]
    # pydantic says "Input should be ..."/"Value error, ..."; reword to name the key.
    message = re.sub(r"^(Value error, |Input )", "", message)
    if error["type"] == "model_type" or error["type"] == "dict_type":
        message = "should be a section (a mapping of keys)"
    if not parts:  # a rule across keys (a model validator): its message names them
        return message
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
