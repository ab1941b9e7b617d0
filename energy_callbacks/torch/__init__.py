"""The torch adapter: plasticity on any PyTorch optimizer, for every torch training loop.

Example::

    from energy_callbacks.torch import attach

    handle = attach(model, optimizer, Plasticity(synapses=0.1, samples="lazy"))
    for x, y in loader:
        handle.gate_batch(y)        # with a sample gate only: before the forward pass
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()            # masked; skipped when no sample passed the gate
        optimizer.zero_grad()
    print(handle.report())
    handle.detach()

The Lightning callback (:mod:`energy_callbacks.lightning`) is built on the same
:func:`attach`. The modules:

- ``attached``: :func:`attach` and :class:`AttachedPlasticity`, the optimizer step
  hooks and the three step paths (fused, NumPy, on the device);
- ``layers``: :func:`describe`, which tensors the rules see and each module's unit axis;
- ``wiring``: hidden/output layers and path links, read off the autograd graph;
- ``snapshot``: the per-optimizer snapshot and the passes that measure, mask and undo;
- ``difference``: on the torch-ops path, ``w - w_before`` read in blocks, and the
  rules' selections on it (a radix top-k), so no delta is written;
- ``gate``: the sample gate (gradient hooks on the forward output, empty steps skipped);
- ``selective``: ``skip_backward=True``, training on the learners of a judged batch;
- ``faults``: NaN/Inf steps explained, GradScaler skips counted;
- ``spawned``: under ``ddp_spawn``, rank 0's state sent back to the launching process;
- ``ops``: the core's array operations on torch tensors (GPU, bf16), and the choice
  of NumPy views on the CPU; ``fused``: the numba one-pass kernels for those views.
"""

from __future__ import annotations

from .attached import AttachedPlasticity, attach, edges, forget_compiled_hooks, module_names
from .gate import default_logits
from .layers import describe

__all__ = [
    "AttachedPlasticity",
    "attach",
    "default_logits",
    "describe",
    "edges",
    "forget_compiled_hooks",
    "module_names",
]
