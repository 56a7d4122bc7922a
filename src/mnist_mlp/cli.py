"""The `mnist-mlp` command line: parse, call the core, print, map errors to exit codes.

Only click is imported at module level, so `--help` and `--version` answer
without loading TensorFlow. Exit codes: 0 success, 1 a check or the
training failed, 2 bad input of any kind, 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path

import click

from mnist_mlp import __version__

EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process killed by it


_set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one config key, e.g. --set train.epochs=5 (repeatable; values are YAML).",
)


_checkpoint_option = click.option(
    "--checkpoint",
    required=True,
    metavar="MODEL",
    help="A saved model, e.g. runs/<run>/model.keras.",
)


def _device_option(help_text: str):
    return click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "gpu"]),
        default="auto",
        show_default=True,
        help=help_text,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="mnist-mlp")
def cli() -> None:
    """Train and evaluate the classic Keras MNIST multilayer perceptron, reproducibly.

    \b
    Start with:
      mnist-mlp install-check
      mnist-mlp train --config configs/quick.yaml
      mnist-mlp evaluate --checkpoint runs/<run>/model.keras
      mnist-mlp predict --checkpoint runs/<run>/model.keras my-digit.png
      mnist-mlp export --checkpoint runs/<run>/model.keras --format onnx --output model.onnx
    """


@cli.command()
@click.option(
    "--config",
    "config_path",
    metavar="FILE",
    help="YAML config (default: built-in defaults, the tutorial's run).",
)
@_set_option
@click.option(
    "--run-dir",
    metavar="DIR",
    help="Where to write the run (default: runs/<config name>-<UTC time>); "
    "must not exist or be empty.",
)
@click.option(
    "--resume",
    "resume_dir",
    metavar="RUN_DIR",
    help="Continue an interrupted run from its last saved epoch, with its own config "
    "(only --set train.epochs=N may change, to extend it; model.fine_tune.epochs=N for a "
    "pretrained model).",
)
@click.option("--quiet", "-q", is_flag=True, help="Print only the final summary.")
@click.option("--verbose", "-v", is_flag=True, help="Also show TensorFlow's own log lines.")
def train(
    config_path: str | None,
    overrides: tuple[str, ...],
    run_dir: str | None,
    resume_dir: str | None,
    quiet: bool,
    verbose: bool,
) -> None:
    """Train the network and write a run directory.

    model.type chooses the network: mlp (the tutorial's, the default), cnn,
    rnn, or pretrained (a keras.applications backbone, fine-tuned in two
    phases); configs/cnn.yaml, rnn.yaml and pretrained.yaml show their keys.

    The run directory holds model.keras (final model), best.keras (best epoch
    by checkpoint.monitor), config.yaml (the resolved config), history.csv (one
    row per epoch), curves.png (loss and accuracy per epoch), metrics.json
    (final scores, device, versions, timings), state.npz (the training state
    saved after every epoch, for --resume) and, with logging.tensorboard,
    tensorboard/ (view with: tensorboard --logdir runs).

    In a terminal each epoch shows Keras's progress bar and then one summary
    line; otherwise (a pipe, a log file) only the summary line.

    Ctrl-C or SIGTERM stops after the current batch; the run keeps its last
    finished epoch and can be continued with --resume.
    """
    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose contradict each other; give one of them")
    from mnist_mlp import runtime
    from mnist_mlp.config import config_name, load_config
    from mnist_mlp.runs import STATE_FILE, default_run_dir, resume_config

    runtime.set_verbose(verbose)

    if resume_dir is not None:
        if run_dir is not None:
            raise click.UsageError("--resume continues RUN_DIR itself; leave out --run-dir")
        target = Path(resume_dir)
        config = resume_config(target, config_path, overrides)
    else:
        config = load_config(config_path, overrides)
        target = Path(run_dir) if run_dir else default_run_dir(config_name(config_path))
    # Before anything imports Keras, which reads the backend once.
    runtime.set_backend(config.backend)
    from mnist_mlp.signals import StopRequested
    from mnist_mlp.train import train as run_training

    def stop_now(signum, frame):
        # Before and after the fit, SIGTERM stops at once, like Ctrl-C does;
        # during it, signals.handled() defers both to the next batch end.
        raise StopRequested(signum)

    signal.signal(signal.SIGTERM, stop_now)
    try:
        result = run_training(
            config,
            target,
            report=(lambda line: None) if quiet else click.echo,
            # The bar redraws itself with control characters: terminals only.
            progress_bar=sys.stdout.isatty() and not quiet,
            resume=resume_dir is not None,
        )
    except KeyboardInterrupt as interrupt:
        terminated = getattr(interrupt, "signum", None) == signal.SIGTERM
        code = EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
        if (target / STATE_FILE).is_file():
            resume = f"mnist-mlp train --resume {shlex.quote(str(target))}"
            _fail(f"interrupted; resume with: {resume}", code)
        _fail("interrupted before the first epoch ended; nothing was saved to resume", code)
    m = result.metrics
    train_score, test_score = m["final"]["train"], m["final"]["test"]
    seconds = m["seconds"]
    epochs = f"{m['epochs']} epoch{'s' if m['epochs'] != 1 else ''}"
    click.echo(
        f"finished {epochs} in {seconds['total']:.1f} s "
        f"({seconds['mean_per_epoch']:.2f} s/epoch) on {result.device.description}"
    )
    click.echo(f"  train  loss {train_score['loss']:.4f}  accuracy {train_score['accuracy']:.4f}")
    click.echo(
        f"  test   loss {test_score['loss']:.4f}  accuracy {test_score['accuracy']:.4f}"
        f"  ({test_score['correct']:,}/{test_score['total']:,})"
    )
    click.echo(
        f"wrote {result.run_dir}/ (model.keras, best.keras, metrics.json, history.csv, "
        "curves.png, ...)"
    )
    click.echo(f"evaluate with: mnist-mlp evaluate --checkpoint {result.run_dir / 'model.keras'}")


@cli.command()
@click.option(
    "--checkpoint",
    "checkpoints",
    required=True,
    multiple=True,
    metavar="MODEL",
    help="A saved model, e.g. runs/<run>/model.keras; repeat to compare models side by side.",
)
@click.option("--config", "config_path", metavar="FILE", help="Evaluate on this config's data.")
@click.option(
    "--data-path",
    metavar="PATH",
    help="Evaluate on a local .npz or IDX folder (only the test files are needed).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "gpu"]),
    help="Device to score on (default: the config's, else auto).",
)
@click.option(
    "--backend",
    type=click.Choice(["tensorflow", "jax"]),
    help="Keras backend to score with (default: the config's, else tensorflow); "
    "a checkpoint loads under either.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
@click.option(
    "--output",
    metavar="DIR",
    help="Also write report.json, confusion_matrix.png and mistakes.png here "
    "(one subfolder per checkpoint when comparing); existing reports are not overwritten.",
)
def evaluate(
    checkpoints: tuple[str, ...],
    config_path: str | None,
    data_path: str | None,
    device: str | None,
    backend: str | None,
    as_json: bool,
    output: str | None,
) -> None:
    """Score saved models on a test set: loss, accuracy, per-class precision, recall
    and F1, and the confusion matrix.

    The data is, in order: --config's, --data-path, the config.yaml of the run
    the checkpoint belongs to, or else MNIST downloaded through Keras. Models
    compared with several --checkpoint options are scored on the same images.
    """
    if config_path is not None and data_path is not None:
        raise click.UsageError("--config and --data-path both name the data; give one of them")
    seen: dict[str, int] = {}
    for i, checkpoint in enumerate(checkpoints):
        first = seen.setdefault(os.path.realpath(checkpoint), i)
        if first != i:
            raise click.UsageError(
                f"--checkpoint {checkpoint} is the same file as --checkpoint "
                f"{checkpoints[first]}; compare different models"
            )
    from mnist_mlp.config import Config, load_config, validate
    from mnist_mlp.evaluate import evaluate as run_evaluation
    from mnist_mlp.files import to_json
    from mnist_mlp.formatting import comparison_lines, evaluation_lines

    run_configs = [Path(c).parent / "config.yaml" for c in checkpoints]
    from_run = None
    if config_path is not None:
        config = load_config(config_path)
    elif data_path is not None:
        config = validate({"data": {"path": data_path}}, "--data-path")
    else:
        found = {str(p): load_config(p) for p in run_configs if p.is_file()}
        datas = {c.data for c in found.values()}
        if len(datas) > 1:
            raise click.UsageError(
                "the checkpoints' runs were trained on different data ("
                + ", ".join(found)
                + "); give --data-path or --config to compare them on one test set"
            )
        config = next(iter(found.values())) if found else Config()
        from_run = next(iter(found)) if found else None
    from mnist_mlp import runtime

    runtime.set_backend(backend or config.backend)
    reports = run_evaluation(
        list(checkpoints), config.data, device=device or config.device, output=output
    )
    if as_json:
        documents = [r.as_dict() for r in reports]
        click.echo(to_json(documents[0] if len(documents) == 1 else {"reports": documents}))
        return
    lines = evaluation_lines(reports[0]) if len(reports) == 1 else comparison_lines(reports)
    for line in lines:
        click.echo(line)
        if from_run and line.startswith("data "):
            indent = len(line) - len(line.split(maxsplit=1)[1])
            click.echo(f"{'':<{indent}}(the data of {from_run})")
    if output is not None:
        click.echo(f"\nwrote report.json, confusion_matrix.png and mistakes.png to {output}")


@cli.command()
@_checkpoint_option
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@_device_option("Device to predict on.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print results and errors as one JSON document."
)
def predict(checkpoint: str, inputs: tuple[str, ...], device: str, as_json: bool) -> None:
    """Classify handwritten digits in image files and .npy arrays.

    Images (PNG, JPEG, ...) may have any size and either polarity (dark ink on
    light paper or light on dark); each is cut to its digit, fitted into 20x20
    and centred by its centre of mass in 28x28, as MNIST was made. A .npy array
    holds one digit (28, 28) or many, (N, 28, 28) or (N, 784): integers 0..255
    or floats in [0, 1], used as they are. Prints the digit and the top three
    probabilities per input. An input that cannot be read is one line on stderr;
    the others are still classified, and the exit status is then 2.
    """
    from mnist_mlp.files import to_json
    from mnist_mlp.predict import classify

    result = classify(checkpoint, inputs, device=device)
    if as_json:
        click.echo(to_json(result.as_dict()))
    else:
        width = max((len(p.name) for p in result.predictions), default=0)
        for p in result.predictions:
            guesses = ", ".join(f"{digit} {probability:.3f}" for digit, probability in p.top)
            click.echo(f"{p.name:<{width}}  {p.digit}   ({guesses})")
    for _, message in result.errors:
        click.echo(f"error: {message}", err=True)
    if result.errors:
        sys.exit(EXIT_BAD_INPUT)


@cli.command("export")
@_checkpoint_option
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice(["savedmodel", "tflite", "onnx"]),
    help="savedmodel (a folder, TensorFlow Serving), tflite (a file, LiteRT) or onnx "
    '(a file; needs pip install "mnist-mlp[onnx]").',
)
@click.option("--output", required=True, metavar="PATH", help="Where to write it; must not exist.")
@_device_option("Device to load the model on (the check itself runs on the CPU).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document.")
@click.option("--verbose", "-v", is_flag=True, help="Show what the converters print.")
def export_command(
    checkpoint: str, fmt: str, output: str, device: str, as_json: bool, verbose: bool
) -> None:
    """Export a saved model for serving, then check it computes what the Keras model does.

    The export is Keras's Model.export. The exported model is then run with its
    own runtime (TensorFlow, LiteRT, onnxruntime) on 100 fixed inputs and
    compared with Keras; a difference over 1e-5 is an error (exit 1) and
    nothing is written. An existing PATH is never overwritten.
    """
    from mnist_mlp import runtime
    from mnist_mlp.export import export_model
    from mnist_mlp.files import to_json

    runtime.set_verbose(verbose)
    result = export_model(checkpoint, fmt, output, device=device, quiet=not verbose)
    if as_json:
        click.echo(to_json(result.as_dict()))
        return
    click.echo(f"exported {result.format} to {result.output} ({_size_text(result.size_bytes)})")
    if result.max_abs_diff is None:
        click.echo(f"not checked: {result.not_verified_reason}")
    else:
        click.echo(
            f"checked with {result.verified_with} on {result.samples_compared} inputs: "
            f"max |difference| to Keras {result.max_abs_diff:.1e} "
            f"(tolerance {result.tolerance:.0e})"
        )


def _size_text(size: float) -> str:
    for unit in ("bytes", "kB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} MB"


@cli.command("install-check")
@click.option("--gpu", "need_gpu", is_flag=True, help="Fail (exit 1) unless a GPU is usable.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON document.")
def install_check(need_gpu: bool, as_json: bool) -> None:
    """Check the installation: versions, CUDA build, and a computation on every device."""
    from mnist_mlp.errors import InstallError
    from mnist_mlp.files import to_json
    from mnist_mlp.install_check import run_install_check

    try:
        report = run_install_check()
    except InstallError as err:
        _fail(str(err), EXIT_CHECK_FAILED)
    if as_json:
        click.echo(to_json(report.as_dict()))
    else:
        _print_install_report(report)
    if not report.ok:
        _fail("a device failed the matrix-product check (see above)", EXIT_CHECK_FAILED)
    if need_gpu and not report.gpu_ok:
        reason = report.gpu_advice or "a GPU is listed but failed the matrix-product check"
        _fail(f"no usable GPU: {reason}", EXIT_CHECK_FAILED)


def _print_install_report(report) -> None:
    versions = report.versions
    for name in ("mnist_mlp", "python", "tensorflow", "keras", "numpy"):
        click.echo(f"{name.replace('_', '-'):<14}{versions[name]}")
    click.echo(f"{'backend':<14}{report.backend}")
    build = report.build
    cuda = (
        f"yes (CUDA {build['cuda_version']}, cuDNN {build['cudnn_version']})"
        if build["is_cuda_build"]
        else "no (CPU-only TensorFlow)"
    )
    click.echo(f"{'CUDA build':<14}{cuda}")
    click.echo(f"{'NVIDIA driver':<14}{report.driver or 'not found'}")
    click.echo("devices:")
    for d in report.devices:
        status = (
            f"ok (matrix product exact, {d.seconds * 1000:.1f} ms)"
            if d.ok
            else f"FAILED: {d.error}"
        )
        click.echo(f"  {d.name:<18}{d.device_type:<5}{status}")
    if report.jax is None:
        click.echo(f"{'jax':<14}not installed (backend: jax needs pip install \"mnist-mlp[jax]\")")
    else:
        jax_devices = ", ".join(
            f"{d['name']} {'ok' if d['ok'] else 'FAILED: ' + d['error']}"
            for d in report.jax["devices"]
        )
        click.echo(f"{'jax':<14}{report.jax['version']} ({jax_devices or report.jax['error']})")
    gpu = "usable" if report.gpu_ok else f"none usable: {report.gpu_advice or 'check failed'}"
    click.echo(f"{'GPU':<14}{gpu}")
    for line in report.tensorflow_messages:
        click.echo(f"  tensorflow said: {line}")
    click.echo("install OK" if report.ok else "install BROKEN")


@cli.group("config")
def config_group() -> None:
    """Inspect configurations."""


@config_group.command("show")
@click.option(
    "--config", "config_path", metavar="FILE", help="YAML config (default: built-in defaults)."
)
@_set_option
def config_show(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Print the resolved config (defaults < file < --set) as YAML."""
    from mnist_mlp.config import load_config, to_yaml

    click.echo(to_yaml(load_config(config_path, overrides)), nl=False)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: every failure is one stderr line and an exit code."""
    from mnist_mlp.errors import MnistMlpError

    try:
        code = cli.main(args=argv, prog_name="mnist-mlp", standalone_mode=False)
    except MnistMlpError as err:
        _fail(str(err), err.exit_code)
    except click.UsageError as err:
        where = f" (see '{err.ctx.command_path} --help')" if err.ctx else ""
        # Click lists choices over several lines ("Choose from:\n\tcpu,\n\tgpu"): one line.
        _fail(f"{' '.join(err.format_message().split())}{where}", EXIT_BAD_INPUT)
    except click.ClickException as err:
        _fail(err.format_message(), err.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (`mnist-mlp evaluate --json | head`); stop quietly.
        # Point stdout at devnull so the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_CHECK_FAILED)
    except OSError as err:
        # A path the core did not expect to fail (a name too long, a permission):
        # still one line naming it, not a traceback.
        where = f"{err.filename}: " if err.filename else ""
        _fail(f"{where}{err.strerror or err}; check the path and its permissions", EXIT_BAD_INPUT)
    sys.exit(code if isinstance(code, int) else 0)
