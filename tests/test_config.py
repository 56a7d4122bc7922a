"""Config: shipped files, precedence, and one clear error for every kind of bad value."""

from __future__ import annotations

import datetime as dt
import re

import pytest
import yaml
from conftest import CONFIGS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from mnist_mlp.config import (
    MODEL_TYPES,
    Config,
    FineTuneConfig,
    PretrainedConfig,
    apply_overrides,
    config_name,
    load_config,
    parse_yaml,
    to_yaml,
    validate,
)
from mnist_mlp.errors import ConfigError
from mnist_mlp.runs import default_run_dir

SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def test_configs_folder_ships_the_documented_files():
    kinds = {"cnn.yaml", "rnn.yaml", "pretrained.yaml"}
    assert {p.name for p in SHIPPED} >= {"cpu.yaml", "gpu.yaml", "quick.yaml"} | kinds
    for name in kinds:  # each model kind's config is that kind, with its defaults
        config = load_config(CONFIGS / name)
        assert config.model == type(config.model)(), name


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_round_trips(path):
    config = load_config(path)
    assert validate(yaml.safe_load(to_yaml(config))) == config


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_key_in_shipped_configs_is_commented(path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if re.match(r"^\s*[a-z_]+:", line):  # a key, with a value or opening a section
            assert "#" in line, f"{path.name}:{number} has no comment: {line!r}"


def test_cpu_config_is_the_tutorial_run():
    config = load_config(CONFIGS / "cpu.yaml")
    assert config.device == "cpu"
    assert config.data.name == "mnist" and config.data.path is None
    assert (config.model.units, config.model.dropout_rate) == (784, 0.4)
    assert config.train.batch_size == 128
    assert config.train.epochs == 100
    assert config.train.learning_rate == 0.001  # Keras's Adam default
    assert config.train.validation_split == 0.0  # validate on the test set


def test_gpu_and_quick_configs_differ_from_cpu_only_where_documented():
    cpu = load_config(CONFIGS / "cpu.yaml").model_dump()
    gpu = load_config(CONFIGS / "gpu.yaml").model_dump()
    quick = load_config(CONFIGS / "quick.yaml").model_dump()
    assert gpu == cpu | {"device": "gpu"}
    assert quick["train"]["epochs"] == 2
    quick["train"]["epochs"] = 100
    assert quick == cpu | {"device": "auto"}


def test_defaults_are_the_tutorial_network():
    assert Config().model_dump() == load_config(CONFIGS / "cpu.yaml").model_dump() | {
        "device": "auto"
    }


def test_precedence_defaults_then_file_then_set(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  epochs: 5\n  batch_size: 64\n")
    config = load_config(path, ["train.epochs=7", "train.epochs=9", "model.units=32"])
    assert config.train.epochs == 9  # the last --set wins over the file and earlier --set
    assert config.train.batch_size == 64  # the file wins over the default
    assert config.model.units == 32
    assert config.train.learning_rate == 0.001  # untouched default


def test_set_values_are_yaml_scalars():
    config = load_config(None, ["train.learning_rate=1e-4", "data.path=null", "seed=7"])
    assert config.train.learning_rate == pytest.approx(1e-4)
    assert config.data.path is None
    assert config.seed == 7


def test_exponent_without_dot_is_a_float_in_files(tmp_path):
    # PyYAML alone reads 1e-3 as a string; users write it for learning rates.
    assert parse_yaml("lr: 1e-3\nn: 10\ns: abc", "t") == {"lr": 0.001, "n": 10, "s": "abc"}


def test_config_is_immutable():
    config = Config()
    with pytest.raises(ValidationError):
        config.train = None  # type: ignore[misc]
    with pytest.raises(ValidationError):
        config.train.epochs = 3  # type: ignore[misc]


def test_relative_data_path_is_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["data.path=data/mnist.npz"])
    assert config.data.path == str(tmp_path / "data" / "mnist.npz")


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("train.epochs=0", ["train.epochs", "got 0", "greater than or equal to 1"]),
        ("train.epochs=ten", ["train.epochs", "'ten'", "valid integer"]),
        ("train.epochs=2.5", ["train.epochs", "2.5", "valid integer"]),
        ("train.epochs=true", ["train.epochs", "True", "valid integer"]),
        ("train.batch_size=0", ["train.batch_size", "got 0", "greater than or equal to 1"]),
        ("train.batch_size=-128", ["train.batch_size", "-128"]),
        ("model.dropout_rate=1.0", ["model.dropout_rate", "1.0", "less than 1"]),
        ("model.dropout_rate=-0.1", ["model.dropout_rate", "-0.1", "greater than or equal to 0"]),
        ("model.units=0", ["model.units", "got 0"]),
        ("train.learning_rate=0", ["train.learning_rate", "greater than 0"]),
        ("train.learning_rate=.nan", ["train.learning_rate", "nan"]),
        ("train.validation_split=1", ["train.validation_split", "less than 1"]),
        ("device=tpu", ["device", "'tpu'", "'auto', 'cpu' or 'gpu'"]),
        ("data.name=cifar10", ["data.name", "'cifar10'", "'mnist' or 'fashion_mnist'"]),
        ("data.path=''", ["data.path", "path"]),
        ("seed=-1", ["seed", "-1"]),
        ("model=5", ["model", "got 5", "section"]),
        ("model.type=transformer", ["model.type", "'transformer'", "mlp, cnn, rnn, pretrained"]),
        ("model.type=[1]", ["model.type", "[1]", "should be one of"]),
        ("model.type=cnn;model.filters=[0]", ["model.filters", "integers 1 .. 4096"]),
        ("model.type=cnn;model.kernel_size=29", ["model.kernel_size", "less than or equal to 28"]),
        (
            "model.type=cnn;model.filters=[8, 8, 8, 8];model.kernel_size=3",
            ["model.filters has 4 blocks", "block 4 gets a 28x28 digit down to nothing"],
        ),
        ("model.type=rnn;model.cell=transformer", ["model.cell", "'lstm' or 'gru'"]),
        ("model.type=pretrained;model.backbone=resnet18", ["model.backbone", "'resnet18'"]),
        ("model.type=pretrained;model.weights=w.txt", ["model.weights", "imagenet, none"]),
        ("model.type=pretrained;model.image_size=16", ["model.image_size", "32"]),
        ("model.type=pretrained;model.fine_tune.epochs=-1", ["model.fine_tune.epochs", "-1"]),
        ("model.type=pretrained;model.fine_tune=3", ["model.fine_tune", "section"]),
        (
            "model.type=cnn;model.units=64",
            ["unknown key 'model.units' for model.type cnn", "belongs to model.type mlp and rnn"],
        ),
    ],
)
def test_bad_values_name_the_key_value_and_what_is_allowed(override, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(None, override.split(";"))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("train:\n  epoch: 5\n", ["unknown key 'train.epoch'", "did you mean 'train.epochs'"]),
        ("modle:\n  units: 5\n", ["unknown key 'modle'", "did you mean 'model'"]),
        ("train:\n  zzz: 1\n", ["unknown key 'train.zzz'", "valid keys here", "train.epochs"]),
        ("model:\n  units:\n    deep: 1\n", ["model.units", "valid integer"]),
    ],
)
def test_unknown_keys_in_files_are_rejected_with_a_suggestion(tmp_path, text, fragments):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("train.epochs", ["expected KEY=VALUE"]),
        ("=5", ["expected KEY=VALUE"]),
        ("train..epochs=5", ["empty part"]),
        ("train.epoch=5", ["unknown key 'train.epoch'", "did you mean 'train.epochs'"]),
        ("model.units.x=3", ["'model.units' is a value, not a section"]),
        ("train.epochs=[1", ["malformed YAML"]),
        ("data.path=", ["empty value", "data.path=null"]),
        ("data.path=  ", ["empty value"]),
        ("model.filtres=[8]", ["unknown key 'model.filtres'", "did you mean 'model.filters'"]),
        ("model.cnn.filters=[8]", ["'model.cnn'", "chosen by model.type", "model.filters"]),
        ("model.fine_tune.lr=1", ["'model.fine_tune.lr'", "model.fine_tune.learning_rate"]),
    ],
)
def test_bad_set_syntax_and_unknown_set_keys(override, fragments):
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, [override])
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("", ["empty"]),
        ("# only a comment\n", ["empty"]),
        ("- 1\n- 2\n", ["top level is a list", "mapping"]),
        ("just a string\n", ["top level is a scalar"]),
        ("train: [1,\n", ["malformed YAML", "line"]),
        ("train:\n  epochs: 5\n  epochs: 6\n", ["duplicate key 'epochs'"]),
        ("train:\n\tepochs: 5\n", ["malformed YAML"]),
        ("? [1, 2]\n: 3\n", ["a list used as a key"]),
        ("train:\n  {a: 1}: 2\n", ["a mapping used as a key"]),
        ("7: 1\n", ["Keys should be strings"]),
    ],
)
def test_bad_config_files(tmp_path, content, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_directory_and_binary_config_paths(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    binary = tmp_path / "model.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ConfigError, match="not a UTF-8"):
        load_config(binary)


def test_config_name_and_default_run_dir(tmp_path):
    assert config_name("configs/cpu.yaml") == "cpu"
    assert config_name(None) == "default"
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    first = default_run_dir("cpu", root=tmp_path, now=now)
    assert first == tmp_path / "cpu-20260102-030405"
    first.mkdir()
    # A second run in the same second gets its own folder, never the first one's.
    assert default_run_dir("cpu", root=tmp_path, now=now) == tmp_path / "cpu-20260102-030405-2"


# ------------------------------------------------------------- property-based

_SECTION_KEYS = {
    "data": ["name", "path", "nmae"],
    "model": ["type", "units", "dropout_rate", "unit", "filters", "kernel_size", "cell"],
    "train": [
        "epochs",
        "batch_size",
        "learning_rate",
        "validation_split",
        "deterministic",
        "epoch",
    ],
    "checkpoint": ["monitor", "every_batches", "every"],
    "logging": ["tensorboard", "tensorbord"],
}
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=300_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(), max_size=2),
    st.sampled_from(["mnist", "fashion_mnist", "cpu", "gpu", "auto", "/tmp/x.npz"]),
    st.sampled_from(["mlp", "cnn", "rnn", "pretrained", "lstm", "gru"]),
)
_configs = st.fixed_dictionaries(
    {},
    optional={
        "seed": _values,
        "device": _values,
        "backend": st.one_of(_values, st.sampled_from(["jax", "tensorflow", "torch"])),
        "extra": _values,
        **{
            section: st.one_of(_values, st.dictionaries(st.sampled_from(keys), _values))
            for section, keys in _SECTION_KEYS.items()
        },
    },
)


def _key_paths(data: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in data.items():
        paths.add(prefix + key)
        if isinstance(value, dict):
            paths |= _key_paths(value, prefix + key + ".")
    return paths


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_configs)
def test_any_config_validates_or_is_rejected_naming_a_key(data):
    try:
        config = validate(data)
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message
        named = re.findall(r"'([a-z_.]+)'|^([a-z_.]+)[:=]", message)
        names = {a or b for a, b in named}
        assert names & _key_paths(data), f"{message!r} names no key of {data!r}"
    else:
        # Whatever validated is a complete, in-range config that round-trips.
        assert config.train.epochs >= 1 and config.train.batch_size >= 1
        assert 0.0 <= getattr(config.model, "dropout_rate", 0.0) < 1.0
        assert validate(yaml.safe_load(to_yaml(config))) == config


def test_errors_are_blamed_on_the_file_or_the_set_that_caused_them(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  epochs: 0\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: train.epochs: got 0"):
        load_config(path, ["model.units=32"])
    with pytest.raises(ConfigError, match=r"^--set: model.units: got 0"):
        load_config(path, ["model.units=0", "train.epochs=3"])
    # A --set inside a section the file's model kind does not have: the --set's fault.
    with pytest.raises(ConfigError, match=r"^--set: unknown key 'model.fine_tune' for model.type"):
        load_config(CONFIGS / "cnn.yaml", ["model.fine_tune.epochs=1"])


def test_early_stopping_may_restore_only_what_best_keras_keeps():
    ok = load_config(None, ["train.early_stopping.monitor=val_loss", "checkpoint.monitor=val_loss"])
    assert ok.train.early_stopping.monitor == "val_loss"
    assert (
        load_config(None, ["train.early_stopping.patience=2"]).train.early_stopping.monitor is None
    )
    with pytest.raises(ConfigError, match="set both to the same metric") as info:
        load_config(None, ["train.early_stopping.monitor=val_loss"])
    assert str(info.value).startswith("train.early_stopping.monitor=val_loss with")


def _sections(annotation):
    """The BaseModel classes an annotation can hold (through unions and Annotated)."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [cls for arg in typing.get_args(annotation) for cls in _sections(arg)]


def _keys(model, prefix=""):
    """Every dotted key a user sets: the values, and the optional sections (null or a mapping).

    The `model` section's keys are those of all its kinds (repeats included).
    """
    import typing

    for name, field in model.model_fields.items():
        key = prefix + name
        kinds = _sections(field.annotation)
        if not kinds or type(None) in typing.get_args(field.annotation):
            yield key
        for kind in kinds:
            yield from _keys(kind, key + ".")


def test_every_config_key_is_documented_in_the_readme_and_each_shipped_config():
    from mnist_mlp.config import Config

    table = (CONFIGS.parent / "README.md").read_text()
    keys = list(dict.fromkeys(_keys(Config)))
    assert "train.steps_per_execution" in keys and "train.early_stopping.patience" in keys
    missing = [key for key in keys if f"| `{key}` |" not in table]
    assert not missing, f"README's configuration table lacks {missing}"
    assert {"model.type", "model.filters", "model.cell", "model.fine_tune.epochs"} <= set(keys)
    top = [key for key in keys if key.count(".") <= 1]
    for path in sorted(CONFIGS.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        kind = MODEL_TYPES[data["model"]["type"]]
        for key in top:
            section, _, name = key.partition(".")
            if section == "model" and name not in kind.model_fields:
                continue  # another kind's key
            assert (name in data[section]) if name else (section in data), f"{path.name}: {key}"
        if kind is PretrainedConfig:
            assert set(data["model"]["fine_tune"]) == set(FineTuneConfig.model_fields)
