"""Benchmark the training paths side by side, on the same data, in one invocation.

    python scripts/bench.py                      # Fashion-MNIST if installed, else MNIST
    python scripts/bench.py --epochs 6 --json bench.json

Measured, each in its own process (a backend is chosen before Keras is imported,
and peak memory must be one run's):

- `project/<backend>`: the exact code `mnist-mlp train` runs (the installed
  executable, with its callbacks, history, best.keras and state.npz saves on),
  and `project/<backend>+bf16` the same with train.precision: mixed_bfloat16;
- `keras/<backend>`: a plain Keras script of the same network, written directly
  against Keras with no project code, `fit` on numpy arrays, batch 128,
  validating on the test set after each epoch as the tutorial does; and
  `keras/<backend>+spe32` the same script compiled with steps_per_execution=32,
  the project's default, to show what that setting alone gives plain Keras;
- `torch`: a plain PyTorch loop of the same network, when torch is installed.

Per configuration: min/median/max seconds per epoch over the epochs after the
first (the warm-up: tracing, compilation, caches), samples per second, the ratio
to each reference, and the ratio to the FLOP lower bound: the arithmetic of the
model's layer shapes at the float32 matrix-product peak measured in this run.
Also: whole-process seconds of `mnist-mlp --help`, `mnist-mlp config show` and
`mnist-mlp evaluate` on the 10,000 test images, and the peak resident memory
of the project's training process. Real images, not random ones: random labels
kill the ReLUs and fill Adam's state with denormals, which slows some
frameworks for reasons no user sees.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FASHION = Path("/usr/share/datasets/fashion-mnist")
EXECUTABLE = Path(sys.executable).with_name("mnist-mlp")
BACKENDS = ("tensorflow", "jax")


# --------------------------------------------------------------------- workers
# Each runs in a fresh interpreter: `python bench.py --worker NAME ...`.


def _load_arrays(data: str | None):
    """Train and test arrays as the tutorial prepares them: (N, 784) float32, one-hot labels."""
    import numpy as np

    from mnist_mlp.config import DataConfig
    from mnist_mlp.data import load_dataset

    dataset = load_dataset(DataConfig(path=data))

    def prepare(x, y):
        return x.reshape(len(x), 784).astype("float32") / 255.0, np.eye(10, dtype="float32")[y]

    return prepare(dataset.x_train, dataset.y_train), prepare(dataset.x_test, dataset.y_test)


def worker_keras(
    data: str | None, epochs: int, batch_size: int, units: int, steps_per_execution: int = 1
) -> dict:
    """The plain Keras reference: no project code past loading the arrays."""
    import keras

    (x, y), test = _load_arrays(data)
    keras.utils.set_random_seed(42)
    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(units),
            keras.layers.Dropout(0.4),
            keras.layers.Activation("relu"),
            keras.layers.Dense(10),
            keras.layers.Activation("softmax"),
        ]
    )
    model.compile(
        optimizer="adam",
        loss="categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    times: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.start)

    # Validated on the test set after every epoch, as the tutorial (and mnist-mlp) does.
    model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=epochs,
        validation_data=test,
        verbose=0,
        callbacks=[Timer()],
    )
    return {"seconds": times, "samples": len(x), "backend": keras.backend.backend()}


def worker_torch(data: str | None, epochs: int, batch_size: int, units: int) -> dict:
    """The plain PyTorch reference: the same network and Adam, fused, denormals flushed."""
    import torch

    (x, y), _ = _load_arrays(data)  # no validation pass: a lower bound for the loop
    torch.manual_seed(42)
    torch.set_flush_denormal(True)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, units),
        torch.nn.Dropout(0.4),
        torch.nn.ReLU(),
        torch.nn.Linear(units, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    features, labels = torch.from_numpy(x), torch.from_numpy(y.argmax(axis=1))
    loss_fn = torch.nn.CrossEntropyLoss()
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(features))
        for i in range(0, len(features), batch_size):
            batch = order[i : i + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(features[batch]), labels[batch]).backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    return {"seconds": times, "samples": len(x), "backend": f"torch {torch.__version__}"}


def worker_matmul() -> dict:
    """The float32 matrix-product peak of this machine, in FLOP/s (best of several)."""
    import numpy as np

    n = 2048
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    a @ b  # warm-up: thread pool, page faults
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return {"flops_per_second": 2 * n**3 / best, "size": n}


WORKERS = {"keras": worker_keras, "torch": worker_torch, "matmul": worker_matmul}


def _run_worker(name: str, backend: str | None, args, steps_per_execution: int = 1) -> dict:
    env = dict(os.environ)
    if backend:
        env["KERAS_BACKEND"] = backend
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [sys.executable, __file__, "--worker", name, "--epochs", str(args.epochs)]
    command += ["--steps-per-execution", str(steps_per_execution)]
    if args.data:
        command += ["--data", args.data]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": last}
    return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------ the project's path


def _run_child(command: list[str]) -> tuple[float, int, subprocess.CompletedProcess]:
    """Wall seconds, peak RSS in bytes and exit code of one child process.

    fork + exec + wait4 rather than subprocess: wait4 gives this child's own
    peak memory (what `time -v` reports), which Popen's reaping would lose.
    """
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: become the command, output to files
        out = os.open(os.devnull, os.O_WRONLY)
        os.dup2(out, 1)
        os.execvp(command[0], command)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    return seconds, usage.ru_maxrss * 1024, subprocess.CompletedProcess(command, code)


def project_run(
    args, backend: str, workdir: Path, precision: str = "float32", round_: int = 0
) -> dict:
    run_dir = workdir / f"project-{backend}-{precision}-{round_}"
    command = [
        str(EXECUTABLE),
        "train",
        "--quiet",
        "--set",
        f"train.epochs={args.epochs}",
        "--set",
        f"data.path={args.data}" if args.data else "data.path=null",
        "--run-dir",
        str(run_dir),
    ]
    command += ["--set", f"backend={backend}", "--set", f"train.precision={precision}"]
    seconds, rss, result = _run_child(command)
    if result.returncode != 0:
        return {"error": f"mnist-mlp train exited {result.returncode}"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "seconds": metrics["seconds"]["per_epoch"],
        "samples": metrics["data"]["train_samples"],
        "backend": metrics["backend"],
        "peak_rss_bytes": rss,
        "process_seconds": seconds,
        "test_accuracy": metrics["final"]["test"]["accuracy"],
        "precision": metrics["precision"],
        "run_dir": str(run_dir),
    }


def command_seconds(args, checkpoint: Path | None) -> dict:
    """Whole-process seconds of the quick commands and of evaluate on 10,000 images."""
    commands = {
        "mnist-mlp --help": [str(EXECUTABLE), "--help"],
        "mnist-mlp config show": [str(EXECUTABLE), "config", "show"],
    }
    if checkpoint is not None:
        data = ["--data-path", args.data] if args.data else []
        commands["mnist-mlp evaluate (10,000 images)"] = [
            str(EXECUTABLE), "evaluate", "--checkpoint", str(checkpoint), *data,
        ]
    results = {}
    for name, command in commands.items():
        runs = []
        for _ in range(3):
            seconds, _, result = _run_child(command)
            if result.returncode != 0:
                runs = None
                break
            runs.append(seconds)
        results[name] = statistics.median(runs) if runs else None
    return results


# --------------------------------------------------------------------- report


def flops_per_epoch(samples: int, units: int) -> float:
    """Forward and backward matrix-product FLOPs of one epoch of the MLP.

    Per sample and Dense layer of n inputs and m outputs: 2nm forward, 2nm for
    the weight gradient, and 2nm for the input gradient except in the first
    layer, whose input needs none. Biases, activations and Adam are ignored
    (they are O(n + m), not O(nm)).
    """
    layers = [(784, units), (units, 10)]
    per_sample = sum((6 if i else 4) * n * m for i, (n, m) in enumerate(layers))
    return per_sample * samples


def summarise(name: str, runs: list[dict]) -> dict:
    """One configuration over its rounds: the epochs after each run's warm-up, pooled."""
    measured = [seconds for run in runs for seconds in run["seconds"][1:]]
    last = runs[-1]
    summary = {
        "name": name,
        "min": min(measured),
        "median": statistics.median(measured),
        "max": max(measured),
        "epochs_measured": len(measured),
        "rounds": len(runs),
        "samples_per_second": last["samples"] / statistics.median(measured),
        **{k: v for k, v in last.items() if k not in ("seconds", "peak_rss_bytes")},
        "seconds_per_epoch": [run["seconds"] for run in runs],
    }
    if "peak_rss_bytes" in last:
        summary["peak_rss_bytes"] = max(run["peak_rss_bytes"] for run in runs)
    return summary


def print_table(report: dict) -> None:
    rows = report["configurations"]
    # Ratios to the plain scripts as a user writes them (Keras's defaults), and to torch.
    references = [
        r["name"] for r in rows if not r["name"].startswith("project") and "+" not in r["name"]
    ]
    bound = report["lower_bound_seconds"]
    header = f"{'configuration':<26}{'min':>7}{'median':>8}{'max':>7}{'samples/s':>11}"
    header += "".join(f"{'/' + ref:>19}" for ref in references) + f"{'/bound':>8}"
    print(header)
    medians = {r["name"]: r["median"] for r in rows}
    for r in rows:
        line = f"{r['name']:<26}{r['min']:>7.2f}{r['median']:>8.2f}{r['max']:>7.2f}"
        line += f"{r['samples_per_second']:>11,.0f}"
        line += "".join(f"{r['median'] / medians[ref]:>19.2f}" for ref in references)
        line += f"{r['median'] / bound:>8.1f}"
        print(line)
    for name, error in report["failed"].items():
        print(f"{name:<26}not measured: {error}")
    print(
        f"\nlower bound: {report['flops_per_epoch'] / 1e9:.0f} GFLOP per epoch at the measured "
        f"{report['matmul_flops_per_second'] / 1e9:.0f} GFLOP/s float32 peak = {bound:.2f} s/epoch"
    )
    for name, seconds in report["commands"].items():
        shown = f"{seconds:.2f} s" if seconds is not None else "failed"
        print(f"{name:<40}{shown}")
    for r in rows:
        if "peak_rss_bytes" in r:
            print(f"peak memory of {r['name']:<26}{r['peak_rss_bytes'] / 2**30:.2f} GiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a .npz or IDX folder (default: Fashion-MNIST if installed)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (first: warm-up)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every configuration this many times, interleaved, and pool the epochs "
        "(on a machine whose speed drifts, each configuration then sees the same drift)",
    )
    parser.add_argument("--json", dest="json_path", help="also write the report here")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--steps-per-execution", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import resource

        call = WORKERS[args.worker]
        if args.worker == "matmul":
            result = call()
        elif args.worker == "keras":
            result = call(args.data, args.epochs, 128, 784, args.steps_per_execution)
        else:
            result = call(args.data, args.epochs, 128, 784)
        # ru_maxrss is in KiB on Linux: this process's peak, for comparison with the project's.
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(result))
        return 0
    if args.epochs < 4:
        parser.error("--epochs must be at least 4: one warm-up and three measured")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.data is None and (FASHION / "train-images-idx3-ubyte.gz").is_file():
        args.data = str(FASHION)
    backends = [b for b in BACKENDS if importlib.util.find_spec(b) is not None]
    print(
        f"data: {args.data or 'MNIST (Keras download)'}; {args.epochs} epochs per run, "
        f"{args.rounds} round(s); backends: {', '.join(backends)}",
        flush=True,
    )
    results: dict[str, list[dict]] = {}

    def measure(round_: int, name: str, run, *run_args) -> None:
        print(f"round {round_ + 1}/{args.rounds}: running {name} ...", flush=True)
        results.setdefault(name, []).append(run(*run_args))

    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        for r in range(args.rounds):
            for backend in backends:
                measure(r, f"project/{backend}", project_run, args, backend, work, "float32", r)
                measure(r, f"keras/{backend}", _run_worker, "keras", backend, args)
                measure(r, f"keras/{backend}+spe32", _run_worker, "keras", backend, args, 32)
            for backend in backends:
                name = f"project/{backend}+bf16"
                measure(r, name, project_run, args, backend, work, "mixed_bfloat16", r)
            if importlib.util.find_spec("torch") is not None:
                measure(r, "torch", _run_worker, "torch", None, args)
        peak = _run_worker("matmul", None, args)
        project = results.get("project/tensorflow", [{}])[-1]
        checkpoint = Path(project["run_dir"]) / "model.keras" if "run_dir" in project else None
        commands = command_seconds(args, checkpoint)
    failed = {
        name: next(r["error"] for r in runs if "error" in r)
        for name, runs in results.items()
        if any("error" in r for r in runs)
    }
    rows = [summarise(name, runs) for name, runs in results.items() if name not in failed]
    samples = rows[0]["samples"] if rows else 60_000
    flops = flops_per_epoch(samples, 784)
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "epochs_per_run": args.epochs,
        "rounds": args.rounds,
        "data": args.data or "mnist",
        "configurations": rows,
        "failed": failed,
        "matmul_flops_per_second": peak["flops_per_second"],
        "flops_per_epoch": flops,
        "lower_bound_seconds": flops / peak["flops_per_second"],
        "commands": commands,
    }
    print()
    print_table(report)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
