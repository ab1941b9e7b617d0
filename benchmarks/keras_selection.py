"""The Keras adapter's exact top fraction alone, per tensor of the paper MLP.

What the compiled step spends on ``TopFraction(0.1)``'s selection: the mask of the
top tenth of ``|after - before|`` for each tensor of the 784-1000-10 MLP, compiled
as the step compiles it (JAX's jit; XLA on TensorFlow). A change is one SGD step of
a batch of 32 (``lr * x^T delta``, float32, so that changes tie at the weights'
rounding as in training, :func:`draw`); the last row keeps the kernel's change in
a tenth of its units only, as the combined rule's unit rule does. Prints the median
milliseconds per tensor over several draws, and in how many draws the cut fell on
tied scores (the slower case).

    KERAS_BACKEND=jax python benchmarks/keras_selection.py
    KERAS_BACKEND=tensorflow python benchmarks/keras_selection.py --draws 8 --repeats 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from energy_callbacks.keras.ops import Difference, compiled_step, keras_ops  # noqa: E402

SHAPES = {"kernel 784x1000": (784, 1000), "bias 1000": (1000,), "kernel 1000x10": (1000, 10)}
UNITS_KEPT = 0.1
"""The combined rule's case, in the row ``+ 10% of units``: the kernel's change kept
in a tenth of its units (columns) only, as a unit rule leaves it."""


def draw(shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Weights after and before one SGD step (lr 0.01) of a batch of 32 standard-normal
    inputs, from Keras's Glorot-uniform start; the errors' scale (0.05) makes the
    scores tie at the cut about as often as in the MLP's training (see ``keras_overhead``)."""
    fan_in, units = (shape[0], shape[-1]) if len(shape) == 2 else (1, shape[0])
    limit = np.sqrt(6 / (fan_in + units))
    before = rng.uniform(-limit, limit, shape).astype("float32")
    x = rng.standard_normal((32, fan_in))
    delta = 0.05 * rng.standard_normal((32, units))
    change = (x.T @ delta / 32).reshape(shape).astype("float32")
    return (before - np.float32(0.01) * change).astype("float32"), before


def wait(x) -> None:
    np.asarray(ops.convert_to_numpy(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=8, help="changes per tensor")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per change")
    parser.add_argument("--fraction", type=float, default=0.1)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"keras {keras.__version__} on {keras.backend.backend()}, top {args.fraction:.0%}")
    print(f"{'tensor':<18} {'ms (median)':>11} {'min-max over draws':>19} {'ties at the cut':>16}")
    rows = [(name, shape, False) for name, shape in SHAPES.items()]
    rows.append(("kernel + 10% units", SHAPES["kernel 784x1000"], True))
    for name, shape, unit_rule in rows:
        n = int(np.prod(shape))
        k = int(args.fraction * n)

        def selection(a, b, m, k=k, unit_rule=unit_rule):
            change = Difference(a, b)
            return keras_ops.top_magnitude_mask(
                keras_ops.keep(change, m) if unit_rule else change, k
            )

        select = compiled_step(selection, restricts=True)  # as the masked step
        per_draw, ties = [], 0
        for _ in range(args.draws):
            after, before = draw(shape, rng)
            keep = np.ones(shape, bool)
            if unit_rule:
                keep = np.broadcast_to(rng.random(shape[-1]) < UNITS_KEPT, shape).copy()
            inputs = [ops.convert_to_tensor(x) for x in (after, before, keep)]
            mask = np.asarray(ops.convert_to_numpy(select(*inputs)))
            scores = np.where(keep, np.abs(after - before), 0).ravel()
            cut = np.sort(scores)[-k]
            ties += int((scores > cut).sum() + (scores == cut).sum() > k)
            assert int(mask.sum()) == k
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                wait(select(*inputs))
                times.append(time.perf_counter() - t)
            per_draw.append(statistics.median(times) * 1e3)
        print(
            f"{name:<18} {statistics.median(per_draw):11.3f} "
            f"{min(per_draw):9.3f}-{max(per_draw):.3f} {ties:>12}/{args.draws}"
        )


if __name__ == "__main__":
    main()
