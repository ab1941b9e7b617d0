"""The Keras side of the ``frameworks`` experiment, run in its own process.

``python -m energy_callbacks.reproduce.keras_run IN.npz OUT.json`` trains the
paper MLP with ``keras`` (whatever ``KERAS_BACKEND`` says; the parent sets
``tensorflow``) through :class:`energy_callbacks.keras.PlasticityCallback`, on
exactly the samples in ``IN.npz`` (in order, batch 1), from the weights of
:class:`~energy_callbacks.reference.PaperMLP` for the seed. It writes one result
per rule to ``OUT.json``. If the Keras adapter cannot be imported, ``OUT.json``
holds ``{"error": ...}`` and the exit status is 3.

``IN.npz`` holds ``x``/``y`` (the training samples in the order drawn),
``x_test``/``y_test``, ``n_hidden``, ``n_outputs``, ``seed``, ``lr`` and ``rules``.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

IMPORT_ERROR_STATUS = 3


def train_keras(spec: dict[str, Any], rule_name: str) -> dict[str, Any]:
    import keras

    from ..keras import PlasticityCallback
    from ..reference import PaperMLP
    from .rules import get_rule

    n_in = spec["x"].shape[1]
    n_hidden, n_out, seed = int(spec["n_hidden"]), int(spec["n_outputs"]), int(spec["seed"])
    ref = PaperMLP(n_in, n_hidden, n_out, seed=seed)
    model = keras.Sequential(
        [
            keras.Input((n_in,)),
            keras.layers.Dense(n_hidden, activation=lambda t: keras.ops.leaky_relu(t, 0.1)),
            keras.layers.Dense(n_out),
        ]
    )
    w1, b1, w2, b2 = ref.params
    model.layers[0].set_weights([w1.T, b1])  # Keras kernels are (inputs, units)
    model.layers[1].set_weights([w2.T, b2])

    def half_squared_error(y_true: Any, y_pred: Any) -> Any:
        target = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"), n_out)
        return 0.5 * keras.ops.sum(keras.ops.square(y_pred - target), axis=-1)

    model.compile(optimizer=keras.optimizers.SGD(float(spec["lr"])), loss=half_squared_error)
    callback = PlasticityCallback(get_rule(rule_name).build(n_hidden, seed))
    start = time.perf_counter()
    model.fit(
        spec["x"], spec["y"], batch_size=1, epochs=1, shuffle=False, verbose=0, callbacks=[callback]
    )
    seconds = time.perf_counter() - start
    rep = callback.report()
    predicted = np.argmax(model.predict(spec["x_test"], batch_size=2000, verbose=0), axis=1)
    return {
        "rule": rule_name,
        "m1": rep.m1,
        "m0": int(rep.m0),
        "m1_min": rep.m1_min,
        "m0_min": int(rep.m0_min),
        "inefficiency": rep.inefficiency,
        "samples_learned": rep.samples_learned / max(rep.samples_seen, 1),
        "accuracy": float(np.mean(predicted == spec["y_test"])),
        "seconds": seconds,
    }


def main(argv: list[str]) -> int:
    source, target = Path(argv[0]), Path(argv[1])
    try:
        import energy_callbacks.keras  # noqa: F401
    except Exception as exc:  # any import failure goes to the parent
        target.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return IMPORT_ERROR_STATUS
    with np.load(source, allow_pickle=False) as f:
        spec = {k: f[k] for k in f.files}
    results = []
    try:
        for rule in [str(r) for r in spec["rules"]]:
            results.append(train_keras(spec, rule))
    except Exception:  # the parent shows the traceback
        target.write_text(json.dumps({"error": traceback.format_exc(), "results": results}))
        return 1
    target.write_text(json.dumps({"results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
