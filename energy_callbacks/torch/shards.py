"""Sharded parameters (FSDP2, ``torch.distributed.fsdp.fully_shard``).

Under FSDP2 each parameter is a ``DTensor`` split along dim 0 over the processes
of a 1-D device mesh: every process holds a block of consecutive rows (its
*shard*), and the optimizer steps the shards in place. The adapter measures and
masks each process's shard (:func:`local`), so the extra memory per process falls
with the number of processes; figures that sum over synapses are summed over the
processes when they are read (:class:`Shards`), not at every step.

FSDP2 splits dim 0 as ``torch.chunk`` does: ``ceil(n / world)`` rows per process,
the last ones short or empty (:func:`rows`). Row-major order therefore runs from
the first process's shard to the last's: a shard is one contiguous range of the
tensor's flat indices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

try:  # torch >= 2.4 has the public DTensor module
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - older torch: nothing can be sharded
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]

__all__ = ["Shards", "is_sharded", "like", "local", "own_rows", "rows", "shards_of"]


def is_sharded(p: torch.Tensor) -> bool:
    """True for a ``DTensor`` (a parameter that ``fully_shard`` or a tensor-parallel
    plan has distributed)."""
    return DTensor is not None and isinstance(p, DTensor)


def local(p: torch.Tensor) -> torch.Tensor:
    """The part of ``p`` this process holds, detached: a view of the shard's storage for
    a ``DTensor`` (writes go to the parameter), ``p`` itself otherwise."""
    if is_sharded(p):
        with torch.no_grad():  # a plain view, 7x cheaper than detach().to_local()
            return p.to_local()
    return p.detach()


def rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)``: the rows of a dim of ``n`` rows that process ``rank`` holds when
    FSDP2 splits it over ``world`` processes (``torch.chunk``: ``ceil(n / world)`` each)."""
    size = math.ceil(n / world) if n else 0
    start = min(n, rank * size)
    return start, min(n, start + size)


class Shards:
    """The processes that share every measured tensor, one dim-0 shard each.

    ``sum`` adds a per-tensor vector of figures over the processes (one
    ``all_reduce``); ``all`` agrees on a flag. Both are collectives: every process
    must call them at the same point (a report, a log, a checkpoint, a step).
    """

    def __init__(self, group: torch.distributed.ProcessGroup) -> None:
        self.group = group
        self.rank = torch.distributed.get_rank(group)
        self.world = torch.distributed.get_world_size(group)
        # gloo reduces CPU tensors; NCCL needs them on the process's device
        backend = torch.distributed.get_backend(group)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if backend == "nccl"
            else torch.device("cpu")
        )

    @property
    def first(self) -> bool:
        """This process holds the first shard: a resumed total is carried here only."""
        return self.rank == 0

    def sum(self, values: np.ndarray) -> np.ndarray:
        """``values`` (float64 or int64) summed over the processes, element by element,
        into a new array (``values`` is left as it is)."""
        t = torch.tensor(np.asarray(values), device=self.device)  # a copy: reduced in place
        torch.distributed.all_reduce(t, group=self.group)
        return t.cpu().numpy()

    def all(self, flag: bool | torch.Tensor) -> bool | torch.Tensor:
        """``flag`` on every process: a bool for a bool, a device bool for a device bool
        (which is not read back to the host)."""
        if isinstance(flag, torch.Tensor):
            t = flag.to(torch.int32)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.group)
            return t.bool()
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def rows(self, n: int) -> tuple[int, int]:
        """The rows of a dim-0 of ``n`` rows that this process holds."""
        return rows(n, self.rank, self.world)


def shards_of(params: Sequence[nn.Parameter], field: str = "attach") -> Shards | None:
    """The :class:`Shards` of FSDP2 parameters (None when none is sharded).

    Refuses what cannot be measured exactly shard by shard: a mix of sharded and
    whole parameters, placements other than one ``Shard(0)`` (tensor parallelism, a
    2-D mesh), and parameters on different meshes.
    """
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return None
    if len(sharded) != len(params):
        raise ValueError(
            f"{field}: some trained parameters are sharded (DTensor) and some are not; "
            "shard the whole model with fully_shard (the root module too) so that every "
            "parameter is split the same way"
        )
    mesh = sharded[0].device_mesh
    for p in sharded:
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(
                f"{field}: a parameter of shape {tuple(p.shape)} is placed "
                f"{tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; plasticity is "
                "exact on FSDP2's placement only, Shard(0) on a 1-D mesh (fully_shard "
                "without tensor parallelism, tensor_parallel_size=1)"
            )
        if p.device_mesh != mesh:
            raise ValueError(
                f"{field}: the parameters are sharded over different device meshes; "
                "shard them all over the same mesh"
            )
    return Shards(mesh.get_group())


def like(p: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """``shard`` (this process's rows of a tensor shaped like the sharded ``p``) as a
    ``DTensor`` placed like ``p``, for ``torch.distributed.checkpoint``."""
    return DTensor.from_local(
        shard, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )


def own_rows(shards: Shards | None, p: torch.Tensor, saved: torch.Tensor) -> torch.Tensor:
    """A host copy of this process's part of ``saved``, a tensor shaped like ``p``: its
    local rows if ``saved`` is a ``DTensor`` or the whole tensor while ``p`` is
    sharded, all of it otherwise."""
    if is_sharded(saved):
        saved = saved.to_local()
    saved = torch.as_tensor(saved)
    if shards is not None and is_sharded(p) and tuple(saved.shape) == tuple(p.shape):
        start, stop = shards.rows(p.shape[0])
        saved = saved[start:stop]
    return saved.to("cpu", copy=True)
