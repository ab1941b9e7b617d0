"""The optimizer steps that only make an optimizer's state, which are not training.

``torch.distributed.checkpoint.state_dict`` (``get_optimizer_state_dict``,
``set_optimizer_state_dict``; checked with torch 2.13) gives an optimizer without
state one ``step()`` with zero gradients at learning rate 0, so that its state
tensors exist before a checkpoint is read into them. Lightning's
``ModelParallelStrategy`` does this when it resumes. Such a step changes no
weight; the adapter neither counts nor gates it.
"""

from __future__ import annotations

import torch


def makes_state_only(opt: torch.optim.Optimizer) -> bool:
    """True for a step of an optimizer without state, at learning rate 0 in every group,
    whose gradients are all zero (checked only when the first two hold)."""
    if opt.state:
        return False
    groups = opt.param_groups
    if not groups or any(float(g.get("lr", 1.0)) != 0.0 for g in groups):
        return False
    grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
    with torch.no_grad():
        return bool(grads) and all(not bool(torch.any(g != 0)) for g in grads)
