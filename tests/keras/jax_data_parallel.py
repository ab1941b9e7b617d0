"""keras.distribution.DataParallel over 2 host CPU devices (JAX) vs one device.

Run in a subprocess: the device count must be set before JAX starts.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import keras  # noqa: E402
import numpy as np  # noqa: E402
from scenarios import compile_small, fit_small_twice, small_model  # noqa: E402

RULE = dict(units=0.5, synapses=0.2, samples="mistakes")


def run() -> tuple[dict, list[np.ndarray]]:
    model = small_model()
    compile_small(model)
    return fit_small_twice(model, RULE)


def main() -> None:
    single, w_single = run()
    devices = keras.distribution.list_devices()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    multi, w_multi = run()
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(w_multi, w_single))
    out = {"devices": len(devices), "single": single, "data_parallel": multi, "weight_diff": diff}
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
