"""The oracle replay every torch test compares with: a step masked by the NumPy core.

Importable from every test folder (``pythonpath = ["tests"]`` in pyproject.toml).
"""

from __future__ import annotations

import numpy as np
import torch


def oracle_step(oracle, params, step) -> None:
    """Run an optimizer ``step()`` by hand, masked by the NumPy ``oracle``.

    The oracle sees the real proposal (``w_after - w_before``); the entries it
    drops get their old value back, and the real change is recorded. This is
    what the adapter must reproduce exactly.
    """
    before = [p.detach().clone() for p in params]
    step()
    masks = oracle.masks([(p.detach() - b).numpy() for p, b in zip(params, before)])
    with torch.no_grad():
        for p, b, m in zip(params, before, masks):
            if m is not None:
                p.copy_(torch.where(torch.from_numpy(np.array(m)), p, b))  # a writable copy
    oracle.record([(p.detach() - b).numpy() for p, b in zip(params, before)])
