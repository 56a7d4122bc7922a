"""The one error family the core raises; the CLI turns each into one stderr line."""

from __future__ import annotations


class MnistMlpError(Exception):
    """Base class: a problem the user can fix (bad config, data, checkpoint, device).

    The message is a single line naming what is wrong and how to fix it.
    """

    # The CLI's exit status: 2 for bad input of any kind.
    exit_code = 2


class ConfigError(MnistMlpError):
    """The configuration file or an override is malformed or out of range."""


class DataError(MnistMlpError):
    """A data set could not be downloaded, read, or failed validation."""


class DeviceError(MnistMlpError):
    """The requested device is not available."""


class CheckpointError(MnistMlpError):
    """A saved model is missing, unreadable, or does not fit this task."""


class InstallError(MnistMlpError):
    """TensorFlow or Keras cannot be imported or used."""


class TrainingError(MnistMlpError):
    """Training failed (NaN loss, out of memory): the input was fine, the run was not."""

    exit_code = 1

    @classmethod
    def from_op_error(cls, err, hint: str = "") -> TrainingError:
        """One line from a tf.errors.OpError, whose message runs over many lines."""
        first = (err.message.splitlines() or [""])[0][:200]
        return cls(f"TensorFlow failed: {type(err).__name__}: {first}{'; ' + hint if hint else ''}")


class RunDirError(MnistMlpError):
    """The run directory cannot be used (exists, not writable)."""
