"""The plasticity state in checkpoints: NumPy arrays as tensors, and back.

Checkpoints of torch trainers load with ``weights_only=True`` (and safetensors holds
tensors only), so :func:`to_tensors` turns the core's NumPy arrays into tensors;
:func:`from_tensors` turns them back, except w_0 (``"initial"``), which stays in
tensors (bfloat16 has no NumPy dtype).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .attached import INITIAL_KEY
from .shards import is_sharded


def to_tensors(value: Any) -> Any:
    """NumPy arrays -> tensors (copies), through dicts and lists."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, dict):
        return {k: to_tensors(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_tensors(v) for v in value]
    return value


def from_tensors(value: Any) -> Any:
    """Tensors -> NumPy arrays, through dicts and lists; w_0 and sharded tensors
    (``DTensor``: each process's rows, which the handle takes) stay tensors."""
    if is_sharded(value):
        return value
    if isinstance(value, torch.Tensor):
        return value.cpu().numpy()
    if isinstance(value, dict):
        return {k: v if k == INITIAL_KEY else from_tensors(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_tensors(v) for v in value]
    return value
