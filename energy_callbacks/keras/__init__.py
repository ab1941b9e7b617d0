"""The Keras 3 adapter: ``PlasticityCallback`` for ``model.fit`` on TensorFlow, JAX and torch.

One line in an existing pipeline::

    from energy_callbacks.keras import PlasticityCallback

    model.fit(x, y, callbacks=[PlasticityCallback(synapses=0.1, samples="lazy")])

The modules:

- ``callback``: :class:`PlasticityCallback`, which installs the optimizer wrapper
  and the gated loss for the length of ``fit``, logs the energy and restores the model;
- ``optimizer``: :class:`PlasticityOptimizer`, any Keras optimizer with the rules
  applied in-graph and exact energy accumulators in optimizer variables;
- ``gate``: the sample gate's state (counts, mistake memory), the gated loss, and
  :func:`sample_weight` for a custom ``train_step``'s own loss;
- ``private``: the few Keras internals the adapter touches, in one place;
- ``caching``: the synaptic-caching store and totals as optimizer variables;
- ``totals``: error-free float32 totals and int32-word counts;
- ``carry``: a new compile's optimizer continues the callback's totals;
- ``distribute``: ``tf.distribute`` care (one write per replica, replica-wide decisions);
- ``ops``: the core's array operations on ``keras.ops``, traced into the train step.
"""

from __future__ import annotations

from .callback import PlasticityCallback
from .gate import sample_weight
from .optimizer import PlasticityOptimizer

__all__ = ["PlasticityCallback", "PlasticityOptimizer", "sample_weight"]
