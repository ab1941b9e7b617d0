"""Step-time overhead of the Keras PlasticityCallback on one backend, side by side.

The same models and batches as benchmarks/overhead.py (the MLP 784-1000-10 with
leaky ReLU, or with ``--workload cnn`` its CNN on 28x28 images; cross-entropy, SGD,
random data, CPU). Each round fits every configuration for
the same number of steps, alternating, in one process. The step time is the
median interval between consecutive ``on_train_batch_begin`` calls after the
warm-up steps (the first steps include tracing): what a user waits for per step.
The ratio is over the plain fit of the same round; the median over rounds is shown.

    KERAS_BACKEND=jax python benchmarks/keras_overhead.py --batch-sizes 32
    KERAS_BACKEND=jax python benchmarks/keras_overhead.py --batch-sizes 32 --no-jit
    KERAS_BACKEND=jax python benchmarks/keras_overhead.py --workload cnn --batch-sizes 128
    python benchmarks/overhead.py --keras tensorflow jax torch   # all rows, one table
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from rules import configs  # noqa: E402

from energy_callbacks.keras import PlasticityCallback  # noqa: E402

CONFIGS = configs(PlasticityCallback)


class StepTimer(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.starts: list[float] = []

    def on_train_batch_begin(self, batch, logs=None) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, batch, logs=None) -> None:
        float(np.asarray(logs["loss"]))  # wait for the step (JAX dispatches asynchronously)


def mlp() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(1000),
            keras.layers.LeakyReLU(negative_slope=0.1),
            keras.layers.Dense(10),
        ]
    )


def cnn() -> keras.Model:
    """The CNN of benchmarks/overhead.py: conv 32 - pool - conv 64 - pool - dense 128 - 10."""
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


WORKLOADS = {"mlp": mlp, "cnn": cnn}


def median_step(
    config,
    batch_size: int,
    steps: int,
    warmup: int,
    jit: str | bool = "auto",
    workload: str = "mlp",
) -> float:
    """Median seconds per step of one fit."""
    keras.utils.set_random_seed(0)
    n = batch_size * (steps + warmup)
    rng = np.random.default_rng(0)
    model = WORKLOADS[workload]()
    x = rng.standard_normal((n, *model.input_shape[1:])).astype("float32")
    y = rng.integers(0, 10, n).astype("int32")
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    timer = StepTimer()
    callbacks = [timer] if config is None else [config(), timer]
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    starts = timer.starts[warmup:]
    return statistics.median(b - a for a, b in zip(starts, starts[1:], strict=False))


def measure(
    batch_sizes: list[int],
    steps: int,
    warmup: int,
    rounds: int,
    jit: str | bool = "auto",
    workload: str = "mlp",
) -> list[dict]:
    """One row per (batch size, configuration): median ms and ratio (min, max) over rounds."""
    rows = []
    for batch_size in batch_sizes:
        runs: dict[str, list[float]] = {name: [] for name in CONFIGS}
        ratios: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for _ in range(rounds):
            base = 1.0
            for name, config in CONFIGS.items():
                t = median_step(config, batch_size, steps, warmup, jit, workload)
                base = t if config is None else base
                runs[name].append(t)
                ratios[name].append(t / base)
        for name in CONFIGS:
            r = ratios[name]
            rows.append(
                {
                    "batch": batch_size,
                    "config": name,
                    "ms": statistics.median(runs[name]) * 1e3,
                    "ratio": statistics.median(r),
                    "min": min(r),
                    "max": max(r),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per fit")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workload", choices=list(WORKLOADS), default="mlp")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument(
        "--no-jit", action="store_true", help="compile with jit_compile=False (no XLA)"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    jit = False if args.no_jit else "auto"
    rows = measure(args.batch_sizes, args.steps, args.warmup, args.rounds, jit, args.workload)
    if args.json:
        print(json.dumps(rows))
        return
    xla = ", jit_compile=False" if args.no_jit else ""
    print(
        f"keras {keras.__version__} on {keras.backend.backend()}{xla}, {args.workload}, "
        f"{args.rounds} rounds"
    )
    print(f"{'batch':>5}  {'configuration':<38} {'ms/step':>8} {'ratio':>6} (min-max)")
    for r in rows:
        print(
            f"{r['batch']:>5}  {r['config']:<38} {r['ms']:8.2f} {r['ratio']:6.2f} "
            f"({r['min']:.2f}-{r['max']:.2f})"
        )


if __name__ == "__main__":
    main()
