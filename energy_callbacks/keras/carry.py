"""Carrying a Keras callback's totals over to the optimizer of a new ``compile``.

Compiling again between two ``fit`` calls (a new optimizer, layers unfrozen) gives the
model a new inner optimizer, so :class:`~energy_callbacks.keras.PlasticityCallback`
wraps it in a new :class:`~energy_callbacks.keras.optimizer.PlasticityOptimizer`;
:func:`carry_over` moves the energy totals, the step counters, each tensor's ``w_0``
and the sample gate's state (counts, mistake memory) into it.
"""

from __future__ import annotations

import numpy as np

from .optimizer import PlasticityOptimizer


def carry_over(wrapper: PlasticityOptimizer, previous: PlasticityOptimizer) -> None:
    """``wrapper`` (just built) continues the totals of ``previous``, the wrapper of
    the same callback before the model was compiled again (a new optimizer, layers
    unfrozen).

    Tensors are matched by name: each keeps its totals and its ``w_0``; tensors that
    join start at zero. A tensor that ``previous`` measured and this wrapper does not
    (a layer frozen, then compiled again) is refused: its energy would be lost.
    """
    names, old = wrapper._names, previous._names
    dropped = [n for n in old if n not in names]
    if dropped:
        raise ValueError(
            f"PlasticityCallback: {dropped} were trained with plasticity before this "
            "compile and are not trainable now, so their energy so far would be lost. Read "
            "report() now and fit with a new PlasticityCallback (new totals), or keep them "
            "trainable (a learning rate of 0 keeps them fixed)."
        )
    index = {n: i for i, n in enumerate(old)}
    pairs = [(i, index[n]) for i, n in enumerate(names) if n in index]
    for key, total in wrapper._totals.items():
        value = np.array(total.numpy())
        before = np.asarray(previous._totals[key].numpy())
        for i, j in pairs:
            value[i] = before[j]
        total.assign(value)
    wrapper._counters.assign(previous._counters.numpy())
    for i, j in pairs:
        w0, was = wrapper._initial[i], previous._initial[j]
        if tuple(w0.shape) != tuple(was.shape):
            raise ValueError(
                f"PlasticityCallback: {names[i]!r} changed shape from {tuple(was.shape)} to "
                f"{tuple(w0.shape)} since the last fit; its energy cannot be carried on. "
                "Fit with a new PlasticityCallback."
            )
        w0.assign(was.numpy())
    if len(wrapper.gate.variables) == len(previous.gate.variables):
        for mine, theirs in zip(wrapper.gate.variables, previous.gate.variables, strict=True):
            mine.assign(theirs.numpy())
    wrapper.refresh_readout()
