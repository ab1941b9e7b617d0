"""Data parallelism (DDP): what each process counts alone, combined over the processes.

Under DDP every process applies the same averaged update, so the weights and the
energy are the same everywhere; the sample gate's counts and its mistake memory
are per process (each sees its own samples) and are combined here, at the end of
an epoch, by the callbacks.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core import Plasticity


def world_size() -> int:
    """The number of processes in the default group (1 outside torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def merge_samples(plasticity: Plasticity, since: tuple[int, int], device: torch.device) -> None:
    """Sum the samples seen and learned since ``since`` (``(seen, learned)`` at the
    epoch's start) over the processes, and OR the mistake memories together."""
    p = plasticity
    delta = torch.tensor(
        [p.samples_seen - since[0], p.samples_learned - since[1]],
        dtype=torch.int64,
        device=device,
    )
    torch.distributed.all_reduce(delta)
    p.samples_seen = since[0] + int(delta[0])
    p.samples_learned = since[1] + int(delta[1])
    memory = getattr(p.samples, "memory", None)
    if memory is not None:  # the packed memories (12.5 MB for 1e8 ids), ORed together
        states: list[Any] = [None] * world_size()
        torch.distributed.all_gather_object(states, memory.state_dict())
        for state in states:
            memory.merge(state)
