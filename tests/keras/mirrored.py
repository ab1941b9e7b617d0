"""MirroredStrategy over 2 logical CPUs vs one device, same data: run in a subprocess.

Prints one JSON line with, for each rule, the reports of both runs, the largest
weight difference between them, and whether the two replicas hold identical weights.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"
import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import numpy as np  # noqa: E402
from scenarios import compile_small, fit_small_twice, small_model  # noqa: E402

from energy_callbacks.core import Caching  # noqa: E402

RULES = {  # name: (rule, whether the lazy gate skips the first step)
    "masked": (dict(units=0.5, synapses=0.2, samples="mistakes"), False),
    "measure only": (dict(samples="lazy"), True),  # the skipped step is restored, not masked
    "caching": (dict(synapses=0.2, samples="lazy", caching=Caching(0.1, 10.0, 1e-3)), True),
}


def run(strategy, rule, skip_first):
    with strategy.scope():
        model = small_model()
        compile_small(model)
    summary, weights = fit_small_twice(model, rule, skip_first)
    replicas_equal = all(
        all(np.array_equal(parts[0], p) for p in parts[1:])
        for parts in (
            [np.asarray(t) for t in strategy.experimental_local_results(v.value)]
            for v in model.trainable_variables
        )
    )
    return summary, weights, replicas_equal


def main() -> None:
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {}
    for name, (rule, skip_first) in RULES.items():
        multi, w_multi, equal = run(mirrored, rule, skip_first)
        single, w_single, _ = run(tf.distribute.get_strategy(), rule, skip_first)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(w_multi, w_single))
        out[name] = {
            "mirrored": multi,
            "single": single,
            "weight_diff": diff,
            "replicas_equal": equal,
            "replicas": mirrored.num_replicas_in_sync,
        }
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
